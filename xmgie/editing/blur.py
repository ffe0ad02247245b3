"""Gaussian blurring (GB): soft edit masks from a spatially varying Gaussian blur of the hard mask.

The blur's standard deviation depends on the distance ``D`` of each pixel to the mask boundary::

    σ(D) = σ_max · exp(−D² / (2 σ_s²))        (defaults σ_max = 5, σ_s = 10, D in pixels)

so the mask is blurred most at its boundary and not at all far from it. The soft mask ``M̃`` feeds
feature blending and the final pixel composite ``out = M̃ · edit + (1 − M̃) · source``.

Distance convention (:func:`boundary_distance`): a pixel is inside the mask when its value is at least 0.5.
The boundary is the crack between pixels, half a pixel from the centres of the pixels on either side of it, so

* inside the mask, ``D = edt(mask) − 0.5``: the distance to the nearest pixel outside the mask, less half a pixel;
* outside the mask, ``D = edt(~mask) − 0.5``: the distance to the nearest pixel inside the mask, less half a pixel;

where ``edt`` is :func:`scipy.ndimage.distance_transform_edt` (Euclidean distance between pixel centres to the
nearest zero). Pixels next to the boundary have ``D = 0.5`` (edge neighbours) or ``D ≈ 0.91`` (diagonal only) on
both sides. An empty or a full mask has no boundary: ``D = +inf`` everywhere, hence ``σ = 0`` and the soft mask
equals the hard one.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

DEFAULT_SIGMA_MAX = 5.0
"""σ of the blur at the mask boundary, in pixels."""

DEFAULT_SIGMA_S = 10.0
"""Distance scale, in pixels, over which σ falls off away from the boundary."""

DEFAULT_NUM_LEVELS = 9
"""Fixed-σ blurs between which :func:`spatially_varying_blur` interpolates, the unblurred level included."""

KERNEL_TRUNCATE = 3.0
"""Gaussian kernels are cut off at this many standard deviations (radius ``ceil(3σ)``)."""

MASK_THRESHOLD = 0.5
"""Mask values at or above this are inside the mask."""


def _binarise(mask: torch.Tensor) -> torch.Tensor:
    return mask >= MASK_THRESHOLD


def _check_spatial(mask: torch.Tensor, name: str) -> None:
    if mask.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (H, W), got shape {tuple(mask.shape)}")


def _distance_from_binary(inside: torch.Tensor) -> torch.Tensor:
    """Boundary distance of a boolean (..., H, W) mask, each 2-D slice on its own; float32 on the mask's device."""
    planes = inside.detach().to("cpu").reshape(-1, *inside.shape[-2:]).numpy()
    distances = np.empty(planes.shape, dtype=np.float32)
    for index, plane in enumerate(planes):
        if plane.all() or not plane.any():
            distances[index] = np.inf
            continue
        # edt measures, for each nonzero pixel, the distance to the nearest zero pixel.
        to_outside = ndimage.distance_transform_edt(plane)
        to_inside = ndimage.distance_transform_edt(~plane)
        distances[index] = np.where(plane, to_outside, to_inside) - 0.5
    return torch.from_numpy(distances).reshape(inside.shape).to(inside.device)


def boundary_distance(mask: torch.Tensor) -> torch.Tensor:
    """Euclidean distance, in pixels, from each pixel to the boundary of a mask.

    Args:
        mask: (H, W) mask with values in [0, 1], binarised at 0.5 (values ≥ 0.5 are inside). Leading dimensions
            (..., H, W) are accepted too; each 2-D slice is treated on its own.

    Returns:
        float32 tensor of the mask's shape on the mask's device: ``edt − 0.5`` where ``edt`` is the distance between
        pixel centres to the nearest pixel on the other side of the boundary (see the module docstring), ``+inf``
        everywhere for an empty or a full mask. Computed with SciPy on the CPU.
    """
    _check_spatial(mask, "mask")
    return _distance_from_binary(_binarise(mask))


def _sigma_from_distance(distance: torch.Tensor, sigma_max: float, sigma_s: float) -> torch.Tensor:
    if not (math.isfinite(sigma_max) and sigma_max >= 0):
        raise ValueError(f"sigma_max must be a finite number >= 0, got {sigma_max!r}")
    if not (math.isfinite(sigma_s) and sigma_s > 0):
        raise ValueError(f"sigma_s must be a finite number > 0, got {sigma_s!r}")
    return sigma_max * torch.exp(-(distance**2) / (2.0 * sigma_s**2))


