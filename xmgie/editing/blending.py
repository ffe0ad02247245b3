"""Progressive feature blending (PFB): the outside of the mask follows a reference branch of the source.

A reference branch follows the source image through the same timesteps. At chosen UNet levels the
edit branches' features become ``m·f_edit + (1 − m)·f_ref`` with the mask resized to the features'
resolution, and during the first part of the schedule the latents are blended the same way.

Levels name resolutions as fractions of the latent side (``"1/4"``: 16×16 for a 512-pixel image, whose
latent is 64×64) plus ``"mid"`` for the middle block. As in PFB-Diff, a level covers the encoder and the
decoder: the output of every layer (a resnet with its attention) working at that resolution is blended,
so the skip connections carry blended features too. A block's downsampler or upsampler output is at the
next resolution and is not blended by the block's own level. :func:`blend_modules` lists the layers.

The reference branch rides in the same UNet call as the guidance branches: UNet blocks act on each
sample independently, so a forward hook on a block can blend the edit rows with the reference rows of
the same batch. :class:`FeatureBlender` also has a sequential mode (reference in its own UNet call, its
features recorded and blended into the next call) that serves as the obvious design the batched one is
checked against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from xmgie.editing.blur import resize_mask

MIDDLE_LEVEL = "mid"
"""The level of the UNet's middle block."""


def level_halvings(level: str) -> int:
    """How many times the UNet halves the latent side to reach ``level`` (``"1/4"`` → 2)."""
    fraction = Fraction(level)
    halvings = fraction.denominator.bit_length() - 1
    if fraction.numerator != 1 or fraction.denominator != 1 << halvings:
        raise ValueError(f"level {level!r} is not 1/2^k of the latent side")
    return halvings


def unet_layers(unet) -> list[tuple[str, int]]:
    """The UNet's layers in execution order with the halvings of the latent side each works at.

    A layer is a resnet with the attention that follows it (named by the attention, whose output is the
    layer's), or a resnet alone in blocks without attention; the middle block is one layer. A down block's
    layers work before its downsampler and an up block's before its upsampler.
    """
    layers: list[tuple[str, int]] = []
    halvings = 0

    def block_layers(prefix: str, block) -> None:
        attentions = getattr(block, "attentions", None)
        for index in range(len(block.resnets)):
            kind = "attentions" if attentions is not None and len(attentions) > index else "resnets"
            layers.append((f"{prefix}.{kind}.{index}", halvings))

    for index, block in enumerate(unet.down_blocks):
        block_layers(f"down_blocks.{index}", block)
        if getattr(block, "downsamplers", None):
            halvings += 1
    layers.append(("mid_block", halvings))
    for index, block in enumerate(unet.up_blocks):
        block_layers(f"up_blocks.{index}", block)
        if getattr(block, "upsamplers", None):
            halvings -= 1
    return layers


def blend_modules(unet, levels: Sequence[str]) -> list[str]:
    """Names of the UNet modules whose outputs PFB blends for ``levels`` (``"1/4"``, ``"1/8"``, ``"mid"``...).

    ``"mid"`` is the middle block; ``"1/2^k"`` every encoder and decoder layer working at ``1/2^k`` of the
    latent side (see :func:`unet_layers`).
    """
    wanted = {level_halvings(level) for level in levels if level != MIDDLE_LEVEL}
    names = []
    for name, halvings in unet_layers(unet):
        if name == "mid_block":
            if MIDDLE_LEVEL in levels:
                names.append(name)
        elif halvings in wanted:
            names.append(name)
    return names


