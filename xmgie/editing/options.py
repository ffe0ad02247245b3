"""Per-item edit options: one validated dataclass with every knob an item can set."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from xmgie.editing.errors import EditInputError

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE_SCALE = 7.5
DEFAULT_IMAGE_GUIDANCE_SCALE = 1.5
DEFAULT_MAX_SIDE = 512
MAX_STEPS = 500
MAX_SEED = 2**63 - 1


def merge_options(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Option dictionaries layered: ``override`` on top of ``base``; groups given as objects on both sides (``pfb``,
    ``cam``...) are merged key by key. How job options combine with an item's, or a schedule's with an
    instruction's."""
    merged = dict(base)
    for name, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(name), Mapping):
            merged[name] = merge_options(merged[name], value)
        else:
            merged[name] = value
    return merged


def validate_options(options: Mapping[str, Any], what: str = "options") -> EditOptions:
    """``EditOptions`` of a plain dictionary; any problem is an ``EditInputError`` ``invalid_option`` naming
    ``what``."""
    try:
        return EditOptions.from_dict(dict(options))
    except EditInputError:
        raise
    except (TypeError, ValueError) as error:
        raise EditInputError("invalid_option", f"{what} are invalid: {error}") from error


def _invalid(name: str, value: Any, rule: str) -> EditInputError:
    return EditInputError("invalid_option", f"option {name}={value!r} is invalid: {rule}")


PFB_REFERENCES = ("noise", "inversion", "inversion_start")
PFB_DEFAULT_LEVELS = ("1/4", "1/8", "mid")
PFB_LEVEL_DENOMINATORS = (1, 2, 4, 8, 16, 32, 64)
CAM_MODES = ("hard", "soft")
IE_REFERENCES = ("source", "outside_mask", "image")
IE_REGIONS = (None, "outside_mask", "inside_mask")
AUTO_MASK_MODES = ("auto", "always", "off")
UNET_BLOCKS = (
    "mid_block",
    "up_blocks.0",
    "up_blocks.1",
    "up_blocks.2",
    "up_blocks.3",
    "down_blocks.0",
    "down_blocks.1",
    "down_blocks.2",
    "down_blocks.3",
)


def _check_number(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise _invalid(name, value, f"a number in [{low}, {high}]")


def _check_integer(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _invalid(name, value, f"an integer in [{low}, {high}]")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise _invalid(name, value, f"one of {', '.join(repr(c) for c in choices)}")


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _invalid(name, value, "true or false")


def _pfb_level(value: Any) -> str:
    """A PFB level as ``"1/N"`` or ``"mid"``; numbers such as 0.25 are accepted for ``"1/4"``."""
    if value == "mid":
        return value
    denominator = None
    if isinstance(value, str) and value.startswith("1/") and value[2:].isdigit():
        denominator = int(value[2:])
    elif isinstance(value, int | float) and not isinstance(value, bool) and value > 0 and (1 / value).is_integer():
        denominator = int(1 / value)
    if denominator not in PFB_LEVEL_DENOMINATORS:
        raise _invalid(
            "pfb.levels", value, f"'mid' or a fraction 1/N of the latent side, N in {PFB_LEVEL_DENOMINATORS}"
        )
    return f"1/{denominator}"


@dataclass(frozen=True)
class PFBOptions:
    """Progressive feature blending: keep the outside of the mask on a reference branch of the source.

    Attributes:
        enabled: switch.
        levels: UNet resolutions whose features are blended with the reference branch's, as fractions of the
            latent side, and ``"mid"`` for the middle block. A fraction covers every encoder and decoder layer
            working at that resolution, as PFB-Diff blends. Default ``1/4``, ``1/8`` and ``mid``: 16×16 and 8×8
            for a 512-pixel image (64×64 latent) — the encoder's last two levels, the middle block and the
            decoder down to 16×16.
        blocks: instead of ``levels``, whole UNet blocks (``mid_block``, ``up_blocks.1``...) whose outputs are
            blended; an up block's output is after its upsampler (``up_blocks.1``: 32×32 at 512 pixels).
        latent_blend_fraction: leading fraction of the steps during which latents are blended too.
        reference: the reference branch — ``noise`` (the source latent noised with a fixed noise per step),
            ``inversion`` (DDIM inversion of the source with the null conditioning) or ``inversion_start``
            (PFB-Diff's: that inversion, and sampling starts from the inverted latent instead of noise).
    """

    enabled: bool = True
    levels: tuple[str, ...] = PFB_DEFAULT_LEVELS
    blocks: tuple[str, ...] = ()
    latent_blend_fraction: float = 0.5
    reference: str = "noise"

    def __post_init__(self) -> None:
        _check_flag("pfb.enabled", self.enabled)
        for name in ("levels", "blocks"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, list | tuple):
                raise _invalid(f"pfb.{name}", value, "a list")
        levels = tuple(dict.fromkeys(_pfb_level(level) for level in self.levels))
        object.__setattr__(self, "blocks", tuple(self.blocks))
        for block in self.blocks:
            _check_choice("pfb.blocks", block, UNET_BLOCKS)
        if self.blocks:
            if levels not in ((), PFB_DEFAULT_LEVELS):
                raise EditInputError("invalid_option", "pfb.levels and pfb.blocks exclude each other: give one")
            levels = ()
        object.__setattr__(self, "levels", levels)
        _check_number("pfb.latent_blend_fraction", self.latent_blend_fraction, 0.0, 1.0)
        _check_choice("pfb.reference", self.reference, PFB_REFERENCES)


@dataclass(frozen=True)
class CAMOptions:
    """Cross-attention masking: the edit conditioning acts only inside the mask.

    Attributes:
        enabled: switch.
        mode: ``hard`` (outside the binarised mask image positions attend to the null conditioning only)
            or ``soft`` (the edit conditioning's weight follows the soft mask).
    """

    enabled: bool = True
    mode: str = "hard"

    def __post_init__(self) -> None:
        _check_flag("cam.enabled", self.enabled)
        _check_choice("cam.mode", self.mode, CAM_MODES)


@dataclass(frozen=True)
class IEOptions:
    """Identity embeddings: an image encoder's tokens enter the UNet by decoupled cross-attention.

    Attributes:
        enabled: switch (needs a model with an image encoder and an identity adapter).
        scale: weight of the identity branch; 0 reproduces the output without it.
        reference: what is embedded — ``source`` (the source image), ``outside_mask`` (the source with the
            edit region greyed out) or ``image`` (a reference image given with the item).
        region: where the identity branch acts — everywhere (``None``), ``outside_mask`` or ``inside_mask``.
    """

    enabled: bool = True
    scale: float = 0.3
    reference: str = "source"
    region: str | None = None

    def __post_init__(self) -> None:
        _check_flag("ie.enabled", self.enabled)
        _check_number("ie.scale", self.scale, 0.0, 5.0)
        _check_choice("ie.reference", self.reference, IE_REFERENCES)
        _check_choice("ie.region", self.region, IE_REGIONS)


@dataclass(frozen=True)
class GBOptions:
    """Gaussian blurring: σ(D) = σ_max·exp(−D²/(2σ_s²)) of the distance D to the mask boundary.

    The blurred mask drives feature blending and the final pixel composite with the source. ``sigma_max`` and
    ``sigma_s`` are in pixels of the working size; ``None`` (the default) takes the model's (its
    ``model_index.json``'s ``gb_sigma_max`` / ``gb_sigma_s``), else the seed paper's 5 and 10, chosen for
    MGIE's 512-pixel working size (``mini``, working at 64 px, keeps the same feather relative to the picture:
    0.625 and 1.25).
    """

    enabled: bool = True
    sigma_max: float | None = None
    sigma_s: float | None = None

    def __post_init__(self) -> None:
        _check_flag("gb.enabled", self.enabled)
        if self.sigma_max is not None:
            _check_number("gb.sigma_max", self.sigma_max, 0.0, 64.0)
        if self.sigma_s is not None:
            _check_number("gb.sigma_s", self.sigma_s, 0.1, 256.0)


@dataclass(frozen=True)
class AutoMaskOptions:
    """The edit's scope when the item has no mask, and the automatic mask (DiffEdit's recipe) that decides it.

    Attributes:
        enabled: ``False`` is ``mode="off"``.
        mode: ``auto`` — estimate a mask; the edit is ``local`` to it, or ``global`` (PFB, CAM and GB off) when
            the estimate covers ``global_fraction`` of the image or more, is empty, or comes from a flat
            difference map; ``always`` — always edit inside the estimated mask, whatever it covers; ``off`` — no
            estimate: without a mask the edit is global; ``None`` (the default) — the model's mode (its
            ``model_index.json``'s ``auto_mask_mode``: ``off`` for ``mini``, whose estimates miss), else ``auto``.
        draws: noise draws averaged.
        strength: noise level of the draws, as a fraction of the training schedule; ``None``: the model's
            (``auto_mask_strength``), else 0.5.
        level: ``0``: DiffEdit's rule, relative to the difference map's mean (``ratio``, ``threshold``,
            ``min_spread``); above 0: a pixel is edited where the difference ``|ε_edit − ε_null|`` exceeds this
            many noise units, so a global edit covers the image and a local one its region; ``None``: the
            model's (``auto_mask_level``), else 0 (see :func:`xmgie.editing.masks.threshold_difference_map`).
        smoothing: σ in latent pixels of a Gaussian blur of the difference map before the threshold; ``None``:
            the model's (``auto_mask_smoothing``), else 0.
        ratio: the difference map is clamped to ``ratio`` times its mean (DiffEdit's ``mask_thresholding_ratio``).
        threshold: fraction of the clamp above which a pixel is edited (a pixel is edited where its difference
            exceeds ``ratio·threshold`` times the mean).
        min_spread: a difference map whose standard deviation is below this fraction of its mean is flat: the
            edit acts about equally everywhere and the mask is full (relative rule only).
        global_fraction: in ``auto`` mode, masks covering at least this fraction of the image make the edit global.
        chunk: UNet rows per call while drawing (the draws take ``2·draws`` rows per item).
    """

    enabled: bool = True
    mode: str | None = None
    draws: int = 8
    strength: float | None = None
    level: float | None = None
    smoothing: float | None = None
    ratio: float = 3.0
    threshold: float = 0.5
    min_spread: float = 0.35
    global_fraction: float = 0.6
    chunk: int = 16

    def __post_init__(self) -> None:
        _check_flag("auto_mask.enabled", self.enabled)
        if self.mode is not None:
            _check_choice("auto_mask.mode", self.mode, AUTO_MASK_MODES)
        # One spelling per meaning, so that equal options give equal batch keys.
        if not self.enabled:
            object.__setattr__(self, "mode", "off")
        elif self.mode == "off":
            object.__setattr__(self, "enabled", False)
        _check_integer("auto_mask.draws", self.draws, 1, 32)
        if self.strength is not None:
            _check_number("auto_mask.strength", self.strength, 0.05, 1.0)
        if self.level is not None:
            _check_number("auto_mask.level", self.level, 0.0, 10.0)
        if self.smoothing is not None:
            _check_number("auto_mask.smoothing", self.smoothing, 0.0, 16.0)
        _check_number("auto_mask.ratio", self.ratio, 0.1, 100.0)
        _check_number("auto_mask.threshold", self.threshold, 0.01, 0.99)
        _check_number("auto_mask.min_spread", self.min_spread, 0.0, 10.0)
        _check_number("auto_mask.global_fraction", self.global_fraction, 0.01, 1.0)
        _check_integer("auto_mask.chunk", self.chunk, 1, 1024)


EXTENSION_GROUPS: dict[str, type] = {
    "pfb": PFBOptions,
    "cam": CAMOptions,
    "ie": IEOptions,
    "gb": GBOptions,
    "auto_mask": AutoMaskOptions,
}


def _group_from(name: str, value: Any):
    cls = EXTENSION_GROUPS[name]
    if isinstance(value, cls):
        return value
    if isinstance(value, bool):
        return cls(enabled=value)
    if not isinstance(value, dict):
        raise _invalid(name, value, "an object of options, or true/false")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise EditInputError("invalid_option", f"unknown option(s) in {name}: {', '.join(unknown)}")
    return cls(**value)


@dataclass(frozen=True)
class EditOptions:
    """Everything an item may tune.

    Attributes:
        num_inference_steps: denoising steps of the diffusion stage.
        guidance_scale: text (edit) guidance of the three-way classifier-free guidance; ``None``: the model's
            (``model_index.json``), else InstructPix2Pix's 7.5.
        image_guidance_scale: image guidance; ``None``: the model's, else InstructPix2Pix's 1.5.
        seed: seed of the item's noise; ``None`` draws one.
        max_side: the long side the model works at (multiple of 8); outputs come back at the input's size.
        max_new_tokens: generation budget of the MLLM for the expressive instruction and ``[IMG]`` tokens.
        detail: put the source's fine detail back into the decoded edit where the model sets a detail radius
            (``mini`` does; see :func:`xmgie.editing.detail.transfer_detail`); ``false``: the decoder's output.

        pfb, cam, ie, gb, auto_mask: the extensions' option groups, each switchable per item
            (``{"pfb": false}`` or ``{"pfb": {"latent_blend_fraction": 0.3}}`` in JSON).
    """

    num_inference_steps: int = DEFAULT_STEPS
    guidance_scale: float | None = None
    image_guidance_scale: float | None = None
    seed: int | None = None
    max_side: int = DEFAULT_MAX_SIDE
    max_new_tokens: int = 96
    detail: bool = True
    pfb: PFBOptions = field(default_factory=PFBOptions)
    cam: CAMOptions = field(default_factory=CAMOptions)
    ie: IEOptions = field(default_factory=IEOptions)
    gb: GBOptions = field(default_factory=GBOptions)
    auto_mask: AutoMaskOptions = field(default_factory=AutoMaskOptions)

    def __post_init__(self) -> None:
        for name in EXTENSION_GROUPS:
            object.__setattr__(self, name, _group_from(name, getattr(self, name)))
        if not isinstance(self.num_inference_steps, int) or not 1 <= self.num_inference_steps <= MAX_STEPS:
            raise _invalid("num_inference_steps", self.num_inference_steps, f"an integer in [1, {MAX_STEPS}]")
        for name in ("guidance_scale", "image_guidance_scale"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 50.0:
                raise _invalid(name, value, "a number in [0, 50] or null (the model's)")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED
        ):
            raise _invalid("seed", self.seed, f"an integer in [0, {MAX_SEED}] or null")
        if not isinstance(self.max_side, int) or self.max_side % 8 or not 64 <= self.max_side <= 2048:
            raise _invalid("max_side", self.max_side, "a multiple of 8 in [64, 2048]")
        if not isinstance(self.max_new_tokens, int) or not 9 <= self.max_new_tokens <= 512:
            raise _invalid("max_new_tokens", self.max_new_tokens, "an integer in [9, 512]")
        _check_flag("detail", self.detail)

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
            self.detail,
            self.pfb,
            self.cam,
            self.ie,
            self.gb,
            self.auto_mask,
        )

    def extension_groups(self) -> tuple[PFBOptions, CAMOptions, IEOptions, GBOptions, AutoMaskOptions]:
        """The option groups of the extensions, in the pipeline's argument order."""
        return self.pfb, self.cam, self.ie, self.gb, self.auto_mask

    def all_extensions_off(self) -> EditOptions:
        """These options with every extension and the automatic mask switched off (plain MGIE)."""
        return replace(self, **{name: False for name in EXTENSION_GROUPS})
