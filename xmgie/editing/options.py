"""Per-item edit options: one validated dataclass with every knob an item can set."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from xmgie.editing.errors import EditInputError

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE_SCALE = 7.5
DEFAULT_IMAGE_GUIDANCE_SCALE = 1.5
DEFAULT_MAX_SIDE = 512
MAX_STEPS = 500
MAX_SEED = 2**63 - 1


def _invalid(name: str, value: Any, rule: str) -> EditInputError:
    return EditInputError("invalid_option", f"option {name}={value!r} is invalid: {rule}")


@dataclass(frozen=True)
class EditOptions:
    """Everything an item may tune.

    Attributes:
        num_inference_steps: denoising steps of the diffusion stage.
        guidance_scale: text (edit) guidance of the three-way classifier-free guidance.
        image_guidance_scale: image guidance; 1.5 keeps InstructPix2Pix's balance.
        seed: seed of the item's noise; ``None`` draws one.
        max_side: the long side the model works at (multiple of 8); outputs come back at the input's size.
        max_new_tokens: generation budget of the MLLM for the expressive instruction and ``[IMG]`` tokens.

    The extensions (progressive feature blending, cross-attention masking, identity embeddings,
    Gaussian blurring) plug in here as nested option groups, each switchable per item.
    """

    num_inference_steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    image_guidance_scale: float = DEFAULT_IMAGE_GUIDANCE_SCALE
    seed: int | None = None
    max_side: int = DEFAULT_MAX_SIDE
    max_new_tokens: int = 96

    def __post_init__(self) -> None:
        if not isinstance(self.num_inference_steps, int) or not 1 <= self.num_inference_steps <= MAX_STEPS:
            raise _invalid("num_inference_steps", self.num_inference_steps, f"an integer in [1, {MAX_STEPS}]")
        for name in ("guidance_scale", "image_guidance_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 50.0:
                raise _invalid(name, value, "a number in [0, 50]")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED
        ):
            raise _invalid("seed", self.seed, f"an integer in [0, {MAX_SEED}] or null")
        if not isinstance(self.max_side, int) or self.max_side % 8 or not 64 <= self.max_side <= 2048:
            raise _invalid("max_side", self.max_side, "a multiple of 8 in [64, 2048]")
        if not isinstance(self.max_new_tokens, int) or not 9 <= self.max_new_tokens <= 512:
            raise _invalid("max_new_tokens", self.max_new_tokens, "an integer in [9, 512]")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> EditOptions:
        """Build options from user JSON, refusing unknown keys so a typo is not silently ignored."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EditInputError("invalid_option", f"unknown option(s): {', '.join(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form, the inverse of :meth:`from_dict`."""
        return asdict(self)

    def batch_key(self) -> tuple:
        """Items whose keys are equal can share one batched diffusion call (the seed is per item)."""
        return (
            self.num_inference_steps,
            self.guidance_scale,
            self.image_guidance_scale,
            self.max_side,
            self.max_new_tokens,
        )