@dataclass
class FeatureBlender:
    """Forward hooks on UNet blocks that blend edit features with reference features.

    Attributes:
        masks: (B, 1, H, W) soft edit masks (1 = edit) at latent or pixel resolution; resized per block.
        blended_sizes: each blended module's name and the (h, w) of the features it blended last.
        num_branches: guidance branches per item before the reference branch (3 with guidance, else 1).
        mode: ``batched`` (reference rows are the last ``B`` rows of the same call), ``record`` (this call
            is the reference alone: store its features) or ``blend`` (blend with the stored features).
    """

    masks: torch.Tensor
    num_branches: int
    mode: str = "batched"
    recorded: dict[str, torch.Tensor] = field(default_factory=dict)
    blended_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    _resized: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    _handles: list = field(default_factory=list)
    _last_block: str | None = None
    _rows: int = 0

    def mask_at(self, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        key = (height, width)
        if key not in self._resized:
            self._resized[key] = resize_mask(self.masks, (height, width))
        return self._resized[key].to(device=like.device, dtype=like.dtype)

    def attach(self, unet, blocks: Sequence[str]) -> FeatureBlender:
        """Register the hooks on ``blocks``: top-level blocks (``mid_block``, ``up_blocks.1``) or the layers
        :func:`blend_modules` names (``down_blocks.2.attentions.0``).

        In batched mode the reference rows are dropped after the last blended module: nothing downstream
        needs them, so what follows it (the upsampler of its block and the costly high-resolution decoder
        blocks with the default levels) runs on the edit rows only.
        """
        modules = dict(unet.named_modules())
        order = self._execution_order(unet)
        for name in blocks:
            if name not in modules or name not in order:
                raise ValueError(f"the UNet has no block or layer {name!r}")
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))
        if self.mode == "batched" and blocks:
            self._last_block = max(blocks, key=order.index)
            if self._last_block.startswith("down_blocks"):
                # Skip connections of later down blocks still carry reference rows; keep every row then.
                self._last_block = None
            else:
                for name in self._downstream_entries(unet, self._last_block):
                    hook = modules[name].register_forward_pre_hook(self._drop_reference_rows, with_kwargs=True)
                    self._handles.append(hook)
        return self

    @staticmethod
    def _execution_order(unet) -> list[str]:
        """Blendable module names in the order their forward hooks fire: a block's layers, then the block."""
        layers = [name for name, _ in unet_layers(unet)]
        order: list[str] = []
        for position, name in enumerate(layers):
            order.append(name)
            block = None if name == "mid_block" else name.rsplit(".", 2)[0]
            following = layers[position + 1] if position + 1 < len(layers) else ""
            if block is not None and not following.startswith(block + "."):
                order.append(block)  # a block's own output comes after its layers and its sampler
        return order

    @staticmethod
    def _downstream_entries(unet, last: str) -> list[str]:
        """Modules after ``last`` (the mid block or in the decoder) whose inputs drop the reference rows."""
        if last == "mid_block":
            return [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
        index = int(last.split(".")[1])
        later = [f"up_blocks.{i}" for i in range(index + 1, len(unet.up_blocks))]
        if last.count(".") == 1:
            return later
        # Inside an up block only its upsampler can drop rows: its other layers take skip connections of every row.
        samplers = getattr(unet.up_blocks[index], "upsamplers", None) or []
        return [f"up_blocks.{index}.upsamplers.{i}" for i in range(len(samplers))] + later

    def _drop_reference_rows(self, module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        rows, edit_rows = self._rows, self._rows - self.masks.shape[0]

        def trim(value):
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == rows:
                return value[:edit_rows]
            if isinstance(value, tuple):
                return tuple(trim(item) for item in value)
            return value

        return tuple(trim(a) for a in args), {key: trim(value) for key, value in kwargs.items()}

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> FeatureBlender:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def _hook(self, name: str):
        def blend(module, inputs, output):
            features = output[0] if isinstance(output, tuple) else output
            batch = self.masks.shape[0]
            if self.mode == "record":
                self.recorded[name] = features
                return output
            self.blended_sizes[name] = tuple(features.shape[-2:])
            if self.mode == "batched":
                edit, reference = features[:-batch], features[-batch:]
            else:
                edit, reference = features, self.recorded[name]
            mask = self.mask_at(*features.shape[-2:], like=features).repeat(self.num_branches, 1, 1, 1)
            blended = mask * edit + (1 - mask) * reference.repeat(self.num_branches, 1, 1, 1)
            if self.mode == "batched":
                self._rows = features.shape[0]
                if name != self._last_block:
                    blended = torch.cat([blended, reference])
            return (blended, *output[1:]) if isinstance(output, tuple) else blended

        return blend


def noised_reference_latents(scheduler, source_latents: torch.Tensor, noise: torch.Tensor) -> list[torch.Tensor]:
    """The reference trajectory: the source latent noised with a fixed noise at each timestep, then the source.

    Entry ``i`` is the reference latent at ``scheduler.timesteps[i]``; the last entry (after the final
    step) is the source latent itself.
    """
    trajectory = []
    for t in scheduler.timesteps:
        trajectory.append(scheduler.add_noise(source_latents, noise, t.reshape(1)))
    trajectory.append(source_latents)
    return trajectory


def epsilon_from_prediction(
    output: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The noise a UNet's ``output`` implies for the DDPM-parametrised input ``x`` at cumulative alpha ``alpha``.

    ``epsilon``: the output itself; ``v_prediction``: ``√ᾱ·v + √(1−ᾱ)·x``; ``sample`` (the clean latent ``x̂₀``):
    ``(x − √ᾱ·x̂₀) / √(1−ᾱ)``.
    """
    if prediction_type == "epsilon":
        return output
    alpha = alpha.to(device=output.device, dtype=torch.float32)
    if prediction_type == "v_prediction":
        return (alpha.sqrt() * output.float() + (1 - alpha).sqrt() * x.float()).to(output.dtype)
    if prediction_type == "sample":
        return ((x.float() - alpha.sqrt() * output.float()) / (1 - alpha).sqrt()).to(output.dtype)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def ddim_inverted_latents(scheduler, predict_noise, source_latents: torch.Tensor) -> list[torch.Tensor]:
    """The reference trajectory by deterministic DDIM inversion of the source latent.

    ``predict_noise(x_t, t)`` returns the UNet's noise prediction for an input in the diffusion (DDPM)
    parametrisation. The inverted latents are returned in the scheduler's own parametrisation (divided by
    ``sqrt(ᾱ_t)`` for sigma-based schedulers such as Euler), ordered like ``scheduler.timesteps``, with the
    source latent last.
    """
    alphas = scheduler.alphas_cumprod.to(source_latents.device, torch.float32)
    timesteps = [int(t) for t in scheduler.timesteps]  # descending
    sigma_based = hasattr(scheduler, "sigmas") and scheduler.init_noise_sigma != 1.0
    x = source_latents.float()
    previous_alpha = torch.tensor(1.0, device=x.device)
    inverted: list[torch.Tensor] = []
    for t in reversed(timesteps):
        alpha = alphas[t]
        eps = predict_noise(x.to(source_latents.dtype), t).float()
        x0 = (x - (1 - previous_alpha).sqrt() * eps) / previous_alpha.sqrt()
        x = alpha.sqrt() * x0 + (1 - alpha).sqrt() * eps
        previous_alpha = alpha
        inverted.append(x / alpha.sqrt() if sigma_based else x)
    inverted.reverse()
    return [latent.to(source_latents.dtype) for latent in inverted] + [source_latents]