def sigma_map(
    mask: torch.Tensor, sigma_max: float = DEFAULT_SIGMA_MAX, sigma_s: float = DEFAULT_SIGMA_S
) -> torch.Tensor:
    """Per-pixel blur σ for a mask: ``σ_max · exp(−D² / (2 σ_s²))`` with ``D`` from :func:`boundary_distance`.

    Args:
        mask: (H, W) (or (..., H, W)) mask with values in [0, 1], binarised at 0.5.
        sigma_max: σ at the boundary, in pixels (≥ 0).
        sigma_s: distance scale of the fall-off, in pixels (> 0).

    Returns:
        float32 tensor of the mask's shape on the mask's device; 0 everywhere for an empty or a full mask.
    """
    return _sigma_from_distance(boundary_distance(mask), sigma_max, sigma_s)


def _reflect_indices(size: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices that pad a dimension of ``size`` by ``radius`` on each side by reflection (``d c b | a b c d``).

    Unlike ``F.pad(mode="reflect")`` this folds back and forth, so the padding may be wider than the dimension.
    """
    positions = torch.arange(-radius, size + radius, device=device)
    if size == 1:
        return torch.zeros_like(positions)
    period = 2 * (size - 1)
    positions = torch.remainder(positions, period)
    return torch.where(positions >= size, period - positions, positions)


def _gaussian_blur(planes: torch.Tensor, sigma: float) -> torch.Tensor:
    """Fixed-σ separable Gaussian blur of (N, 1, H, W) planes, kernel radius ``ceil(3σ)``, reflect padding."""
    radius = math.ceil(KERNEL_TRUNCATE * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(offsets**2) / (2.0 * sigma**2))
    kernel = (kernel / kernel.sum()).to(device=planes.device, dtype=planes.dtype)
    height, width = planes.shape[-2:]
    padded = planes.index_select(-1, _reflect_indices(width, radius, planes.device))
    blurred = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    padded = blurred.index_select(-2, _reflect_indices(height, radius, planes.device))
    return F.conv2d(padded, kernel.view(1, 1, -1, 1))


def _as_batched(image: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) image and (B or 1, 1, H, W) σ views of the accepted input shapes."""
    if image.dim() == 2:
        image4 = image[None, None]
    elif image.dim() == 3:
        image4 = image[None]
    elif image.dim() == 4:
        image4 = image
    else:
        raise ValueError(f"image must be (H, W), (C, H, W) or (B, C, H, W), got shape {tuple(image.shape)}")
    if sigma.dim() == 2:
        sigma4 = sigma[None, None]
    elif sigma.dim() == 3 and sigma.shape[0] in (1, image4.shape[0]):
        sigma4 = sigma[:, None]
    else:
        raise ValueError(
            f"sigma must be (H, W) or (B, H, W) with B equal to the image's batch size, got shape {tuple(sigma.shape)}"
            f" for an image of shape {tuple(image.shape)}"
        )
    if sigma4.shape[-2:] != image4.shape[-2:]:
        raise ValueError(f"sigma's size {tuple(sigma.shape[-2:])} differs from the image's {tuple(image.shape[-2:])}")
    return image4, sigma4


def spatially_varying_blur(
    image: torch.Tensor, sigma: torch.Tensor, num_levels: int = DEFAULT_NUM_LEVELS
) -> torch.Tensor:
    """Gaussian blur whose standard deviation varies from pixel to pixel.

    The image is blurred with ``num_levels`` fixed σ values ``σ_k = linspace(0, σ.max(), num_levels)`` (level 0 is
    the image itself); each blur is two 1-D convolutions with a kernel of radius ``ceil(3σ_k)`` over reflect-padded
    planes. Each output pixel is the linear interpolation, in σ, between the two adjacent levels bracketing its σ.
    Each pixel thus only sees input within ``ceil(3σ_k)`` pixels (per axis) for the upper bracketing level ``k``.

    Half-precision images are blurred in float32 and cast back, so they work on the CPU too and the weights of wide
    kernels do not lose precision.

    Args:
        image: (B, C, H, W), (C, H, W) or (H, W) floating-point tensor.
        sigma: (H, W) or (B, H, W) map of σ ≥ 0 in pixels, moved to the image's device; one map per batch item
            or one for all.
        num_levels: number of fixed-σ levels, at least 2.

    Returns:
        The blurred image, with the image's shape, dtype and device. Pixels with σ = 0 hold exactly the input value.
    """
    if not image.is_floating_point():
        raise TypeError(f"image must be a floating-point tensor, got {image.dtype}")
    if num_levels < 2:
        raise ValueError(f"num_levels must be at least 2, got {num_levels}")
    image4, sigma4 = _as_batched(image, sigma)
    if image.numel() == 0:
        return image.clone()
    compute_dtype = torch.promote_types(image.dtype, torch.float32)
    sigma4 = sigma4.to(device=image.device, dtype=compute_dtype)
    sigma_min, sigma_top = torch.aminmax(sigma4)
    sigma_min, sigma_top = sigma_min.item(), sigma_top.item()
    if not math.isfinite(sigma_top) or sigma_min < 0:
        raise ValueError(f"sigma must be finite and >= 0, got values in [{sigma_min}, {sigma_top}]")
    if sigma_top == 0:
        return image.clone()

    batch, channels, height, width = image4.shape
    planes = image4.to(compute_dtype).reshape(batch * channels, 1, height, width)
    position = (sigma4 / sigma_top * (num_levels - 1)).clamp(0, num_levels - 1)
    lower = position.floor().clamp(max=num_levels - 2)
    fraction = position - lower
    blended = torch.zeros(batch, channels, height, width, dtype=compute_dtype, device=image.device)
    for level in range(num_levels):
        weight = torch.where(lower == level, 1 - fraction, 0) + torch.where(lower == level - 1, fraction, 0)
        level_sigma = level * sigma_top / (num_levels - 1)
        level_planes = planes if level == 0 else _gaussian_blur(planes, level_sigma)
        blended += weight * level_planes.reshape(batch, channels, height, width)
    # Interpolation leaves 1·x + 0·y, which is not x bit for bit when x is -0.0 or y is not finite.
    blended = torch.where(sigma4 == 0, image4, blended.to(image.dtype))
    return blended.reshape(image.shape)


def soften_mask(
    mask: torch.Tensor,
    sigma_max: float = DEFAULT_SIGMA_MAX,
    sigma_s: float = DEFAULT_SIGMA_S,
    num_levels: int = DEFAULT_NUM_LEVELS,
) -> torch.Tensor:
    """Soft mask ``M̃``: the hard mask blurred by :func:`spatially_varying_blur` with σ from :func:`sigma_map`.

    The mask is binarised at 0.5 first, so the blur acts on exactly the mask that the distances describe. The result
    is clamped to [0, 1], then every pixel whose centre is more than ``3·σ_max`` from the nearest pixel on the other
    side of the boundary (``D > 3·σ_max − 0.5``) is set to its hard value: exactly 0 outside, exactly 1 inside.
    With the default σ_s the blur already yields 0 there and 1 up to float rounding (about 1e-7), because σ has
    fallen well below σ_max at that distance. The explicit assignment keeps the guarantee for any σ_s: separable
    kernels have square support, whose corners reach ``√2 · 3σ`` away, so with a slow fall-off a far pixel's kernel
    corner could touch the mask with a weight around 1e-4.

    Args:
        mask: (H, W) or (B, 1, H, W) hard mask, 1 = edit.
        sigma_max: σ at the boundary, in pixels.
        sigma_s: distance scale of σ's fall-off, in pixels.
        num_levels: fixed-σ levels of the blur.

    Returns:
        Soft mask of the mask's shape and device; the mask's dtype if floating point, else float32. Equal to the
        (binarised) hard mask for an empty or a full mask.
    """
    if mask.dim() not in (2, 4) or (mask.dim() == 4 and mask.shape[1] != 1):
        raise ValueError(f"mask must be (H, W) or (B, 1, H, W), got shape {tuple(mask.shape)}")
    dtype = mask.dtype if mask.is_floating_point() else torch.float32
    inside = _binarise(mask)
    distance = _distance_from_binary(inside)
    sigma = _sigma_from_distance(distance, sigma_max, sigma_s)
    hard = inside.to(dtype)
    if mask.dim() == 4:
        sigma = sigma[:, 0]
    soft = spatially_varying_blur(hard, sigma, num_levels).clamp(0, 1)
    settled = distance > KERNEL_TRUNCATE * sigma_max - 0.5
    return torch.where(settled, hard, soft)


def composite(edit: torch.Tensor, source: torch.Tensor, soft_mask: torch.Tensor) -> torch.Tensor:
    """Blend an edit into its source: ``soft_mask · edit + (1 − soft_mask) · source``.

    Args:
        edit: edited image, e.g. (B, C, H, W), (C, H, W) or (H, W, C); floating point.
        source: source image, broadcastable against ``edit``.
        soft_mask: mask in [0, 1] broadcastable against the images, e.g. (H, W) or (B, 1, H, W) for channel-first
            images; moved to the edit's device.

    Returns:
        The blend in the promoted dtype of ``edit`` and ``source``. Where the mask is 0 it equals ``source``
        exactly and where it is 1 it equals ``edit`` exactly.
    """
    dtype = torch.promote_types(edit.dtype, source.dtype)
    if not dtype.is_floating_point:
        raise TypeError(f"edit and source must be floating point, got {edit.dtype} and {source.dtype}")
    edit = edit.to(dtype)
    source = source.to(dtype)
    mask = soft_mask.to(device=edit.device, dtype=dtype)
    blended = mask * edit + (1 - mask) * source
    # The arithmetic form is off by rounding (and by the sign of zero) at the mask's extremes.
    blended = torch.where(mask == 1, edit, blended)
    return torch.where(mask == 0, source, blended)


def _image_array(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.float32))


