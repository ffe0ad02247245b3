"""Progressive feature blending (PFB): the outside of the mask follows a reference branch of the source.

A reference branch follows the source image through the same timesteps. At chosen UNet blocks the
edit branches' output features become ``m·f_edit + (1 − m)·f_ref`` with the mask resized to the
features' resolution, and during the first part of the schedule the latents are blended the same way.

The reference branch rides in the same UNet call as the guidance branches: UNet blocks act on each
sample independently, so a forward hook on a block can blend the edit rows with the reference rows of
the same batch. :class:`FeatureBlender` also has a sequential mode (reference in its own UNet call, its
features recorded and blended into the next call) that serves as the obvious design the batched one is
checked against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from xmgie.editing.blur import resize_mask


@dataclass
class FeatureBlender:
    """Forward hooks on UNet blocks that blend edit features with reference features.

    Attributes:
        masks: (B, 1, H, W) soft edit masks (1 = edit) at latent or pixel resolution; resized per block.
        num_branches: guidance branches per item before the reference branch (3 with guidance, else 1).
        mode: ``batched`` (reference rows are the last ``B`` rows of the same call), ``record`` (this call
            is the reference alone: store its features) or ``blend`` (blend with the stored features).
    """

    masks: torch.Tensor
    num_branches: int
    mode: str = "batched"
    recorded: dict[str, torch.Tensor] = field(default_factory=dict)
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
        """Register the hooks on ``blocks`` (module names such as ``mid_block`` or ``up_blocks.1``).

        In batched mode the reference rows are dropped after the last blended block: nothing downstream
        needs them, so the decoder blocks after it (the costly high-resolution ones with the default
        blocks) run on the edit rows only.
        """
        modules = dict(unet.named_modules())
        order = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + ["mid_block"]
        order += [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
        for name in blocks:
            if name not in modules:
                raise ValueError(f"the UNet has no block {name!r}")
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))
        if self.mode == "batched" and blocks:
            self._last_block = max(blocks, key=order.index)
            downstream = order[order.index(self._last_block) + 1 :]
            if any(name.startswith("down_blocks") for name in downstream):
                # Skip connections of later down blocks still carry reference rows; keep every row then.
                self._last_block = None
            else:
                for name in downstream:
                    hook = modules[name].register_forward_pre_hook(self._drop_reference_rows, with_kwargs=True)
                    self._handles.append(hook)
        return self

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
