"""A synthetic paired dataset whose targets are computed exactly: ``xmgie data synth``.

Sources are crops (random position and scale, random horizontal flip) of a few photos, resized to
``size×size``. Each item is one edit kind:

- global kinds, a pixel-wise colour transform of the whole crop (black and white, sepia, invert,
  brighter, darker, more contrast, warmer, cooler, night); the mask is the whole image;
- local kinds on a shape (circle, square or triangle) drawn without anti-aliasing at a named place
  of a 3×3 grid: *add* draws it on the crop, *remove* has it on the source and the clean crop as the
  target, *recolour* has it in one colour on the source and another on the target. The mask is the
  shape's pixels, and exactly those pixels differ between source and target (a shape whose colour
  equals a pixel under it is drawn again elsewhere).

Every item gets one of several phrasings of its instruction and an expressive instruction written
from the edit that names its kind. The output has one folder per split, ``train/`` and ``test/``,
each in the layout of :mod:`xmgie.training.data`; the two splits never share a source photo. Item
``i`` of a split depends only on (seed, split, i) — its crop and edit not even on ``colour_jitter``, whose draws
come from a stream of their own — so the same seed gives identical files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from xmgie.editing.errors import EditInputError
from xmgie.editing.images import load_image
from xmgie.quality import CHROMA
from xmgie.training.data import METADATA_FILE

BUNDLED_PHOTOS = Path(__file__).resolve().parents[2] / "examples"
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SPLITS = ("train", "test")

LUMA = np.array([0.299, 0.587, 0.114])
SEPIA = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]])
YIQ = np.vstack([LUMA, CHROMA])
"""RGB to YIQ: luma (:data:`LUMA`) and the two chroma axes."""
RGB_FROM_YIQ = np.linalg.inv(YIQ)
SATURATION_RANGE = (0.6, 1.4)
"""Bounds of the factor by which :func:`jitter_colours` scales a crop's saturation."""


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _luma(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float64) @ LUMA


GLOBAL_TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "black_and_white": lambda x: _to_uint8(np.repeat(_luma(x)[..., None], 3, axis=-1)),
    "sepia": lambda x: _to_uint8(x.astype(np.float64) @ SEPIA.T),
    "invert": lambda x: 255 - x,
    "brighter": lambda x: _to_uint8(255 - (255 - x.astype(np.float64)) * 0.6),
    "darker": lambda x: _to_uint8(x.astype(np.float64) * 0.6),
    "more_contrast": lambda x: _to_uint8((x.astype(np.float64) - 128) * 1.5 + 128),
    "warmer": lambda x: _to_uint8(x.astype(np.float64) * [1.12, 1.0, 0.8] + [10, 0, 0]),
    "cooler": lambda x: _to_uint8(x.astype(np.float64) * [0.8, 1.0, 1.12] + [0, 0, 10]),
    "night": lambda x: _to_uint8(_luma(x)[..., None] * [0.25, 0.35, 0.6] + [0, 0, 20]),
}
"""Each global kind's exact transform of an (H, W, 3) uint8 array."""

GLOBAL_PHRASINGS = {
    "black_and_white": ["make it black and white", "turn the photo black and white", "remove the colours"],
    "sepia": ["make it sepia", "give the photo a sepia tone", "make it look like an old sepia print"],
    "invert": ["invert the colours", "make it look like a negative", "invert the image"],
    "brighter": ["make it brighter", "brighten the photo", "lighten the image"],
    "darker": ["make it darker", "darken the photo", "dim the image"],
    "more_contrast": ["add more contrast", "increase the contrast", "make the contrast stronger"],
    "warmer": ["make it warmer", "give the photo warmer colours", "warm up the image"],
    "cooler": ["make it cooler", "give the photo cooler colours", "cool down the image"],
    "night": ["turn it into night", "make it look like night", "change the time to night"],
}
GLOBAL_EXPRESSIVE = {
    "black_and_white": "Every colour fades into its shade of grey, a monochrome picture.",
    "sepia": "The whole picture takes on brown sepia hues, as in an aged print.",
    "invert": "Each colour flips to its opposite, as on a film negative.",
    "brighter": "The whole photo becomes brighter, its shadows and colours lighter.",
    "darker": "The whole photo becomes darker, its light parts and colours dimmer.",
    "more_contrast": "The whole photo gets more contrast, dark parts darker and light parts lighter.",
    "warmer": "The whole photo becomes warmer, with more red and less blue.",
    "cooler": "The whole photo becomes cooler, with more blue and less red.",
    "night": "The scene turns to night, the whole photo dark and blue as under moonlight.",
}
"""Each global kind's expressive instruction: it names the kind and shares no three words in a row with any
phrasing of the kind or with MGIE's prompt, since MGIE generates with ``no_repeat_ngram_size=3`` over the prompt
and the answer together — an answer that repeats a trigram of its prompt cannot be generated."""

LOCAL_KINDS = ("add_shape", "remove_shape", "recolour_shape")
KINDS = (*GLOBAL_TRANSFORMS, *LOCAL_KINDS)

PLACES = {
    "top left": (1 / 6, 1 / 6),
    "top": (1 / 2, 1 / 6),
    "top right": (5 / 6, 1 / 6),
    "left": (1 / 6, 1 / 2),
    "center": (1 / 2, 1 / 2),
    "right": (5 / 6, 1 / 2),
    "bottom left": (1 / 6, 5 / 6),
    "bottom": (1 / 2, 5 / 6),
    "bottom right": (5 / 6, 5 / 6),
}
"""Named places: the centre of each cell of a 3×3 grid, as fractions of width and height."""

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 215, 30),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}

LOCAL_PHRASINGS = {
    "add_shape": [
        "add a {colour} {shape} in the {place}",
        "put a {colour} {shape} at the {place} of the picture",
        "draw a {colour} {shape} in the {place}",
    ],
    "remove_shape": [
        "remove the {colour} {shape}",
        "take away the {colour} {shape} in the {place}",
        "erase the {shape}",
    ],
    "recolour_shape": [
        "make the {colour} {shape} {new_colour}",
        "recolour the {shape} {new_colour}",
        "turn the {colour} {shape} {new_colour}",
    ],
}
LOCAL_EXPRESSIVE = {
    "add_shape": "A new {colour} {shape} is added in the image's {place} area, nothing else changes.",
    "remove_shape": "The {colour} {shape} is removed from the image's {place} area, uncovering the photo behind.",
    "recolour_shape": (
        "The {colour} {shape} in the image's {place} area is recoloured {new_colour}, nothing else changes."
    ),
}
"""Short enough for the answer to fit MGIE's generation budget even with a byte-level tokenizer, and free of
the phrasings' trigrams (``the {place}``, ``a {colour} {shape}``) for the reason given under
:data:`GLOBAL_EXPRESSIVE`."""

MIN_CROP_FRACTION = 0.4
"""Crops cover 40–100 % of the photo's short side."""
MAX_SHAPE_TRIES = 20


