"""Edit masks: the automatic mask (DiffEdit-style) and masks at the resolutions the model works at."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from xmgie.editing.blending import epsilon_from_prediction
from xmgie.editing.blur import resize_mask


def mask_pyramid(masks: torch.Tensor, height: int, width: int) -> dict[int, torch.Tensor]:
    """Flattened (B, h·w) masks for every UNet resolution below a (height, width) latent, keyed by ``h·w``.

    The UNet halves the resolution with stride-2 convolutions (rounding up), so level ``k`` is
    ``ceil(height / 2^k) × ceil(width / 2^k)``.
    """
    pyramid: dict[int, torch.Tensor] = {}
    h, w = height, width
    while True:
        pyramid[h * w] = resize_mask(masks, (h, w)).flatten(1)
        if h == 1 and w == 1:
            return pyramid
        h, w = (h + 1) // 2, (w + 1) // 2


def clean_binary_mask(mask: np.ndarray, min_fraction: float = 0.01) -> np.ndarray:
    """Close small gaps, fill holes and drop specks smaller than ``min_fraction`` of the image."""
    # Closed on an edge-padded copy: closing with a zero border would erode a mask where it meets the image's edge
    # (a full mask would lose its outer ring).
    mask = ndimage.binary_closing(np.pad(mask, 1, mode="edge"), structure=np.ones((3, 3)))[1:-1, 1:-1]
    mask = ndimage.binary_fill_holes(mask)
    labels, count = ndimage.label(mask)
    if count:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
        keep = np.isin(labels, 1 + np.flatnonzero(sizes >= max(1.0, min_fraction * mask.size)))
        if keep.any():
            mask = keep
    return mask


def derived_generators(
    generator: torch.Generator | list[torch.Generator] | None, purpose: str
) -> torch.Generator | list[torch.Generator] | None:
    """Fresh generators seeded from each given generator's seed and ``purpose``, on the same devices.

    A stage that draws noise with these leaves the item's own generator untouched, so whether a neighbour in the
    batch needed that stage cannot change the item's result; the same seed always gives the same draws.
    """
    if generator is None:
        return None
    if isinstance(generator, list):
        return [derived_generators(item, purpose) for item in generator]
    digest = hashlib.sha256(f"{generator.initial_seed()}:{purpose}".encode()).digest()
    return torch.Generator(device=generator.device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@dataclass
class EditMaskEstimate:
    """What the automatic mask saw, per item.

    Attributes:
        masks: (B, 1, h, w) binary latent masks (1 = edit): empty, partial or full.
        difference: (B, h, w) the magnitude of the edit's noise-prediction difference ``ε_edit − ε_null``,
            averaged over channels and draws (noise units, unguided).
        spread: per item, the difference map's standard deviation over its mean (0 for a zero map).
    """

    masks: torch.Tensor
    difference: torch.Tensor
    spread: list[float]

    def fractions(self) -> list[float]:
        """Per item, the fraction of the latent image inside the mask."""
        return [float(value) for value in self.masks.flatten(1).mean(dim=1)]


def threshold_difference_map(
    difference: torch.Tensor,
    *,
    ratio: float = 3.0,
    threshold: float = 0.5,
    min_spread: float = 0.35,
    reference: float = 1.0,
    level: float = 0.0,
    smoothing: float = 0.0,
) -> tuple[np.ndarray, float]:
    """One item's (h, w) difference map to a binary mask, and the map's spread (standard deviation over mean).

    ``smoothing`` above 0 first blurs the map with a Gaussian of that σ (latent pixels), which averages the
    draws' pixel noise away before any threshold. A map that is zero up to float rounding (mean below
    ``1e-6·reference``, the size of the noise prediction) means the conditioning acts nowhere — an empty mask.
    Then one of two rules:

    - ``level`` 0, DiffEdit's rule, relative to the map's own mean: the map is clamped to ``ratio`` times its mean
      and divided by that, then thresholded at ``threshold`` (DiffEdit's ``mask_thresholding_ratio`` and 0.5), so
      a pixel is edited where its difference exceeds ``ratio·threshold`` times the mean. A flat map (spread below
      ``min_spread``), or one where no pixel passes, means the edit acts about equally everywhere — a full mask.
      The rule finds *where* an edit acts most but cannot tell a global edit of uneven strength (a brightening
      acts more on dark pixels) from a local one: both maps have a mean and pixels above it.
    - ``level`` above 0, an absolute rule: a pixel is edited where the difference exceeds ``level`` (noise
      units). A global edit then covers the image; a local one its region, as long as ``level`` lies between
      the model's residual difference where the edit changes nothing and the difference its edits make.
      No pixel above it: an empty mask (the edit changes nothing the model can see).
    """
    values = difference.double().cpu().numpy()
    if smoothing > 0:
        values = ndimage.gaussian_filter(values, smoothing, mode="nearest")
    mean = float(values.mean())
    if mean <= 1e-6 * reference:
        return np.zeros(values.shape, dtype=bool), 0.0
    spread = float(values.std()) / mean
    if level > 0:
        selected = values > level
        return (clean_binary_mask(selected) if selected.any() else selected), spread
    clamp = ratio * mean
    selected = np.clip(values, 0.0, clamp) / clamp > threshold
    if spread < min_spread or not selected.any():
        return np.ones(values.shape, dtype=bool), spread
    return clean_binary_mask(selected), spread


@torch.no_grad()
def estimate_edit_masks(
    unet,
    scheduler,
    image_latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    *,
    latent_scale: float,
    generator: torch.Generator | list[torch.Generator] | None,
    draws: int = 8,
    strength: float = 0.5,
    ratio: float = 3.0,
    threshold: float = 0.5,
    min_spread: float = 0.35,
    level: float = 0.0,
    smoothing: float = 0.0,
    chunk: int = 16,
) -> EditMaskEstimate:
    """Where the edit conditioning changes the model's noise prediction: binary latent masks, one per item.

    DiffEdit's recipe (diffusers' ``StableDiffusionDiffEditPipeline.generate_mask``) on InstructPix2Pix: the
    source latent is noised to ``strength`` of the training schedule with ``draws`` noises; the UNet predicts the
    noise with the edit conditioning and with the null conditioning, both seeing the source image (a model that
    predicts ``v`` or the sample has its output turned into the noise it implies). The magnitude of
    ``ε_edit − ε_null`` — the direction text guidance scales — averaged over channels and draws, is thresholded
    per item by :func:`threshold_difference_map` (``smoothing``, ``level`` and the relative rule's ``ratio``,
    ``threshold``, ``min_spread``). The ``2·draws·B`` rows go through the UNet ``chunk``
    rows at a time (the same result as one call, in bounded memory). ``image_latents`` are the unscaled source
    latents InstructPix2Pix conditions on; ``latent_scale`` is the VAE's scaling factor. Each item's draws come
    from its own generator in ``generator`` (a list, one per item), so its mask does not depend on its neighbours.
    """
    from diffusers.utils.torch_utils import randn_tensor

    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of rows, got {chunk}")
    batch = image_latents.shape[0]
    device, dtype = image_latents.device, unet.dtype
    source = image_latents.to(dtype) * latent_scale
    timestep = int(round(strength * (len(scheduler.alphas_cumprod) - 1)))
    alpha = scheduler.alphas_cumprod[timestep].to(device=device, dtype=torch.float32)

    noises = [randn_tensor(source.shape, generator=generator, device=device, dtype=dtype) for _ in range(draws)]
    noisy = torch.cat([(alpha.sqrt() * source.float() + (1 - alpha).sqrt() * n.float()).to(dtype) for n in noises])
    both = torch.cat([noisy, noisy])  # the edit rows, then the null rows, on the same draws
    model_input = torch.cat([both, image_latents.to(dtype).repeat(2 * draws, 1, 1, 1)], dim=1)
    conditioning = torch.cat([prompt_embeds.repeat(draws, 1, 1), negative_prompt_embeds.repeat(draws, 1, 1)])
    conditioning = conditioning.to(device=device, dtype=dtype)
    predictions = [
        unet(
            model_input[start : start + chunk],
            timestep,
            encoder_hidden_states=conditioning[start : start + chunk],
            return_dict=False,
        )[0].float()
        for start in range(0, model_input.shape[0], chunk)
    ]
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    noise = epsilon_from_prediction(torch.cat(predictions), both.float(), alpha, prediction_type)
    edit, null = noise.float().chunk(2)
    difference = (edit - null).abs().mean(dim=1).view(draws, batch, *edit.shape[-2:]).mean(dim=0)
    reference = null.abs().mean(dim=(1, 2, 3)).view(draws, batch).mean(dim=0)

    masks, spread = [], []
    for row in range(batch):
        mask, item_spread = threshold_difference_map(
            difference[row],
            ratio=ratio,
            threshold=threshold,
            min_spread=min_spread,
            reference=float(reference[row]),
            level=level,
            smoothing=smoothing,
        )
        masks.append(mask)
        spread.append(item_spread)
    masks_tensor = torch.from_numpy(np.stack(masks)[:, None].astype(np.float32)).to(device)
    return EditMaskEstimate(masks=masks_tensor, difference=difference, spread=spread)
