"""Identity embeddings (IE): IP-Adapter's image prompt, used to keep the source's identity through an edit.

IP-Adapter (Ye et al., 2023) encodes a reference image with a CLIP vision encoder, projects the embedding to
a few extra cross-attention tokens (``ImageProjModel``) and attends to them in every cross-attention layer of
the UNet through decoupled key/value projections (``to_k_ip``/``to_v_ip``), adding the result to the text
cross-attention's output. This module holds those trainable parts (:class:`IdentityAdapter`), the encoding of
the reference (:func:`encode_identity`) and an identity-preservation score (:func:`identity_score`); the
attention processors that consume the adapter live with the rest of the attention code.

Layer order convention: the adapter's layers follow ``unet.attn_processors`` (diffusers' registration order:
``down_blocks``, then ``up_blocks``, then ``mid_block``), keeping only the names that end with
``attn2.processor``. The released IP-Adapter files instead number the layers by their index among *all*
processors (``attn1`` and ``attn2`` interleaved), so SD 1.5's 16 cross-attention layers carry the odd
indices 1, 3, …, 31; :mod:`xmgie.loading.convert_ip_adapter` translates between the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

CROSS_ATTENTION_SUFFIX = "attn2.processor"
"""Suffix of the UNet's cross-attention processor names in ``unet.attn_processors``."""

REGION_FILL = 127
"""Grey level that replaces the pixels outside an identity region before encoding."""

TINY_IDENTITY_HIDDEN = 32
TINY_IDENTITY_IMAGE_SIZE = 32


