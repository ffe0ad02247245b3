"""Detail transfer: a guided filter puts the source's fine detail back into a decoded edit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xmgie.editing.detail import DEFAULT_DETAIL_EPSILON, box_mean, transfer_detail


def textured_source(size: int = 48) -> torch.Tensor:
    """A smooth colour gradient with fine texture (features of about two pixels) on top, pixels in [-1, 1]."""
    generator = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-0.5, 0.5, size)
    across, down = ramp[None, :].expand(size, size), ramp[:, None].expand(size, size)
    smooth = torch.stack([across, down, -across])
    grain = torch.rand((1, 3, size // 2, size // 2), generator=generator) - 0.5
    texture = 0.4 * F.interpolate(grain, scale_factor=2, mode="nearest")[0]
    return (smooth + texture)[None]


def lossy_round_trip(pixels: torch.Tensor) -> torch.Tensor:
    """What a coarse autoencoder does to a picture: the fine texture blurred away."""
    return F.avg_pool2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean())


def test_a_colour_transform_of_the_source_gets_its_detail_back():
    source = textured_source()
    round_trip = lossy_round_trip(source)
    # Per channel: more contrast, darker, inverted; the right answer applies the same to the source itself.
    gain = torch.tensor([1.4, 0.6, -1.0])[None, :, None, None]
    shift = torch.tensor([0.1, -0.3, 0.0])[None, :, None, None]
    target = (gain * source + shift).clamp(-1, 1)
    edited = (gain * round_trip + shift).clamp(-1, 1)  # a perfect edit latent, decoded by the lossy autoencoder

    def error(epsilon: float) -> float:
        restored = transfer_detail(edited, round_trip, source, radius=2, epsilon=epsilon)
        return l1(restored, target) / l1(edited, target)

    # The regulariser treats texture fainter than itself as noise: the default keeps part of this faint texture,
    # a small one nearly all of it.
    assert error(DEFAULT_DETAIL_EPSILON) < 0.6
    assert error(1e-4) < 0.1


def test_a_flat_region_the_edit_painted_stays_flat():
    source = textured_source()
    round_trip = lossy_round_trip(source)
    edited = round_trip.clone()
    edited[..., 12:36, 12:36] = torch.tensor([0.8, -0.6, -0.6])[None, :, None, None]  # a red square over texture

    restored = transfer_detail(edited, round_trip, source, radius=2, epsilon=DEFAULT_DETAIL_EPSILON)

    inside = (..., slice(16, 32), slice(16, 32))  # the square's interior, past the windows that straddle its edge
    assert float(restored[inside].std(dim=(-2, -1)).max()) < 0.1 * float(source[inside].std(dim=(-2, -1)).min())
    assert l1(restored[inside], edited[inside]) < 0.02
    outside = (..., slice(0, 8), slice(0, 48))  # the untouched band keeps the source's texture
    assert l1(restored[outside], source[outside]) < 0.6 * l1(edited[outside], source[outside])


def test_radius_zero_returns_the_edit_and_mismatched_shapes_are_refused():
    source = textured_source()
    edited = lossy_round_trip(source) * 0.5
    assert torch.equal(transfer_detail(edited, source, source, radius=0, epsilon=1e-3), edited)
    with pytest.raises(ValueError, match="one shape"):
        transfer_detail(edited, source[..., :40, :], source, radius=2, epsilon=1e-3)


def test_box_mean_averages_the_window_and_only_the_pixels_inside_the_image():
    values = torch.arange(25.0).view(1, 1, 5, 5)
    means = box_mean(values, 1)
    assert float(means[0, 0, 2, 2]) == pytest.approx(float(values[0, 0, 1:4, 1:4].mean()))
    assert float(means[0, 0, 0, 0]) == pytest.approx(float(values[0, 0, :2, :2].mean()))
