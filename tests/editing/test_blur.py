from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from xmgie.editing.blur import (
    DEFAULT_SIGMA_MAX,
    DEFAULT_SIGMA_S,
    boundary_distance,
    composite,
    composite_images,
    resize_mask,
    sigma_map,
    soften_mask,
    spatially_varying_blur,
)

FAR = 3 * DEFAULT_SIGMA_MAX


def _square_mask(size: int = 96, low: int = 30, high: int = 66) -> torch.Tensor:
    mask = torch.zeros(size, size)
    mask[low:high, low:high] = 1
    return mask


def _disc_mask(size: int = 96, radius: float = 22.0) -> torch.Tensor:
    rows, columns = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ((rows - size / 2) ** 2 + (columns - size / 3) ** 2 <= radius**2).float()


def _edge_mask(height: int = 16, width: int = 96, edge: int = 48) -> torch.Tensor:
    """Inside (1) left of column ``edge``, outside right of it: a straight vertical boundary."""
    mask = torch.zeros(height, width)
    mask[:, :edge] = 1
    return mask


def _centre_distances(mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Distance between pixel centres to the nearest pixel outside (for inside pixels) and inside (for outside)."""
    inside = mask.numpy() >= 0.5
    return ndimage.distance_transform_edt(inside), ndimage.distance_transform_edt(~inside)


def _reference_distance(mask: torch.Tensor) -> np.ndarray:
    to_outside, to_inside = _centre_distances(mask)
    return np.where(mask.numpy() >= 0.5, to_outside, to_inside) - 0.5


def _reference_sigma(mask: torch.Tensor, sigma_max: float = 5.0, sigma_s: float = 10.0) -> np.ndarray:
    return sigma_max * np.exp(-(_reference_distance(mask) ** 2) / (2 * sigma_s**2))


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(
        {torch.float16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}[tensor.dtype]
    )


@pytest.mark.parametrize("mask", [_square_mask(), _disc_mask()], ids=["square", "disc"])
def test_sigma_map_matches_the_formula(mask):
    sigma = sigma_map(mask)
    reference = _reference_sigma(mask)
    assert sigma.dtype == torch.float32 and sigma.shape == mask.shape
    assert np.abs(sigma.numpy() - reference).max() < 1e-5

    distance = _reference_distance(mask)
    at_boundary = sigma.numpy()[distance == 0.5]
    assert at_boundary.size > 0
    assert np.all(np.abs(at_boundary - DEFAULT_SIGMA_MAX) < 0.01)


def test_sigma_map_parameters_and_far_field():
    mask = _disc_mask(size=160, radius=10.0)
    sigma = sigma_map(mask, sigma_max=3.0, sigma_s=4.0)
    assert np.abs(sigma.numpy() - _reference_sigma(mask, 3.0, 4.0)).max() < 1e-5
    assert sigma[0, 0] < 1e-6 and sigma[-1, -1] < 1e-6
    assert sigma.max() <= 3.0


def test_boundary_distance_is_half_a_pixel_on_both_sides_of_the_edge():
    distance = boundary_distance(_edge_mask())
    assert distance.dtype == torch.float32
    row = distance[8]
    assert row[47].item() == 0.5 and row[48].item() == 0.5
    assert row[46].item() == 1.5 and row[49].item() == 1.5
    assert row[0].item() == 47.5 and row[95].item() == 47.5


def test_boundary_distance_binarises_at_one_half():
    mask = torch.full((8, 8), 0.4)
    mask[:, :4] = 0.6
    assert torch.equal(boundary_distance(mask), boundary_distance((mask >= 0.5).float()))


@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_empty_and_full_masks_have_no_boundary(fill):
    mask = torch.full((12, 10), fill)
    assert torch.isinf(boundary_distance(mask)).all()
    assert torch.equal(sigma_map(mask), torch.zeros(12, 10))


def test_constant_sigma_matches_scipy_gaussian_filter():
    image = torch.rand(40, 52, generator=torch.Generator().manual_seed(0))
    blurred = spatially_varying_blur(image, torch.full((40, 52), 2.0))
    reference = ndimage.gaussian_filter(image.numpy().astype(np.float64), 2.0, mode="reflect", truncate=3)
    assert np.abs(blurred.numpy() - reference)[6:-6, 6:-6].max() < 1e-4
    assert blurred.dtype == torch.float32 and blurred.shape == image.shape


def test_zero_sigma_returns_the_input_bit_for_bit():
    image = torch.randn(2, 3, 20, 24, generator=torch.Generator().manual_seed(1))
    image[0, 0, 0, :4] = torch.tensor([-0.0, 0.0, 1e-30, -1e-30])
    assert torch.equal(_bits(spatially_varying_blur(image, torch.zeros(20, 24))), _bits(image))

    sigma = torch.zeros(20, 24)
    sigma[:, 12:] = 3.0
    blurred = spatially_varying_blur(image, sigma)
    assert torch.equal(_bits(blurred[..., :12]), _bits(image[..., :12]))
    assert not torch.equal(blurred[..., 12:], image[..., 12:])


def test_sigma_between_two_levels_lies_between_their_results():
    image = torch.rand(32, 32, generator=torch.Generator().manual_seed(2))
    # With σ.max() = 2 and 9 levels, the levels are 0, 0.25, …, 2: σ = 1.1 lies between 1.0 and 1.25.
    sigma = torch.full((32, 32), 1.1)
    sigma[0] = 2.0
    blurred = spatially_varying_blur(image, sigma)[1:]
    at_lower = spatially_varying_blur(image, torch.full((32, 32), 1.0))[1:]
    at_upper = spatially_varying_blur(image, torch.full((32, 32), 1.25))[1:]
    low, high = torch.minimum(at_lower, at_upper), torch.maximum(at_lower, at_upper)
    assert torch.all(blurred >= low - 1e-6) and torch.all(blurred <= high + 1e-6)
    # Linear interpolation at 40% of the way from 1.0 to 1.25.
    assert torch.allclose(blurred, 0.6 * at_lower + 0.4 * at_upper, atol=1e-6)
    assert not torch.allclose(blurred, at_lower, atol=1e-4) and not torch.allclose(blurred, at_upper, atol=1e-4)


def test_batched_images_with_one_sigma_map_per_item():
    image = torch.rand(2, 3, 30, 34, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sigma = torch.stack([torch.full((30, 34), 2.0), torch.zeros(30, 34)])
    blurred = spatially_varying_blur(image, sigma)
    assert blurred.shape == image.shape and blurred.dtype == torch.float64
    for channel in range(3):
        reference = ndimage.gaussian_filter(image[0, channel].numpy(), 2.0, mode="reflect", truncate=3)
        assert np.abs(blurred[0, channel].numpy() - reference)[6:-6, 6:-6].max() < 1e-10
    assert torch.equal(blurred[1], image[1])

    shared = spatially_varying_blur(image, torch.full((30, 34), 2.0))
    assert torch.allclose(shared[0], blurred[0])
    assert torch.allclose(spatially_varying_blur(image[0], torch.full((30, 34), 2.0)), blurred[0])


def test_float16_on_the_cpu():
    image = torch.rand(1, 2, 24, 24, generator=torch.Generator().manual_seed(4))
    sigma = sigma_map(_square_mask(size=24, low=8, high=16))
    blurred = spatially_varying_blur(image.half(), sigma)
    assert blurred.dtype == torch.float16
    assert torch.allclose(blurred.float(), spatially_varying_blur(image, sigma), atol=2e-3)


def test_kernels_wider_than_the_image_fold_back_by_reflection():
    image = torch.rand(5, 7, generator=torch.Generator().manual_seed(5))
    blurred = spatially_varying_blur(image, torch.full((5, 7), 4.0))
    assert torch.isfinite(blurred).all()
    assert blurred.min() >= image.min() - 1e-6 and blurred.max() <= image.max() + 1e-6
    assert blurred.std() < image.std()


def test_invalid_blur_inputs_are_rejected():
    image = torch.rand(8, 8)
    with pytest.raises(ValueError):
        spatially_varying_blur(image, torch.full((8, 8), -1.0))
    with pytest.raises(ValueError):
        spatially_varying_blur(image, torch.full((8, 8), math.nan))
    with pytest.raises(ValueError):
        spatially_varying_blur(image, torch.zeros(8, 9))
    with pytest.raises(ValueError):
        spatially_varying_blur(image, torch.zeros(8, 8), num_levels=1)
    with pytest.raises(TypeError):
        spatially_varying_blur(torch.zeros(8, 8, dtype=torch.uint8), torch.zeros(8, 8))


@pytest.mark.parametrize("mask", [_square_mask(), _disc_mask()], ids=["square", "disc"])
def test_soft_mask_is_exact_far_from_the_boundary(mask):
    soft = soften_mask(mask)
    to_outside, to_inside = _centre_distances(mask)
    inside = mask.numpy() >= 0.5
    far_outside = ~inside & (to_inside > FAR)
    deep_inside = inside & (to_outside > FAR)
    assert far_outside.any() and deep_inside.any()
    assert np.all(soft.numpy()[far_outside] == 0)
    assert np.all(soft.numpy()[deep_inside] == 1)

    at_boundary = soft.numpy()[_reference_distance(mask) == 0.5]
    assert np.all((at_boundary > 0) & (at_boundary < 1))
    assert soft.min() >= 0 and soft.max() <= 1

    # With the default fall-off the blur itself already reaches these values; only rounding is left inside.
    blurred = spatially_varying_blur(mask, sigma_map(mask))
    assert np.all(blurred.numpy()[far_outside] == 0)
    assert np.abs(blurred.numpy()[deep_inside] - 1).max() < 1e-6


def test_soft_mask_is_exact_far_from_the_boundary_with_a_slow_fall_off():
    mask = _square_mask(size=100, low=35, high=65)
    soft = soften_mask(mask, sigma_s=1000.0)
    to_outside, to_inside = _centre_distances(mask)
    inside = mask.numpy() >= 0.5
    assert np.all(soft.numpy()[~inside & (to_inside > FAR)] == 0)
    assert np.all(soft.numpy()[inside & (to_outside > FAR)] == 1)
    # The blur alone leaks through the corners of its square kernels there.
    blurred = spatially_varying_blur(mask, sigma_map(mask, sigma_s=1000.0)).numpy()
    assert blurred[~inside & (to_inside > FAR)].max() > 0


def test_soft_mask_is_monotone_across_a_straight_edge():
    soft = soften_mask(_edge_mask())
    for row in soft.numpy():
        steps = np.diff(row)
        assert np.all(steps <= 0)
        assert np.sum(steps < 0) >= 10
        assert 0 < row[47] < 1 and 0 < row[48] < 1
        assert row[47] > 0.5 > row[48]


@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_empty_and_full_masks_are_unchanged(fill):
    mask = torch.full((20, 30), fill)
    assert torch.equal(soften_mask(mask), mask)


def test_soften_mask_batched_matches_single_masks():
    masks = torch.stack([_square_mask(size=48, low=10, high=30), torch.zeros(48, 48), torch.ones(48, 48)])[:, None]
    soft = soften_mask(masks)
    assert soft.shape == (3, 1, 48, 48) and soft.dtype == torch.float32
    for index in range(3):
        assert torch.allclose(soft[index, 0], soften_mask(masks[index, 0]), atol=1e-6)
    assert torch.equal(soft[1:], masks[1:])


def test_soften_mask_binarises_and_keeps_the_dtype():
    mask = _square_mask(size=40, low=10, high=30) * 0.8
    assert torch.equal(soften_mask(mask), soften_mask((mask >= 0.5).float()))
    assert soften_mask(mask.double()).dtype == torch.float64
    assert soften_mask(mask >= 0.5).dtype == torch.float32
    with pytest.raises(ValueError):
        soften_mask(torch.zeros(2, 3, 8, 8))


def test_composite_tensors():
    generator = torch.Generator().manual_seed(6)
    edit = torch.randn(2, 3, 10, 12, generator=generator)
    source = torch.randn(2, 3, 10, 12, generator=generator)
    mask = torch.zeros(10, 12)
    mask[:, 6:] = 1
    mask[:, 5] = 0.25
    blended = composite(edit, source, mask)
    assert torch.equal(blended[..., :5], source[..., :5])
    assert torch.equal(blended[..., 6:], edit[..., 6:])
    assert torch.allclose(blended[..., 5], 0.25 * edit[..., 5] + 0.75 * source[..., 5])
    assert torch.equal(composite(edit, source, mask[None, None].expand(2, 1, 10, 12)), blended)


def _random_image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_composite_images_keeps_source_and_edit_where_the_mask_is_0_and_1():
    edit, source = _random_image(7, (96, 80)), _random_image(8, (96, 80))
    soft = soften_mask(_square_mask()[8:88])
    result = composite_images(edit, source, soft)
    assert result.mode == "RGB" and result.size == source.size
    pixels, edit_pixels, source_pixels = np.asarray(result), np.asarray(edit), np.asarray(source)
    outside, inside = soft.numpy() == 0, soft.numpy() == 1
    assert outside.any() and inside.any()
    assert np.array_equal(pixels[outside], source_pixels[outside])
    assert np.array_equal(pixels[inside], edit_pixels[inside])

    between = ~outside & ~inside
    expected = soft.numpy()[..., None] * edit_pixels + (1 - soft.numpy()[..., None]) * source_pixels
    assert np.abs(pixels[between].astype(np.float64) - expected[between]).max() <= 0.5 + 1e-4

    mask_image = Image.fromarray((soft.numpy() * 255).round().astype(np.uint8), mode="L")
    from_image = np.asarray(composite_images(edit, source, mask_image))
    levels = np.asarray(mask_image)
    assert np.array_equal(from_image[levels == 0], source_pixels[levels == 0])
    assert np.array_equal(from_image[levels == 255], edit_pixels[levels == 255])


def test_composite_images_is_monotone_across_a_straight_edge():
    size = (96, 16)
    black, white = Image.new("RGB", size, (0, 0, 0)), Image.new("RGB", size, (255, 255, 255))
    result = np.asarray(composite_images(black, white, soften_mask(_edge_mask())))
    row = result[8, :, 0].astype(int)
    assert np.all(np.diff(row) >= 0)
    assert row[0] == 0 and row[-1] == 255
    assert 0 < row[47] < 255 and 0 < row[48] < 255
    assert np.all(result == result[:, :, :1])


def test_composite_images_rejects_mismatched_sizes():
    with pytest.raises(ValueError):
        composite_images(_random_image(1), _random_image(2, (40, 40)), torch.zeros(40, 48))
    with pytest.raises(ValueError):
        composite_images(_random_image(1), _random_image(2), torch.zeros(40, 40))


def test_resize_mask_area_when_shrinking():
    soft = soften_mask(_disc_mask(size=64, radius=20.0))
    for size in [(16, 16), (23, 29), (8, 64)]:
        resized = resize_mask(soft, size)
        assert resized.shape == size
        assert resized.min() >= 0 and resized.max() <= 1
        assert abs(resized.mean().item() - soft.mean().item()) < 5e-3
    assert torch.allclose(resize_mask(soft, (16, 16)), soft.reshape(16, 4, 16, 4).mean(dim=(1, 3)), atol=1e-6)


def test_resize_mask_bilinear_when_growing_and_batched():
    soft = soften_mask(_square_mask(size=32, low=8, high=20))[None, None].expand(2, 1, 32, 32)
    grown = resize_mask(soft, (80, 50))
    assert grown.shape == (2, 1, 80, 50)
    assert grown.min() >= 0 and grown.max() <= 1
    assert abs(grown.mean().item() - soft.mean().item()) < 1e-2

    mixed = resize_mask(soft, (12, 48))
    assert mixed.shape == (2, 1, 12, 48) and mixed.min() >= 0 and mixed.max() <= 1
    assert abs(mixed.mean().item() - soft.mean().item()) < 1e-2

    assert torch.equal(resize_mask(soft, (32, 32)), soft)
    assert resize_mask(soft.half(), (8, 8)).dtype == torch.float16
    with pytest.raises(ValueError):
        resize_mask(soft, (0, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_the_cpu():
    mask = _disc_mask(size=64, radius=18.0)
    soft_cpu = soften_mask(mask)
    soft_cuda = soften_mask(mask.cuda())
    assert soft_cuda.device.type == "cuda"
    assert torch.allclose(soft_cuda.cpu(), soft_cpu, atol=1e-5)
    to_outside, to_inside = _centre_distances(mask)
    inside = mask.numpy() >= 0.5
    assert np.all(soft_cuda.cpu().numpy()[~inside & (to_inside > FAR)] == 0)
    assert np.all(soft_cuda.cpu().numpy()[inside & (to_outside > FAR)] == 1)
    image = torch.rand(2, 4, 64, 64)
    sigma = sigma_map(mask)
    assert torch.allclose(
        spatially_varying_blur(image.cuda(), sigma.cuda()).cpu(), spatially_varying_blur(image, sigma), atol=1e-5
    )
    half = spatially_varying_blur(image.cuda().half(), sigma.cuda())
    assert half.dtype == torch.float16 and torch.allclose(
        half.float().cpu(), spatially_varying_blur(image, sigma), atol=2e-3
    )
    assert resize_mask(soft_cuda, (16, 16)).device.type == "cuda"


def test_default_constants():
    assert DEFAULT_SIGMA_MAX == 5.0 and DEFAULT_SIGMA_S == 10.0