def cross_attention_layers(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The UNet's cross-attention layers as ``(processor name, Attention module)``, in ``attn_processors`` order."""
    layers = []
    for name in unet.attn_processors:
        if name.endswith(CROSS_ATTENTION_SUFFIX):
            layers.append((name, unet.get_submodule(name[: -len(".processor")])))
    return layers


class ImageProjModel(nn.Module):
    """IP-Adapter's image projection: one CLIP image embedding → ``num_tokens`` cross-attention tokens."""

    def __init__(self, image_embed_dim: int, cross_attention_dim: int, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.cross_attention_dim = cross_attention_dim
        self.proj = nn.Linear(image_embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Map ``(B, image_embed_dim)`` to ``(B, num_tokens, cross_attention_dim)``."""
        tokens = self.proj(image_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim)
        return self.norm(tokens)


class IdentityKeyValue(nn.Module):
    """The decoupled key/value projections of one cross-attention layer (IP-Adapter's ``to_k_ip``/``to_v_ip``)."""

    def __init__(self, cross_attention_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)


class IdentityAdapter(ModelMixin, ConfigMixin):
    """The trainable parts of IP-Adapter (``ip-adapter_sd15``) for one UNet.

    ``image_proj`` turns a CLIP image embedding into ``num_tokens`` tokens of width ``cross_attention_dim``;
    ``layers[i]`` holds ``to_k_ip``/``to_v_ip`` of the ``i``-th cross-attention layer, whose processor name
    is ``layer_names[i]`` and whose attention width (``to_k.out_features``) is ``layer_hidden_sizes[i]``.
    The defaults are SD 1.5's (ViT-H/14 image embeddings of 1024, text width 768, 4 tokens); the layer lists
    come from the UNet (:meth:`from_unet`).
    """

    @register_to_config
    def __init__(
        self,
        image_embed_dim: int = 1024,
        cross_attention_dim: int = 768,
        num_tokens: int = 4,
        layer_hidden_sizes: list[int] | None = None,
        layer_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        layer_hidden_sizes = list(layer_hidden_sizes or [])
        layer_names = list(layer_names or [])
        if len(layer_hidden_sizes) != len(layer_names):
            raise ValueError(f"got {len(layer_hidden_sizes)} layer_hidden_sizes for {len(layer_names)} layer_names")
        if len(set(layer_names)) != len(layer_names):
            raise ValueError("layer_names contains duplicates")
        self.image_proj = ImageProjModel(image_embed_dim, cross_attention_dim, num_tokens)
        self.layers = nn.ModuleList(IdentityKeyValue(cross_attention_dim, size) for size in layer_hidden_sizes)
        self._layer_index = {name: index for index, name in enumerate(layer_names)}

    @classmethod
    def from_unet(cls, unet: nn.Module, image_embed_dim: int, num_tokens: int = 4) -> IdentityAdapter:
        """Build an adapter with one key/value pair per cross-attention layer of ``unet`` (randomly initialised)."""
        layers = cross_attention_layers(unet)
        if not layers:
            raise ValueError("the UNet has no cross-attention (attn2) layers")
        widths = {attn.to_k.in_features for _, attn in layers}
        if len(widths) != 1:
            raise ValueError(f"the UNet's cross-attention layers disagree on the conditioning width: {sorted(widths)}")
        return cls(
            image_embed_dim=image_embed_dim,
            cross_attention_dim=widths.pop(),
            num_tokens=num_tokens,
            layer_hidden_sizes=[attn.to_k.out_features for _, attn in layers],
            layer_names=[name for name, _ in layers],
        )

    def check_unet(self, unet: nn.Module) -> None:
        """Raise ``ValueError`` unless ``unet``'s cross-attention layers are this adapter's (names, order, sizes)."""
        layers = cross_attention_layers(unet)
        names = [name for name, _ in layers]
        if names != list(self.config.layer_names):
            missing = [name for name in self.config.layer_names if name not in names]
            extra = [name for name in names if name not in self.config.layer_names]
            raise ValueError(
                "the UNet's cross-attention layers differ from the adapter's: "
                f"missing from the UNet {missing}, unknown to the adapter {extra}"
                + ("" if missing or extra else " (same names, different order)")
            )
        for (name, attn), size in zip(layers, self.config.layer_hidden_sizes, strict=True):
            if attn.to_k.out_features != size or attn.to_k.in_features != self.config.cross_attention_dim:
                raise ValueError(
                    f"{name}: the UNet's layer maps {attn.to_k.in_features} → {attn.to_k.out_features}, "
                    f"the adapter's maps {self.config.cross_attention_dim} → {size}"
                )

    # Both methods run the offload hook of ``enable_model_cpu_offload`` (which wraps only ``forward``), so the
    # adapter is on the execution device whenever the pipeline or the attention processors call them.
    @apply_forward_hook
    def tokens(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Project ``(B, image_embed_dim)`` image embeddings to ``(B, num_tokens, cross_attention_dim)`` tokens."""
        if image_embeds.ndim != 2 or image_embeds.shape[1] != self.config.image_embed_dim:
            raise ValueError(
                f"image_embeds must have shape (B, {self.config.image_embed_dim}), got {tuple(image_embeds.shape)}"
            )
        weight = self.image_proj.proj.weight
        return self.image_proj(image_embeds.to(device=weight.device, dtype=weight.dtype))

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`tokens`."""
        return self.tokens(image_embeds)

    def layer_index(self, processor_name: str) -> int:
        """Index in :attr:`layers` of a cross-attention layer by processor name (``.processor`` suffix optional)."""
        name = processor_name if processor_name.endswith(".processor") else f"{processor_name}.processor"
        try:
            return self._layer_index[name]
        except KeyError:
            raise KeyError(f"{processor_name!r} is not one of the adapter's cross-attention layers") from None

    @apply_forward_hook
    def key_value(self, layer_name: str, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(B, num_tokens, layer_hidden_size)`` of the identity tokens for one layer."""
        layer = self.layers[self.layer_index(layer_name)]
        tokens = tokens.to(device=layer.to_k_ip.weight.device, dtype=layer.to_k_ip.weight.dtype)
        return layer.to_k_ip(tokens), layer.to_v_ip(tokens)


def _apply_region(image: PIL.Image.Image, region: PIL.Image.Image) -> PIL.Image.Image:
    """Keep ``image`` where ``region`` is white and fade it to grey where it is black."""
    if region.size != image.size:
        region = region.resize(image.size, PIL.Image.Resampling.BILINEAR)
    weight = np.asarray(region.convert("L"), dtype=np.float32)[..., None] / 255.0
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    blended = pixels * weight + REGION_FILL * (1.0 - weight)
    return PIL.Image.fromarray(blended.round().clip(0, 255).astype(np.uint8), "RGB")


@torch.no_grad()
def _image_embeds(
    image_encoder: CLIPVisionModelWithProjection,
    feature_extractor: CLIPImageProcessorPil,
    images: Sequence[PIL.Image.Image],
) -> torch.Tensor:
    pixel_values = feature_extractor(images=[image.convert("RGB") for image in images], return_tensors="pt")[
        "pixel_values"
    ]
    pixel_values = pixel_values.to(device=image_encoder.device, dtype=image_encoder.dtype)
    return image_encoder(pixel_values=pixel_values).image_embeds.float()


def encode_identity(
    image_encoder: CLIPVisionModelWithProjection,
    feature_extractor: CLIPImageProcessorPil,
    images: Sequence[PIL.Image.Image],
    region_masks: Sequence[PIL.Image.Image | None] | None = None,
) -> torch.Tensor:
    """The identity embeddings ``(B, D)`` of ``images``: the encoder's ``image_embeds`` in float32.

    The embeddings are not normalised (IP-Adapter feeds them to its projection as they are). Where
    ``region_masks`` gives a mask for an item (``L`` image, white = the region whose identity is kept), the
    image is blended with grey 127 by the mask (``pixel · m + 127 · (1 − m)``, ``m`` in [0, 1]) before
    encoding, so only the region contributes; a mask of another size is resized to the image's first.
    """
    images = list(images)
    if not images:
        raise ValueError("`images` is empty: pass at least one image")
    if region_masks is not None:
        region_masks = list(region_masks)
        if len(region_masks) != len(images):
            raise ValueError(f"got {len(region_masks)} region masks for {len(images)} images")
        images = [
            image if region is None else _apply_region(image, region)
            for image, region in zip(images, region_masks, strict=True)
        ]
    return _image_embeds(image_encoder, feature_extractor, images)


def identity_score(
    image_encoder: CLIPVisionModelWithProjection,
    feature_extractor: CLIPImageProcessorPil,
    sources: Sequence[PIL.Image.Image],
    outputs: Sequence[PIL.Image.Image],
) -> list[float]:
    """Cosine similarity of the encoder's ``image_embeds`` of each source and its output (1 = same identity)."""
    sources, outputs = list(sources), list(outputs)
    if len(sources) != len(outputs):
        raise ValueError(f"got {len(sources)} sources but {len(outputs)} outputs")
    if not sources:
        return []
    embeds = _image_embeds(image_encoder, feature_extractor, sources + outputs)
    source_embeds, output_embeds = embeds[: len(sources)], embeds[len(sources) :]
    return torch.nn.functional.cosine_similarity(source_embeds, output_embeds, dim=-1).tolist()


def build_tiny_identity_components(
    unet: nn.Module, seed: int = 0
) -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessorPil, IdentityAdapter]:
    """A tiny image encoder, its 32-px image processor and an adapter for ``unet``, randomly initialised from ``seed``.

    The key/value projections are drawn from N(0, 0.02²) rather than copied from the UNet's text projections
    (IP-Adapter's training start), so identity tokens visibly change a tiny edit.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        image_encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=TINY_IDENTITY_HIDDEN,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=TINY_IDENTITY_IMAGE_SIZE,
                patch_size=8,
                projection_dim=TINY_IDENTITY_HIDDEN,
            )
        ).eval()
        torch.manual_seed(seed + 1)
        adapter = IdentityAdapter.from_unet(unet, image_embed_dim=image_encoder.config.projection_dim)
        with torch.no_grad():
            for layer in adapter.layers:
                layer.to_k_ip.weight.normal_(std=0.02)
                layer.to_v_ip.weight.normal_(std=0.02)
    feature_extractor = CLIPImageProcessorPil(
        size={"shortest_edge": TINY_IDENTITY_IMAGE_SIZE},
        crop_size={"height": TINY_IDENTITY_IMAGE_SIZE, "width": TINY_IDENTITY_IMAGE_SIZE},
    )
    return image_encoder, feature_extractor, adapter.eval()
