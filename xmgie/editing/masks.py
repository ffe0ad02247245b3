"""Edit masks: the automatic mask (DiffEdit-style) and masks at the resolutions the model works at."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

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
    mask = ndimage.binary_closing(mask, structure=np.ones((3, 3)), border_value=0)
    mask = ndimage.binary_fill_holes(mask)
    labels, count = ndimage.label(mask)
    if count:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
        keep = np.isin(labels, 1 + np.flatnonzero(sizes >= max(1.0, min_fraction * mask.size)))
        if keep.any():
            mask = keep
    return mask


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
    threshold: float = 0.5,
) -> torch.Tensor:
    """Where the edit conditioning changes the model's noise prediction: (B, 1, h, w) binary latent masks.

    DiffEdit's recipe on InstructPix2Pix: the source latent is noised to ``strength`` of the training
    schedule with ``draws`` noises; the UNet predicts the noise with the edit conditioning and with the
    null conditioning (both seeing the source image); the absolute difference, averaged over channels and
    draws, is scaled between its minimum and maximum per item, thresholded and cleaned. ``image_latents`` are the
    unscaled source latents InstructPix2Pix conditions on; ``latent_scale`` is the VAE's scaling factor.
    """
    from diffusers.utils.torch_utils import randn_tensor

    batch = image_latents.shape[0]
    device, dtype = image_latents.device, unet.dtype
    source = image_latents.to(dtype) * latent_scale
    timestep = int(round(strength * (len(scheduler.alphas_cumprod) - 1)))
    alpha = scheduler.alphas_cumprod[timestep].to(device=device, dtype=torch.float32)

    noises = [randn_tensor(source.shape, generator=generator, device=device, dtype=dtype) for _ in range(draws)]
    noisy = torch.cat([(alpha.sqrt() * source.float() + (1 - alpha).sqrt() * n.float()).to(dtype) for n in noises])
    model_input = torch.cat([torch.cat([noisy, noisy]), image_latents.to(dtype).repeat(2 * draws, 1, 1, 1)], dim=1)
    conditioning = torch.cat([prompt_embeds.repeat(draws, 1, 1), negative_prompt_embeds.repeat(draws, 1, 1)])
    noise_pred = unet(model_input, timestep, encoder_hidden_states=conditioning.to(dtype), return_dict=False)[0]
    edit, null = noise_pred.float().chunk(2)
    difference = (edit - null).abs().mean(dim=1).view(draws, batch, *edit.shape[-2:]).mean(dim=0)

    masks = []
    for item in difference.cpu().numpy():
        # Min-max scaling: the UNet's receptive field leaves a floor of difference everywhere, so the
        # threshold is taken between the floor and the peak rather than between zero and the peak.
        span = item.max() - item.min()
        scaled = (item - item.min()) / span if span > 0 else np.zeros_like(item)
        masks.append(clean_binary_mask(scaled >= threshold))
    return torch.from_numpy(np.stack(masks)[:, None].astype(np.float32)).to(device)
