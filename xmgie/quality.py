"""Target-based quality scores of edits on paired data whose targets and edit regions are known exactly.

The synthetic dataset of :mod:`xmgie.training.synth` gives, per item, the source, the exact target
and the true edit region (white = edited). Against them an output is scored by
:func:`item_scores`:

``l1_inside`` / ``source_l1_inside`` / ``l1_ratio``
    mean absolute difference (pixels in [0, 1]) to the target inside the true region, of the
    output and of the untouched source (the baseline), and their ratio: 0 is the exact target,
    1 is no better than not editing, above 1 is worse.
``psnr_inside``
    PSNR of the output against the target inside the region.
``psnr_outside``
    PSNR of the output against the source outside the region (what should have been kept);
    ``None`` where the region is the whole image (the global kinds).
``far_outside_equal``
    the share of pixels farther than ``far_px`` pixels from the region whose output equals the
    source exactly (all three channels): GB's composite keeps them bit for bit.
``tone_gain``
    how much of the target's change of colour statistics the output makes, inside the region: the change of
    the three channels' means and standard deviations from the source's, of the output projected on the
    target's, over the target's (1: as much as the target; between 0 and 1: the right way, short of it; above
    1: too far; below 0: the wrong way). It tells an edit that overshoots from one that does another edit,
    which an L1 distance does not; ``None`` where the target hardly changes those statistics.
``colour_cast``
    how far the output's mean colour inside the region lies from the target's in the chroma plane of YIQ
    (:data:`CHROMA`, pixels in [0, 1]; luma left out): 0 for the target's hue balance, about 0.055 for a grey
    turned the green of RGB (104, 128, 104). A tint the whole region shares — a black and white edit that comes
    out green — weighs little in an L1 distance and nothing in ``tone_gain`` when the channels' spreads move the
    right way; this names it.
``mask_iou``
    IoU of an estimated mask (thresholded at 0.5) with the true region.
``scope_correct`` / ``names_kind``
    whether the reported edit scope matches the kind's (``global`` / ``local``), and whether the
    expressive instruction names the kind (see :data:`KIND_KEYWORDS`).
``expressive_exact``
    whether the expressive instruction is the dataset's own (``expressive_instruction`` of the row), up to
    case and spacing. The synthetic dataset writes one per edit, from the edit itself, so a model that
    learnt it writes it word for word; a shape edit's is exact only with the right shape, colours and place,
    which naming the kind does not check.

PSNRs of identical pixels are capped at :data:`PSNR_CAP` dB. :func:`aggregate` averages rows per
kind (or any other key), :func:`format_table` prints the result as a markdown table, and
:func:`evaluate_paired` scores a folder of outputs against a synthetic split (``xmgie eval --paired``).

:func:`autoencoder_round_trip` is the target through a model's VAE: every output of the model is a decoded
latent, so the round trip's scores are the best any of its edits can reach (its *floor*), whatever the UNet.
:func:`conditioning_separation` says which kinds the edit head tells apart: the UNet sees nothing else of
the instruction, so two kinds with nearly the same conditioning get the same edit.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from xmgie.editing.errors import EditInputError

__all__ = [
    "DEFAULT_FAR_PX",
    "GLOBAL_KINDS",
    "KIND_KEYWORDS",
    "LOCAL_KINDS",
    "PSNR_CAP",
    "aggregate",
    "autoencoder_round_trip",
    "colour_cast",
    "conditioning_separation",
    "edit_and_score",
    "evaluate_paired",
    "format_table",
    "item_scores",
    "names_kind",
    "read_paired_metadata",
    "same_expressive",
    "tone_gain",
]

PSNR_CAP = 100.0
"""PSNR (dB) reported where the pixels compared are identical (the true PSNR is infinite)."""
DEFAULT_FAR_PX = 16.0
"""Distance (pixels) beyond which ``far_outside_equal`` counts: past 3·σ_max of GB's default (5 px)."""

GLOBAL_KINDS = (
    "black_and_white",
    "sepia",
    "invert",
    "brighter",
    "darker",
    "more_contrast",
    "warmer",
    "cooler",
    "night",
)
LOCAL_KINDS = ("add_shape", "remove_shape", "recolour_shape")
"""The kinds of :mod:`xmgie.training.synth` (kept here so scoring imports no dataset code)."""

KIND_KEYWORDS: dict[str, tuple[str, ...]] = {
    "black_and_white": ("black and white", "grey", "gray"),
    "sepia": ("sepia",),
    "invert": ("invert", "negative"),
    "brighter": ("bright",),
    "darker": ("dark",),
    "more_contrast": ("contrast",),
    "warmer": ("warm",),
    "cooler": ("cool",),
    "night": ("night",),
    "add_shape": ("add",),
    "remove_shape": ("remov",),
    "recolour_shape": ("recolo",),
}
"""Per kind, words (lower-case substrings) of which an expressive instruction naming the kind has one."""

SCORE_NAMES = (
    "l1_inside",
    "source_l1_inside",
    "l1_ratio",
    "psnr_inside",
    "psnr_outside",
    "far_outside_equal",
    "tone_gain",
    "colour_cast",
    "mask_iou",
    "scope_correct",
    "names_kind",
    "expressive_exact",
)

CHROMA = np.array([[0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
"""RGB to the two chroma axes (I, Q) of YIQ; its luma row is :data:`xmgie.training.synth.LUMA`."""

TONE_CHANGE_MIN = 0.01
"""The smallest change of a target's colour statistics (root of the sum of squares, pixels in [0, 1]) for which
``tone_gain`` is computed."""

ArrayLike = np.ndarray | Image.Image | str | os.PathLike


# --- arrays ----------------------------------------------------------------------------------------------------------


def _rgb(image: ArrayLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 array of ``image``, resized (bicubic) to ``size`` = (width, height) when it differs."""
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        if array.dtype != np.uint8:
            array = np.clip(
                np.rint(array.astype(np.float64) * (255.0 if array.max(initial=0) <= 1.0 else 1.0)), 0, 255
            )
            array = array.astype(np.uint8)
        picture = Image.fromarray(array[..., :3])
    else:
        picture = image if isinstance(image, Image.Image) else Image.open(image)
        picture = picture.convert("RGB")
    if size is not None and picture.size != size:
        picture = picture.resize(size, Image.Resampling.BICUBIC)
    return np.asarray(picture, dtype=np.uint8)


def _region(mask: ArrayLike, size: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) region of ``mask`` (white / true / ≥ 0.5 = inside), resized (nearest) to ``size``."""
    if isinstance(mask, np.ndarray):
        array = mask
        if array.ndim == 3:
            array = array[..., 0]
        if array.dtype == bool:
            values = array.astype(np.float64)
        elif np.issubdtype(array.dtype, np.integer):
            values = array.astype(np.float64) / 255.0
        else:
            values = array.astype(np.float64)
        if values.shape != (size[1], size[0]):
            picture = Image.fromarray(np.clip(values * 255.0, 0, 255).astype(np.uint8), "L")
            values = np.asarray(picture.resize(size, Image.Resampling.NEAREST), dtype=np.float64) / 255.0
        return values >= 0.5
    picture = mask if isinstance(mask, Image.Image) else Image.open(mask)
    picture = picture.convert("L")
    if picture.size != size:
        picture = picture.resize(size, Image.Resampling.NEAREST)
    return np.asarray(picture, dtype=np.float64) / 255.0 >= 0.5


def _psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR (dB) of two float [0, 1] pixel sets; ``None`` when empty, :data:`PSNR_CAP` when identical."""
    if a.size == 0:
        return None
    mse = float(np.mean((a - b) ** 2))
    return PSNR_CAP if mse == 0.0 else min(PSNR_CAP, 10.0 * math.log10(1.0 / mse))


def _distance_outside(region: np.ndarray) -> np.ndarray:
    """Euclidean distance (pixels) of each pixel to the nearest pixel of ``region`` (0 inside it)."""
    if not region.any():
        return np.full(region.shape, np.inf)
    try:
        from scipy.ndimage import distance_transform_edt
    except ImportError:  # pragma: no cover - scipy is a dependency of the project's test tools
        return _distance_by_dilation(region)
    return distance_transform_edt(~region)


def _distance_by_dilation(region: np.ndarray) -> np.ndarray:
    """Chessboard distance to ``region`` by repeated 3×3 dilation (the fallback without scipy)."""
    distance = np.full(region.shape, np.inf)
    grown = region.copy()
    step = 0
    while True:
        distance[grown & np.isinf(distance)] = step
        if grown.all():
            return distance
        padded = np.pad(grown, 1)
        neighbours = np.zeros_like(grown)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                neighbours |= padded[dy : dy + grown.shape[0], dx : dx + grown.shape[1]]
        grown = neighbours
        step += 1


def names_kind(expressive: str | None, kind: str | None) -> bool | None:
    """Whether ``expressive`` has one of ``kind``'s words (:data:`KIND_KEYWORDS`); ``None`` if either is unknown."""
    if expressive is None or kind not in KIND_KEYWORDS:
        return None
    text = expressive.lower()
    return any(word in text for word in KIND_KEYWORDS[kind])


def same_expressive(expressive: str | None, reference: str | None) -> bool | None:
    """Whether ``expressive`` is ``reference`` up to case and runs of spaces; ``None`` if either is unknown."""
    if expressive is None or not reference:
        return None
    return " ".join(expressive.lower().split()) == " ".join(reference.lower().split())


def item_scores(
    source: ArrayLike,
    target: ArrayLike,
    output: ArrayLike,
    true_mask: ArrayLike,
    *,
    estimated_mask: ArrayLike | None = None,
    edit_scope: str | None = None,
    expressive: str | None = None,
    kind: str | None = None,
    reference_expressive: str | None = None,
    far_px: float = DEFAULT_FAR_PX,
) -> dict[str, Any]:
    """Scores of one output against its target and source (see the module's docstring for each).

    Images are arrays (uint8, or floats in [0, 1]), PIL images or paths; masks likewise, white (or
    true, or ≥ 0.5) inside the edited region. The output and the masks are resized to the target's
    size where they differ (bicubic for the output, nearest for masks); the source must have the
    target's size. A score that cannot be computed is ``None``: ``l1_ratio`` when the source already
    equals the target inside the region, ``psnr_outside`` and ``far_outside_equal`` where there is
    no pixel outside (or far outside) the region, ``mask_iou`` without ``estimated_mask``,
    ``scope_correct`` without ``edit_scope`` or a known ``kind``, ``names_kind`` without
    ``expressive`` or a known ``kind``, ``expressive_exact`` without ``expressive`` or
    ``reference_expressive`` (the dataset's).

    Raises:
        EditInputError: ``invalid_image`` when the source and target differ in size.
    """
    target_pixels = _rgb(target)
    size = (target_pixels.shape[1], target_pixels.shape[0])
    source_pixels = _rgb(source)
    if source_pixels.shape != target_pixels.shape:
        raise EditInputError(
            "invalid_image",
            f"source is {source_pixels.shape[1]}×{source_pixels.shape[0]} but target is {size[0]}×{size[1]}",
        )
    output_pixels = _rgb(output, size)
    region = _region(true_mask, size)

    out = output_pixels.astype(np.float64) / 255.0
    src = source_pixels.astype(np.float64) / 255.0
    tgt = target_pixels.astype(np.float64) / 255.0
    inside = region
    outside = ~region

    l1_inside = float(np.mean(np.abs(out[inside] - tgt[inside]))) if inside.any() else None
    source_l1 = float(np.mean(np.abs(src[inside] - tgt[inside]))) if inside.any() else None
    ratio = l1_inside / source_l1 if l1_inside is not None and source_l1 else None

    far = _distance_outside(region) > far_px
    far_equal = None
    if far.any():
        far_equal = float(np.mean(np.all(output_pixels[far] == source_pixels[far], axis=-1)))

    iou = None
    if estimated_mask is not None:
        estimate = _region(estimated_mask, size)
        union = int(np.count_nonzero(estimate | region))
        iou = float(np.count_nonzero(estimate & region)) / union if union else 1.0

    scope_correct = None
    if edit_scope is not None and kind in KIND_KEYWORDS:
        scope_correct = edit_scope == ("global" if kind in GLOBAL_KINDS else "local")

    return {
        "l1_inside": l1_inside,
        "source_l1_inside": source_l1,
        "l1_ratio": ratio,
        "psnr_inside": _psnr(out[inside], tgt[inside]),
        "psnr_outside": _psnr(out[outside], src[outside]),
        "far_outside_equal": far_equal,
        "tone_gain": tone_gain(src[inside], tgt[inside], out[inside]) if inside.any() else None,
        "colour_cast": colour_cast(tgt[inside], out[inside]) if inside.any() else None,
        "mask_iou": iou,
        "scope_correct": scope_correct,
        "names_kind": names_kind(expressive, kind),
        "expressive_exact": same_expressive(expressive, reference_expressive),
    }


def _tone(pixels: np.ndarray) -> np.ndarray:
    return np.concatenate([pixels.mean(axis=0), pixels.std(axis=0)])


def tone_gain(source: np.ndarray, target: np.ndarray, output: np.ndarray) -> float | None:
    """How much of the target's change of colour statistics the output makes (``tone_gain`` above).

    The arguments are (N, 3) pixels in [0, 1] of the same region; ``None`` where the target changes the six
    statistics (channel means and standard deviations) by less than :data:`TONE_CHANGE_MIN`.
    """
    start = _tone(source)
    wanted = _tone(target) - start
    size = float(np.dot(wanted, wanted))
    if math.sqrt(size) < TONE_CHANGE_MIN:
        return None
    return float(np.dot(_tone(output) - start, wanted) / size)


def colour_cast(target: np.ndarray, output: np.ndarray) -> float:
    """The distance between the mean chroma (:data:`CHROMA`) of ``output`` and of ``target`` (``colour_cast``
    above); both are (N, 3) pixels in [0, 1] of the same region."""
    return float(np.linalg.norm((output.mean(axis=0) - target.mean(axis=0)) @ CHROMA.T))


def autoencoder_round_trip(pipe: Any, image: ArrayLike, source: ArrayLike | None = None) -> np.ndarray:
    """``image`` encoded (the posterior's mode) and decoded by ``pipe``'s VAE at its own size, as uint8 RGB.

    The side must be a multiple of the VAE's factor. With the edit's ``source`` (same size) and a model that sets
    a detail radius, the decoded image takes the source's detail as the model's edits do
    (:func:`xmgie.editing.detail.transfer_detail`). No edit of ``pipe`` can come closer to a target than the
    target's own round trip does (with detail transfer: about as close), except where a composite pastes source
    pixels back.
    """
    import torch

    from xmgie.editing.detail import transfer_detail
    from xmgie.editing.images import image_to_tensor, tensor_to_image

    vae = pipe.vae

    def round_trip(picture: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = image_to_tensor(Image.fromarray(_rgb(picture)))[None].to(vae.device, vae.dtype)
        return pixels, vae.decode(vae.encode(pixels).latent_dist.mode()).sample

    with torch.no_grad():
        _, decoded = round_trip(image)
        radius, epsilon = pipe.resolve_detail()
        if source is not None and radius > 0:
            source_pixels, source_trip = round_trip(source)
            decoded = transfer_detail(decoded, source_trip, source_pixels, radius=radius, epsilon=epsilon)
    return np.asarray(tensor_to_image(decoded[0]))


def conditioning_separation(
    pipe: Any, rows: Sequence[Mapping[str, Any]], folder: str | os.PathLike
) -> dict[str, dict[str, Any]]:
    """Per kind of ``rows``: how far its mean edit conditioning lies from the nearest other kind's.

    Each row's source and instruction go through the MLLM and the edit head as in an edit; per kind the
    conditionings (flattened) are averaged. Returns ``{kind: {"n", "nearest", "distance", "spread",
    "ratio"}}``: the nearest other kind, the Euclidean distance between the two means, the kind's own spread
    (mean distance of its items from their mean) and the distance over the mean of the two kinds' spreads
    (``None`` where both are 0). A ratio near 1 means the conditioning does not tell the two kinds apart; a
    large ratio at a small distance means it does, and a UNet that still confuses them reads it too weakly.
    """
    import torch

    from xmgie.editing.mllm import MAX_NEW_TOKENS

    folder = Path(folder)
    sources = [Image.open(folder / row["source_file"]).convert("RGB") for row in rows]
    with torch.no_grad():
        conditioning, _, _ = pipe.encode_instructions(
            sources, [row["instruction"] for row in rows], MAX_NEW_TOKENS, {}
        )
    vectors: dict[str, list[torch.Tensor]] = {}
    for row, item in zip(rows, conditioning.flatten(1).float().cpu(), strict=True):
        vectors.setdefault(row["kind"], []).append(item)
    means = {kind: torch.stack(items).mean(dim=0) for kind, items in vectors.items()}
    spreads = {kind: float(torch.stack(items).sub(means[kind]).norm(dim=1).mean()) for kind, items in vectors.items()}
    table: dict[str, dict[str, Any]] = {}
    for kind, mean in means.items():
        others = {other: float((mean - means[other]).norm()) for other in means if other != kind}
        nearest = min(others, key=others.get) if others else None
        pair_spread = (spreads[kind] + spreads[nearest]) / 2 if nearest else 0.0
        table[kind] = {
            "n": len(vectors[kind]),
            "nearest": nearest,
            "distance": others.get(nearest),
            "spread": spreads[kind],
            "ratio": others[nearest] / pair_spread if pair_spread > 0 else None,
        }
    return table


EXTENSIONS = ("pfb", "cam", "ie", "gb")
MASK_SOURCES = ("none", "user", "auto")


def edit_and_score(
    pipe: Any,
    row: Mapping[str, Any],
    folder: str | os.PathLike,
    *,
    extensions: Sequence[str],
    mask_source: str,
    seed: int,
    num_inference_steps: int,
    max_side: int | None = None,
) -> dict[str, Any]:
    """Edit one row of a paired folder with ``pipe`` and score the output (:func:`item_scores`).

    ``extensions`` are the ones switched on; ``mask_source`` is ``user`` (the row's true region is the mask),
    ``auto`` (no mask, the automatic mask in ``auto`` mode decides the scope; its estimate is scored for IoU,
    the whole image when the edit was judged global) or ``none`` (no mask, no estimate: a global edit).
    """
    from xmgie.editing.options import DEFAULT_MAX_SIDE, AutoMaskOptions

    if mask_source not in MASK_SOURCES:
        raise ValueError(f"mask_source must be one of {MASK_SOURCES}, got {mask_source!r}")
    folder = Path(folder)
    source = Image.open(folder / row["source_file"]).convert("RGB")
    true_mask = Image.open(folder / row["mask_file"]).convert("L")
    out = pipe(
        source,
        row["instruction"],
        mask=true_mask if mask_source == "user" else None,
        num_inference_steps=num_inference_steps,
        max_side=max_side or DEFAULT_MAX_SIDE,
        **{name: name in extensions for name in EXTENSIONS},
        auto_mask=AutoMaskOptions(mode="auto" if mask_source == "auto" else "off"),
        generator=pipe.seeded_generators([seed]),
    )
    estimated = None
    if mask_source == "auto":
        estimated = out.masks[0] if out.masks[0] is not None else np.ones((1, 1), dtype=bool)
    scores = item_scores(
        source,
        folder / row["target_file"],
        out.images[0],
        true_mask,
        estimated_mask=estimated,
        edit_scope=out.edit_scopes[0],
        expressive=out.expressive_instructions[0],
        kind=row.get("kind"),
        reference_expressive=row.get("expressive_instruction"),
    )
    return {"kind": row.get("kind"), "edit_scope": out.edit_scopes[0], **scores}


# --- aggregation -----------------------------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and not math.isnan(value):
        return float(value)
    return None


def _means(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    group: dict[str, Any] = {"n": len(rows)}
    for name in SCORE_NAMES:
        values = [number for row in rows if (number := _number(row.get(name))) is not None]
        group[name] = math.fsum(values) / len(values) if values else None
    group["scope_accuracy"] = group.pop("scope_correct")
    group["names_kind_share"] = group.pop("names_kind")
    group["expressive_exact_share"] = group.pop("expressive_exact")
    return group


def aggregate(rows: Sequence[Mapping[str, Any]], by: str = "kind") -> dict[str, dict[str, Any]]:
    """Means of every score per value of ``rows``' key ``by`` (sorted), and over all rows under ``"all"``.

    Each group has ``n`` (its rows) and the mean of each score of :func:`item_scores` over the rows
    where it is not ``None``; ``scope_correct``, ``names_kind`` and ``expressive_exact`` become
    ``scope_accuracy``, ``names_kind_share`` and ``expressive_exact_share`` (the share of true values). A mean
    with no value is ``None``.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row.get(by)), []).append(row)
    table = {key: _means(groups[key]) for key in sorted(groups)}
    table["all"] = _means(list(rows))
    return table


TABLE_COLUMNS = (
    "n",
    "l1_ratio",
    "l1_inside",
    "psnr_inside",
    "psnr_outside",
    "far_outside_equal",
    "tone_gain",
    "colour_cast",
    "mask_iou",
    "scope_accuracy",
    "names_kind_share",
    "expressive_exact_share",
)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 10 else f"{value:.3f}"
    return str(value)


def format_table(
    table: Mapping[str, Mapping[str, Any]], columns: Sequence[str] = TABLE_COLUMNS, *, label: str = "kind"
) -> str:
    """A plain markdown table: one row per key of ``table`` (e.g. :func:`aggregate`'s), one column per name.

    Missing or ``None`` values print as ``–``; floats with three decimals (two from 10 up).
    """
    header = [label, *columns]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if index == 0 else "---:" for index in range(len(header))) + "|",
    ]
    for key, group in table.items():
        lines.append("| " + " | ".join([str(key), *(_cell(group.get(name)) for name in columns)]) + " |")
    return "\n".join(lines)


# --- paired folders --------------------------------------------------------------------------------------------------

METADATA_FILE = "metadata.jsonl"
REQUIRED_KEYS = ("source_file", "target_file", "mask_file", "kind")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def read_paired_metadata(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of ``folder/metadata.jsonl`` (a split of ``xmgie data synth``), checked.

    Each row needs ``source_file``, ``target_file`` and ``mask_file`` (paths relative to ``folder``,
    files that exist) and a known ``kind``; blank lines are skipped.

    Raises:
        EditInputError: ``paired_not_found`` for a missing folder or file, ``invalid_metadata`` naming the
            line of a row that is not a JSON object, lacks a key, has an unknown kind or names a missing file.
    """
    folder = Path(folder)
    path = folder / METADATA_FILE
    if not path.is_file():
        raise EditInputError("paired_not_found", f"{str(path)!r} does not exist: not a paired (synth split) folder")
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise EditInputError("invalid_metadata", f"{where} is not JSON: {error}") from error
        if not isinstance(row, dict):
            raise EditInputError("invalid_metadata", f"{where} is not a JSON object")
        lacks = [key for key in REQUIRED_KEYS if not isinstance(row.get(key), str) or not row.get(key)]
        if lacks:
            raise EditInputError("invalid_metadata", f"{where} lacks {', '.join(lacks)}")
        if row["kind"] not in KIND_KEYWORDS:
            raise EditInputError("invalid_metadata", f"{where} has unknown kind {row['kind']!r}")
        for key in REQUIRED_KEYS[:3]:
            if not (folder / row[key]).is_file():
                raise EditInputError("invalid_metadata", f"{where}: {key} {row[key]!r} does not exist")
        row["line"] = number
        rows.append(row)
    if not rows:
        raise EditInputError("invalid_metadata", f"{path} has no rows")
    return rows


def _read_results(path: Path) -> dict[str, dict[str, Any]]:
    """``xmgie batch``'s ``results.jsonl`` rows by the file name of their input image."""
    if not path.is_file():
        raise EditInputError("results_not_found", f"results file {str(path)!r} does not exist")
    found: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise EditInputError("invalid_results", f"{path} line {number} is not JSON: {error}") from error
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            raise EditInputError("invalid_results", f"{path} line {number} is not an object with an 'image'")
        found[Path(row["image"]).name] = row
    return found


def _results_file(value: Any, results_path: Path) -> Path | None:
    """A file a results row names: as written, or relative to the results file's folder."""
    if not isinstance(value, str) or not value:
        return None
    path = Path(value)
    if path.is_file():
        return path
    nearby = results_path.parent / path.name
    return nearby if nearby.is_file() else None


def _output_for(outputs: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        candidate = outputs / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def evaluate_paired(
    paired: str | os.PathLike,
    outputs: str | os.PathLike,
    *,
    results: str | os.PathLike | None = None,
    far_px: float = DEFAULT_FAR_PX,
) -> dict[str, Any]:
    """Score the outputs of a synthetic split's items against their targets (``xmgie eval --paired``).

    The output of a row is ``outputs/<stem of source_file>.<image suffix>`` (``images/00003_source.png``
    → ``outputs/00003_source.png``). With ``results`` (``xmgie batch``'s ``results.jsonl``), a row is
    matched to the results row whose ``image`` has its source's file name; that gives ``edit_scope``,
    the ``expressive_instruction`` and the estimated mask (the results' ``mask`` file; an item reported
    ``global`` without a mask counts as estimating the whole image), and an item with no output under
    ``outputs`` uses the output the results row names. Without ``results`` the metadata's expressive
    instruction is not used: it is the dataset's, not the model's.

    Returns:
        ``{"rows": [per-item scores with line, source_file, kind, scope, output], "table": aggregate by kind,
        "scopes": aggregate by scope, "missing": [source files without an output]}``.

    Raises:
        EditInputError: as :func:`read_paired_metadata`; ``outputs_not_found`` for a missing outputs
            folder; ``invalid_image`` naming the row whose images cannot be read or compared.
    """
    paired = Path(paired)
    outputs = Path(outputs)
    rows = read_paired_metadata(paired)
    if not outputs.is_dir():
        raise EditInputError("outputs_not_found", f"outputs folder {str(outputs)!r} does not exist")
    results_path = Path(results) if results is not None else None
    reported = _read_results(results_path) if results_path is not None else {}

    scored: list[dict[str, Any]] = []
    missing: list[str] = []
    for row in rows:
        source_path = paired / row["source_file"]
        result = reported.get(source_path.name)
        output = _output_for(outputs, source_path.stem)
        if output is None and result is not None and results_path is not None:
            output = _results_file(result.get("output"), results_path)
        if output is None:
            missing.append(row["source_file"])
            continue
        estimated: Any = None
        edit_scope = expressive = None
        if result is not None and results_path is not None:
            edit_scope = result.get("edit_scope")
            expressive = result.get("expressive_instruction")
            estimated = _results_file(result.get("mask"), results_path)
            if estimated is None and edit_scope == "global":
                estimated = np.ones((1, 1), dtype=bool)
        try:
            scores = item_scores(
                source_path,
                paired / row["target_file"],
                output,
                paired / row["mask_file"],
                estimated_mask=estimated,
                edit_scope=edit_scope,
                expressive=expressive,
                kind=row["kind"],
                reference_expressive=row.get("expressive_instruction"),
                far_px=far_px,
            )
        except (OSError, ValueError) as error:
            code, message = (
                (error.code, error.message) if isinstance(error, EditInputError) else ("invalid_image", error)
            )
            raise EditInputError(code, f"{paired / METADATA_FILE} line {row['line']}: {message}") from error
        scored.append(
            {
                "line": row["line"],
                "source_file": row["source_file"],
                "kind": row["kind"],
                "scope": row.get("scope", "global" if row["kind"] in GLOBAL_KINDS else "local"),
                "output": str(output),
                **scores,
            }
        )
    return {
        "rows": scored,
        "table": aggregate(scored, by="kind"),
        "scopes": aggregate(scored, by="scope"),
        "missing": missing,
    }
