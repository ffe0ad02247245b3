"""Detail transfer: the source's fine detail put back into a decoded edit, by a guided filter.

A model's autoencoder loses fine detail: decoding even a perfect edit latent gives a softened picture. Where the
edit changes an image's colours and tones but not its structure (black and white, warmer, more contrast...),
that loss is most of what separates the output from the right answer. The source holds the detail, and the
source's own round trip through the autoencoder shows what the decoder makes of it. Within each small window,
the decoded edit is fitted as an affine function of that round trip, per channel — He, Sun and Tang's guided
filter (TPAMI 2013), the local linear model of guided and bilateral upsampling — and the same function is applied
to the source itself: ``out = ā·source + b̄``. A colour transform of the source (including an inversion, whose
slope is negative) carries its detail across; a flat region the edit painted (a shape added over texture) has a
slope near 0, so the paint stays flat. The regulariser ``epsilon`` keeps a window whose round trip hardly varies
from amplifying noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_DETAIL_EPSILON = 1.5e-3
"""The guided filter's regulariser in squared pixel values of [-1, 1]: a window whose round trip varies by less
than about 5 levels of 255 (standard deviation) is treated as flat."""


def box_mean(values: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over each pixel's ``(2·radius + 1)²`` window of ``(B, C, H, W)`` values; windows cut at the border
    average the pixels they hold."""
    return F.avg_pool2d(values, 2 * radius + 1, stride=1, padding=radius, count_include_pad=False)


def transfer_detail(
    edited: torch.Tensor,
    round_trip: torch.Tensor,
    source: torch.Tensor,
    *,
    radius: int,
    epsilon: float,
) -> torch.Tensor:
    """The decoded edit with the source's fine detail: per channel and window, ``edited ≈ a·round_trip + b`` by
    least squares (``epsilon`` added to the round trip's variance), then ``ā·source + b̄`` with ``a`` and ``b``
    averaged over the windows that hold each pixel.

    Args:
        edited: ``(B, C, H, W)`` the decoded edit, pixels in [-1, 1].
        round_trip: the source encoded and decoded by the same autoencoder, same shape.
        source: the source pixels the edit was made from, same shape.
        radius: the window's radius in pixels (0 or less: ``edited`` unchanged).
        epsilon: the regulariser, in squared pixel values of [-1, 1].
    """
    if radius <= 0:
        return edited
    if edited.shape != round_trip.shape or edited.shape != source.shape:
        raise ValueError(
            f"edited, round_trip and source must have one shape, got {tuple(edited.shape)}, "
            f"{tuple(round_trip.shape)} and {tuple(source.shape)}"
        )
    guide, target = round_trip.float(), edited.float()
    mean_guide, mean_target = box_mean(guide, radius), box_mean(target, radius)
    covariance = box_mean(guide * target, radius) - mean_guide * mean_target
    variance = box_mean(guide * guide, radius) - mean_guide * mean_guide
    slope = covariance / (variance.clamp_min(0.0) + epsilon)
    offset = mean_target - slope * mean_guide
    result = box_mean(slope, radius) * source.float() + box_mean(offset, radius)
    return result.clamp(-1.0, 1.0).to(edited.dtype)
