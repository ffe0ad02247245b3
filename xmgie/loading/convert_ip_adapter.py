"""Convert IP-Adapter's released weights (``ip-adapter_sd15``) into an :class:`IdentityAdapter`.

The release comes in two layouts holding the same tensors:

* ``ip-adapter_sd15.bin`` (``torch.save``): ``{"image_proj": {"proj.weight", "proj.bias", "norm.weight",
  "norm.bias"}, "ip_adapter": {"1.to_k_ip.weight", "1.to_v_ip.weight", "3.to_k_ip.weight", …}}``;
* ``ip-adapter_sd15.safetensors``: the same, flattened with ``image_proj.`` / ``ip_adapter.`` prefixes.

Mapping notes:

* ``image_proj.*`` → ``image_proj.*`` (same parameter names as IP-Adapter's ``ImageProjModel``).
* ``ip_adapter.{N}.to_{k,v}_ip.weight`` → ``layers.{i}.to_{k,v}_ip.weight``: IP-Adapter wraps *all* of
  ``unet.attn_processors`` in one ``ModuleList``, so ``N`` is a layer's index among all processors (``attn1``
  and ``attn2`` interleaved, the ``attn1`` ones holding no weights); ``i`` is its index among the ``attn2``
  processors only. For SD 1.5, ``N`` = 1, 3, …, 31 maps to ``i`` = 0, 1, …, 15.
* ``image_embed_dim`` and ``num_tokens`` are read from ``image_proj.proj.weight``
  (``(num_tokens · cross_attention_dim, image_embed_dim)``); ``cross_attention_dim`` from ``norm.weight``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from xmgie.editing.identity import CROSS_ATTENTION_SUFFIX, IdentityAdapter, cross_attention_layers

PathLike = str | os.PathLike
StateDict = dict[str, torch.Tensor]

IMAGE_PROJ_KEYS = ("proj.weight", "proj.bias", "norm.weight", "norm.bias")
_IP_LAYER_KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")


def _split_release(state: Mapping) -> tuple[StateDict, StateDict]:
    """The release's ``image_proj`` and ``ip_adapter`` parts, from the nested or the flat layout."""
    if "image_proj" in state or "ip_adapter" in state:
        nested = {key: value for key, value in state.items() if key not in ("image_proj", "ip_adapter")}
        if nested:
            raise ValueError(f"unexpected top-level keys next to image_proj/ip_adapter: {sorted(nested)}")
        image_proj, ip_adapter = state.get("image_proj"), state.get("ip_adapter")
        if not isinstance(image_proj, Mapping) or not isinstance(ip_adapter, Mapping):
            raise ValueError("the nested layout needs both an 'image_proj' and an 'ip_adapter' dict")
        return dict(image_proj), dict(ip_adapter)
    image_proj, ip_adapter, unexpected = {}, {}, []
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        if prefix == "image_proj" and rest:
            image_proj[rest] = value
        elif prefix == "ip_adapter" and rest:
            ip_adapter[rest] = value
        else:
            unexpected.append(key)
    if unexpected:
        raise ValueError(f"unexpected keys (expected image_proj.* and ip_adapter.*): {sorted(unexpected)}")
    return image_proj, ip_adapter


def convert_ip_adapter_state_dict(state: Mapping, unet: nn.Module) -> StateDict:
    """Map IP-Adapter's released state dict onto :class:`IdentityAdapter` keys for ``unet``.

    Accepts the nested ``.bin`` layout and the flat ``image_proj.`` / ``ip_adapter.`` layout. Raises
    ``ValueError`` naming the missing or unexpected keys (with the UNet layer a missing index stands for)
    and any tensor whose shape does not fit ``unet``.
    """
    image_proj, ip_adapter = _split_release(state)
    layers = cross_attention_layers(unet)
    all_names = list(unet.attn_processors)
    # Index among all processors (the release's numbering) → index among the attn2 processors (ours).
    release_to_ours = {all_names.index(name): ours for ours, (name, _) in enumerate(layers)}

    missing = [f"image_proj.{key}" for key in IMAGE_PROJ_KEYS if key not in image_proj]
    unexpected = [f"image_proj.{key}" for key in image_proj if key not in IMAGE_PROJ_KEYS]
    converted: StateDict = {f"image_proj.{key}": image_proj[key] for key in IMAGE_PROJ_KEYS if key in image_proj}
    for key, value in ip_adapter.items():
        match = _IP_LAYER_KEY.match(key)
        if match is None or int(match.group(1)) not in release_to_ours:
            unexpected.append(f"ip_adapter.{key}")
            continue
        converted[f"layers.{release_to_ours[int(match.group(1))]}.{match.group(2)}.weight"] = value
    for release_index, ours in release_to_ours.items():
        for projection in ("to_k_ip", "to_v_ip"):
            if f"layers.{ours}.{projection}.weight" not in converted:
                missing.append(f"ip_adapter.{release_index}.{projection}.weight ({layers[ours][0]})")
    if missing or unexpected:
        raise ValueError(
            f"the IP-Adapter weights do not fit this UNet ({len(layers)} {CROSS_ATTENTION_SUFFIX} layers): "
            f"missing {missing}, unexpected {unexpected}"
        )

    cross_attention_dim = layers[0][1].to_k.in_features
    proj_weight = converted["image_proj.proj.weight"]
    if proj_weight.ndim != 2 or proj_weight.shape[0] % cross_attention_dim:
        raise ValueError(
            f"image_proj.proj.weight has shape {tuple(proj_weight.shape)}; its rows must be a multiple of the "
            f"UNet's cross-attention width {cross_attention_dim}"
        )
    expected = {
        "image_proj.proj.bias": (proj_weight.shape[0],),
        "image_proj.norm.weight": (cross_attention_dim,),
        "image_proj.norm.bias": (cross_attention_dim,),
    }
    for ours, (_, attn) in enumerate(layers):
        for projection in ("to_k_ip", "to_v_ip"):
            expected[f"layers.{ours}.{projection}.weight"] = (attn.to_k.out_features, attn.to_k.in_features)
    wrong = [
        f"{key}: {tuple(converted[key].shape)}, expected {shape}"
        for key, shape in expected.items()
        if tuple(converted[key].shape) != shape
    ]
    if wrong:
        raise ValueError("IP-Adapter tensors with the wrong shape for this UNet: " + "; ".join(wrong))
    return converted


def load_ip_adapter(path: PathLike, unet: nn.Module, image_embed_dim: int | None = None) -> IdentityAdapter:
    """Read an IP-Adapter release (``.bin`` or ``.safetensors``) into an :class:`IdentityAdapter` for ``unet``.

    ``image_embed_dim`` and the number of tokens are read from the weights; when ``image_embed_dim`` is given
    (the image encoder's ``projection_dim``) it must agree with them.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    converted = convert_ip_adapter_state_dict(state, unet)
    rows, columns = converted["image_proj.proj.weight"].shape
    if image_embed_dim is not None and image_embed_dim != columns:
        raise ValueError(f"{path.name} expects image embeddings of {columns}, not {image_embed_dim}")
    cross_attention_dim = converted["image_proj.norm.weight"].shape[0]
    adapter = IdentityAdapter.from_unet(unet, image_embed_dim=columns, num_tokens=rows // cross_attention_dim)
    adapter.load_state_dict(converted, strict=True)
    return adapter.eval()