def find_photos(folder: str | os.PathLike) -> list[Path]:
    """The photos of ``folder`` (not its masks), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EditInputError("photos_not_found", f"photo folder {str(folder)!r} does not exist")
    return sorted(
        path
        for path in folder.iterdir()
        if path.suffix.lower() in PHOTO_SUFFIXES and "mask" not in path.stem and not path.name.startswith(".")
    )


def split_photos(photos: list[Path], seed: int, test_photos: int) -> dict[str, list[Path]]:
    """Assign whole photos to the splits: ``test_photos`` of them, drawn by ``seed``, are held out."""
    if len(photos) < 2:
        raise EditInputError("too_few_photos", f"need at least 2 photos for two splits, found {len(photos)}")
    if not 1 <= test_photos < len(photos):
        raise EditInputError("invalid_option", f"test photos must be between 1 and {len(photos) - 1}")
    order = np.random.default_rng([seed, 1]).permutation(len(photos))
    held_out = sorted(int(i) for i in order[:test_photos])
    return {
        "train": [photo for i, photo in enumerate(photos) if i not in held_out],
        "test": [photos[i] for i in held_out],
    }


def random_crop(photo: Image.Image, size: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """A square crop of random scale and position, flipped half of the time, resized to ``size``."""
    short = min(photo.size)
    side = int(round(short * rng.uniform(MIN_CROP_FRACTION, 1.0)))
    left = int(rng.integers(0, photo.width - side + 1))
    top = int(rng.integers(0, photo.height - side + 1))
    flip = bool(rng.random() < 0.5)
    crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
    if flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop, dtype=np.uint8).copy(), {"crop": [left, top, side], "flip": flip}


def jitter_colours(crop: np.ndarray, rng: np.random.Generator, max_hue: float = 180.0) -> np.ndarray:
    """``crop`` with its hues turned by a random angle of at most ``max_hue`` degrees either way and its
    saturation scaled by a factor drawn from :data:`SATURATION_RANGE`, its luma kept: a rotation and scaling of the
    chroma plane of YIQ (``max_hue`` 180: any hue; 0: saturation only).

    A photo's palette becomes another photo's; the edits' targets are computed from the jittered crop, so the
    model learns each colour edit as a function of the colours it is given, not of the few palettes of the
    bundled photos (a held-out photo's palette is otherwise one it never saw).
    """
    angle = np.radians(rng.uniform(-max_hue, max_hue))
    scale = rng.uniform(*SATURATION_RANGE)
    cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
    chroma = np.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    transform = RGB_FROM_YIQ @ chroma @ YIQ
    return _to_uint8(crop.astype(np.float64) @ transform.T)


def draw_shape_mask(size: int, shape: str, place: str, rng: np.random.Generator) -> np.ndarray:
    """A boolean (size, size) mask of ``shape`` around ``place``, with a random radius and jitter."""
    radius = size * rng.uniform(0.09, 0.15)
    fx, fy = PLACES[place]
    cx = fx * size + rng.uniform(-0.04, 0.04) * size
    cy = fy * size + rng.uniform(-0.04, 0.04) * size
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        draw.rectangle(box, fill=255)
    else:
        draw.polygon([(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)], fill=255)
    return np.asarray(canvas) > 0


def _paint(pixels: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    out = pixels.copy()
    out[mask] = colour
    return out


def _touches_colour(pixels: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> bool:
    """Whether a pixel under the mask already has ``colour`` (it would not change when painted)."""
    return bool(np.all(pixels[mask] == colour, axis=-1).any())


def local_edit(
    kind: str, crop: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, str]]:
    """Source, target, mask and the named parts (shape, place, colours) of one local edit of ``crop``."""
    size = crop.shape[0]
    names = list(COLOURS)
    for _ in range(MAX_SHAPE_TRIES):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        place = list(PLACES)[int(rng.integers(len(PLACES)))]
        colour, new_colour = (names[int(i)] for i in rng.choice(len(names), size=2, replace=False))
        mask = draw_shape_mask(size, shape, place, rng)
        if mask.any() and not _touches_colour(crop, mask, COLOURS[colour]):
            break
    else:
        raise RuntimeError("could not place a shape whose colour differs from every pixel under it")
    parts = {"shape": shape, "place": place, "colour": colour, "new_colour": new_colour}
    painted = _paint(crop, mask, COLOURS[colour])
    if kind == "add_shape":
        return crop, painted, mask, parts
    if kind == "remove_shape":
        return painted, crop, mask, parts
    return painted, _paint(crop, mask, COLOURS[new_colour]), mask, parts


def synth_item(
    kind: str,
    photo: Image.Image,
    size: int,
    rng: np.random.Generator,
    jitter: np.random.Generator | None = None,
    max_hue: float = 180.0,
) -> dict[str, Any]:
    """One item: source, target and mask arrays, instruction, expressive instruction and a description.

    With ``jitter``, the crop's colours are jittered (:func:`jitter_colours`, drawn from ``jitter``) before the edit.
    """
    crop, placement = random_crop(photo, size, rng)
    if jitter is not None:
        crop = jitter_colours(crop, jitter, max_hue)
        placement["colour_jitter"] = True
    if kind in GLOBAL_TRANSFORMS:
        source, target = crop, GLOBAL_TRANSFORMS[kind](crop)
        mask = np.ones(crop.shape[:2], dtype=bool)
        phrasings = GLOBAL_PHRASINGS[kind]
        instruction = phrasings[int(rng.integers(len(phrasings)))]
        expressive = GLOBAL_EXPRESSIVE[kind]
        info: dict[str, Any] = {"scope": "global"}
    else:
        source, target, mask, parts = local_edit(kind, crop, rng)
        phrasings = LOCAL_PHRASINGS[kind]
        instruction = phrasings[int(rng.integers(len(phrasings)))].format(**parts)
        expressive = LOCAL_EXPRESSIVE[kind].format(**parts)
        info = {"scope": "local", **parts}
    return {
        "source": source,
        "target": target,
        "mask": mask,
        "instruction": instruction,
        "expressive_instruction": expressive,
        "kind": kind,
        **info,
        **placement,
    }


def _write_metadata(folder: Path, rows: list[dict[str, Any]]) -> None:
    """``folder/metadata.jsonl``: one JSON object per row."""
    with (folder / METADATA_FILE).open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def split_counts(count: int, test_fraction: float) -> dict[str, int]:
    """Items per split: ``test_fraction`` of ``count`` held out (at least one of each when ``count`` ≥ 2)."""
    if count < 2:
        raise EditInputError("invalid_option", f"count must be at least 2 (one item per split), got {count}")
    if not 0 < test_fraction < 1:
        raise EditInputError("invalid_option", f"test fraction must be between 0 and 1, got {test_fraction}")
    test = min(count - 1, max(1, round(count * test_fraction)))
    return {"train": count - test, "test": test}


def write_synthetic_dataset(
    output: str | os.PathLike,
    count: int,
    *,
    seed: int = 0,
    size: int = 128,
    photos: str | os.PathLike = BUNDLED_PHOTOS,
    test_fraction: float = 0.2,
    test_photos: int = 1,
    kinds: tuple[str, ...] = KINDS,
    colour_jitter: float = 0.0,
    colour_jitter_hue: float = 180.0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Write ``count`` items under ``output/train`` and ``output/test``; return the items per split.

    Kinds take turns (item ``i`` of a split is kind ``i mod len(kinds)``) so that every kind has its
    share of both splits. A ``colour_jitter`` share of the training items (drawn per item) have their crop's
    colours jittered before the edit (:func:`jitter_colours`, hues turned by at most ``colour_jitter_hue`` degrees;
    their row says ``"colour_jitter": true``); the test split keeps the photos' own colours. ``progress`` is called
    with 1 after each item.
    """
    output = Path(output)
    if size < 16:
        raise EditInputError("invalid_option", f"size must be at least 16 pixels, got {size}")
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        raise EditInputError("invalid_option", f"unknown kinds {unknown}; choose from {', '.join(KINDS)}")
    if not 0 <= colour_jitter <= 1:
        raise EditInputError("invalid_option", f"colour jitter must be between 0 and 1, got {colour_jitter}")
    if not 0 <= colour_jitter_hue <= 180:
        raise EditInputError(
            "invalid_option", f"colour jitter hue must be between 0 and 180 degrees, got {colour_jitter_hue}"
        )
    if output.exists() and any(output.iterdir()):
        raise EditInputError("output_exists", f"output folder {str(output)!r} exists and is not empty")
    counts = split_counts(count, test_fraction)
    assignment = split_photos(find_photos(photos), seed, test_photos)
    for split_index, split in enumerate(SPLITS):
        images = [load_image(path) for path in assignment[split]]
        folder = output / split
        (folder / "images").mkdir(parents=True, exist_ok=True)
        rows = []
        for index in range(counts[split]):
            rng = np.random.default_rng([seed, 2, split_index, index])
            photo_index = int(rng.integers(len(images)))
            jitter = None
            if split == "train" and colour_jitter > 0:
                jitter = np.random.default_rng([seed, 3, split_index, index])
                if jitter.random() >= colour_jitter:
                    jitter = None
            item = synth_item(kinds[index % len(kinds)], images[photo_index], size, rng, jitter, colour_jitter_hue)
            stem = f"images/{index:05d}"
            Image.fromarray(item.pop("source")).save(folder / f"{stem}_source.png")
            Image.fromarray(item.pop("target")).save(folder / f"{stem}_target.png")
            Image.fromarray(item.pop("mask").astype(np.uint8) * 255, "L").save(folder / f"{stem}_mask.png")
            rows.append(
                {
                    "source_file": f"{stem}_source.png",
                    "target_file": f"{stem}_target.png",
                    "mask_file": f"{stem}_mask.png",
                    "instruction": item.pop("instruction"),
                    "expressive_instruction": item.pop("expressive_instruction"),
                    "split": split,
                    "photo": assignment[split][photo_index].name,
                    **item,
                }
            )
            if progress is not None:
                progress(1)
        # The manifest is written last, so it never names a missing file.
        _write_metadata(folder, rows)
    settings = {
        "seed": seed,
        "size": size,
        "count": count,
        "kinds": list(kinds),
        "colour_jitter": colour_jitter,
        "colour_jitter_hue": colour_jitter_hue,
        "photos": {split: [path.name for path in assignment[split]] for split in SPLITS},
    }
    (output / "synth.json").write_text(json.dumps(settings, indent=2) + "\n")
    return counts


def write_whole_photo_items(
    output: str | os.PathLike,
    photos: str | os.PathLike = BUNDLED_PHOTOS,
    *,
    kinds: tuple[str, ...] = tuple(GLOBAL_TRANSFORMS),
) -> list[dict[str, Any]]:
    """Write every photo of ``photos`` whole, at its own size, with each global kind's exact target, as a paired
    folder (``output/metadata.jsonl``, images under ``output/images``); return its rows.

    A synthetic split holds square crops at the training size; an edit asked of a whole photo sees it at another
    scale and shape (a 3:2 photo is worked on at 64 × 43 by ``mini``). These items score edits the way users ask
    for them. Each row has the kind's first phrasing and its expressive instruction, a mask of the whole photo,
    ``scope`` ``global`` and the photo's name.
    """
    unknown = [kind for kind in kinds if kind not in GLOBAL_TRANSFORMS]
    if unknown or not kinds:
        raise EditInputError(
            "invalid_option", f"unknown global kinds {unknown}; choose from {list(GLOBAL_TRANSFORMS)}"
        )
    output = Path(output)
    (output / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for path in find_photos(photos):
        source = np.asarray(load_image(path), dtype=np.uint8)
        source_file, mask_file = f"images/{path.stem}_source.png", f"images/{path.stem}_mask.png"
        Image.fromarray(source).save(output / source_file)
        Image.fromarray(np.full(source.shape[:2], 255, dtype=np.uint8), "L").save(output / mask_file)
        for kind in kinds:
            target_file = f"images/{path.stem}_{kind}.png"
            Image.fromarray(GLOBAL_TRANSFORMS[kind](source)).save(output / target_file)
            rows.append(
                {
                    "source_file": source_file,
                    "target_file": target_file,
                    "mask_file": mask_file,
                    "instruction": GLOBAL_PHRASINGS[kind][0],
                    "expressive_instruction": GLOBAL_EXPRESSIVE[kind],
                    "photo": path.name,
                    "kind": kind,
                    "scope": "global",
                }
            )
    _write_metadata(output, rows)
    return rows