def composite_images(edit: Image.Image, source: Image.Image, soft_mask: torch.Tensor | Image.Image) -> Image.Image:
    """:func:`composite` on 8-bit images: blend ``edit`` into ``source`` through ``soft_mask``.

    Args:
        edit: edited image, converted to RGB.
        source: source image of the same size, converted to RGB.
        soft_mask: (H, W) float tensor in [0, 1] (leading singleton dimensions allowed; values are clamped to
            [0, 1]) or an ``L`` image (0–255 read as 0–1), of the images' size.

    Returns:
        RGB image computed in float32 and rounded to the nearest integer. Where the mask is 0 its pixels equal the
        source's and where it is 1 the edit's.
    """
    if edit.size != source.size:
        raise ValueError(f"edit and source sizes differ: {edit.size} and {source.size}")
    width, height = source.size
    if isinstance(soft_mask, Image.Image):
        if soft_mask.size != source.size:
            raise ValueError(f"mask size {soft_mask.size} differs from the images' {source.size}")
        mask = torch.from_numpy(np.array(soft_mask.convert("L"), dtype=np.float32) / 255.0)
    else:
        if soft_mask.shape[-2:] != (height, width) or soft_mask.numel() != height * width:
            raise ValueError(f"mask shape {tuple(soft_mask.shape)} does not match the images' size {(height, width)}")
        mask = soft_mask.detach().to("cpu", torch.float32).reshape(height, width).clamp(0, 1)
    blended = composite(_image_array(edit), _image_array(source), mask[..., None])
    return Image.fromarray(blended.round().clamp(0, 255).to(torch.uint8).numpy())


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a soft mask: area averaging along axes that shrink, bilinear interpolation along axes that grow.

    Shrinking uses adaptive average pooling, which is ``F.interpolate(mode="area")`` and also handles non-integer
    factors. When one axis shrinks and the other grows the mask is first averaged down, then interpolated up.

    Args:
        mask: (H, W) or (B, 1, H, W) mask with values in [0, 1].
        size: target (height, width), both positive.

    Returns:
        Resized mask of shape (height, width) or (B, 1, height, width), values in [0, 1], on the mask's device; the
        mask's dtype if floating point, else float32. Half precision is resized in float32 and cast back.
    """
    target_height, target_width = size
    if target_height <= 0 or target_width <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if mask.dim() not in (2, 4) or (mask.dim() == 4 and mask.shape[1] != 1):
        raise ValueError(f"mask must be (H, W) or (B, 1, H, W), got shape {tuple(mask.shape)}")
    dtype = mask.dtype if mask.is_floating_point() else torch.float32
    planes = (mask[None, None] if mask.dim() == 2 else mask).to(torch.promote_types(dtype, torch.float32))
    height, width = planes.shape[-2:]
    shrunk = (min(target_height, height), min(target_width, width))
    if shrunk != (height, width):
        planes = F.adaptive_avg_pool2d(planes, shrunk)
    if shrunk != (target_height, target_width):
        planes = F.interpolate(planes, size=(target_height, target_width), mode="bilinear", align_corners=False)
    resized = planes.clamp(0, 1).to(dtype)
    return resized[0, 0] if mask.dim() == 2 else resized
