"""Paired editing data: a folder with ``metadata.jsonl`` rows of source, target and instruction.

The layout is the one MagicBrush- and InstructPix2Pix-style data converts to::

    DIR/metadata.jsonl    {"source_file": "a.png", "target_file": "a_edit.png", "instruction": "...",
                           "expressive_instruction": "...", "mask_file": "a_mask.png"}

``expressive_instruction`` (else the instruction is used) and ``mask_file`` (white = edited region;
else the whole image) are optional; paths are relative to ``DIR``. Images may have any size: source,
target and mask of a row are resized and center-cropped alike to the training size, so they must
share an aspect ratio. Every row is checked when the dataset is opened, so a bad row stops training
before the first step with an error naming its line, never mid-epoch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from xmgie.editing.errors import EditInputError
from xmgie.editing.images import MASK_ASPECT_TOLERANCE, image_to_tensor, load_image, load_mask, mask_to_tensor

METADATA_FILE = "metadata.jsonl"
REQUIRED_COLUMNS = ("source_file", "target_file", "instruction")
OPTIONAL_COLUMNS = ("expressive_instruction", "mask_file")


@dataclass(frozen=True)
class EditPair:
    """One checked row of ``metadata.jsonl``; paths are absolute, ``line`` is 1-based."""

    line: int
    source_path: Path
    target_path: Path
    instruction: str
    expressive_instruction: str
    mask_path: Path | None
    extra: dict[str, Any]


def _row_error(metadata: Path, line: int, message: str) -> EditInputError:
    return EditInputError("invalid_metadata_row", f"{metadata} line {line}: {message}")


def _image_size(path: Path, column: str, metadata: Path, line: int) -> tuple[int, int]:
    """The size of the image at ``path`` after a header read and an integrity check of its data."""
    if not path.is_file():
        raise _row_error(metadata, line, f"{column} {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
    except (OSError, SyntaxError, ValueError) as error:
        raise _row_error(metadata, line, f"{column} {str(path)!r} is not a readable image ({error})") from None
    if size[0] <= 0 or size[1] <= 0:
        raise _row_error(metadata, line, f"{column} {str(path)!r} is empty")
    return size


def _same_aspect(a: tuple[int, int], b: tuple[int, int]) -> bool:
    aspect_a, aspect_b = Fraction(*a), Fraction(*b)
    return abs(aspect_a - aspect_b) / aspect_b <= Fraction(MASK_ASPECT_TOLERANCE)


def read_pairs(folder: str | os.PathLike) -> list[EditPair]:
    """Read and check every row of ``folder/metadata.jsonl``.

    Raises:
        EditInputError: ``metadata_not_found`` when the file is missing, ``empty_dataset`` when it has no
            row, ``invalid_metadata_row`` naming the file and line of the first bad row (not JSON, not an
            object, a required column missing or empty, a file missing or unreadable, a target or mask whose
            aspect ratio differs from the source's).
    """
    folder = Path(folder)
    metadata = folder / METADATA_FILE
    if not metadata.is_file():
        raise EditInputError("metadata_not_found", f"{str(folder)!r} has no {METADATA_FILE}")
    pairs: list[EditPair] = []
    with metadata.open(encoding="utf-8") as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                raise _row_error(metadata, line, f"not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise _row_error(metadata, line, f"expected a JSON object, got {type(row).__name__}")
            for column in REQUIRED_COLUMNS:
                value = row.get(column)
                if not isinstance(value, str) or not value.strip():
                    raise _row_error(metadata, line, f"{column!r} must be a non-empty string, got {value!r}")
            for column in OPTIONAL_COLUMNS:
                value = row.get(column)
                if value is not None and (not isinstance(value, str) or not value.strip()):
                    raise _row_error(metadata, line, f"{column!r} must be a non-empty string when given")
            source = folder / row["source_file"]
            target = folder / row["target_file"]
            mask = folder / row["mask_file"] if row.get("mask_file") else None
            source_size = _image_size(source, "source_file", metadata, line)
            for column, path in (("target_file", target), ("mask_file", mask)):
                if path is None:
                    continue
                size = _image_size(path, column, metadata, line)
                if not _same_aspect(size, source_size):
                    raise _row_error(
                        metadata,
                        line,
                        f"{column} is {size[0]}x{size[1]} but source_file is {source_size[0]}x{source_size[1]}: "
                        "their aspect ratios differ",
                    )
            instruction = row["instruction"].strip()
            expressive = (row.get("expressive_instruction") or instruction).strip()
            extra = {key: value for key, value in row.items() if key not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS}
            pairs.append(EditPair(line, source, target, instruction, expressive, mask, extra))
    if not pairs:
        raise EditInputError("empty_dataset", f"{metadata} has no rows")
    return pairs


def resize_center_crop(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """Scale ``image`` so its short side is ``size``, then cut the central ``size×size`` square."""
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), resample)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


class PairedEditDataset(Dataset):
    """A paired folder as training items at ``resolution×resolution`` pixels.

    Each item is a dict: ``source_pixels`` and ``target_pixels`` (3, R, R) in [-1, 1], ``mask`` (1, R, R)
    in [0, 1] (ones without a mask file), ``source_image`` (the cropped source, for the MLLM's image
    processor), ``instruction``, ``expressive_instruction`` and ``index``.
    """

    def __init__(self, folder: str | os.PathLike, resolution: int, pairs: list[EditPair] | None = None) -> None:
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.folder = Path(folder)
        self.resolution = resolution
        self.pairs = pairs if pairs is not None else read_pairs(self.folder)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        bicubic = Image.Resampling.BICUBIC
        source_full = load_image(pair.source_path)
        source = resize_center_crop(source_full, self.resolution, bicubic)
        target = resize_center_crop(load_image(pair.target_path), self.resolution, bicubic)
        if pair.mask_path is not None:
            mask_image = load_mask(pair.mask_path, source_full.size)
            mask = mask_to_tensor(resize_center_crop(mask_image, self.resolution, Image.Resampling.BILINEAR))
        else:
            mask = torch.ones(1, self.resolution, self.resolution)
        return {
            "index": index,
            "source_image": source,
            "source_pixels": image_to_tensor(source),
            "target_pixels": image_to_tensor(target),
            "mask": mask,
            "instruction": pair.instruction,
            "expressive_instruction": pair.expressive_instruction,
        }


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors and keep images and texts as lists."""
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch
