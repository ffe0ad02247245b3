"""Images, masks and instructions as users hand them over, turned into what the model expects.

Uploads arrive as paths, raw bytes or Pillow images in every mode a camera, a phone or an
image editor produces: rotated by an EXIF tag, with transparency, palette based, 16 bits per
sample, CMYK. :func:`load_image` and :func:`load_mask` turn all of them into one RGB image and
one ``L`` mask, and report input that cannot be used as :class:`EditInputError` with a stable
code:

``image_not_found``
    the path does not exist.
``empty_image``
    a file of 0 bytes, or an image with zero width or height.
``not_an_image``
    the data is not in an image format Pillow can read.
``truncated_image``
    the file is cut short or damaged, so its pixels cannot be decoded.
``image_too_large``
    more pixels than Pillow's decompression-bomb limit allows.
``mask_aspect_mismatch``
    the mask's aspect ratio differs from the image's by more than 1%.
``empty_instruction`` / ``instruction_too_long``
    see :func:`check_instruction`.
"""

from __future__ import annotations

import io
import operator
import os
import struct
from fractions import Fraction
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from xmgie.editing.errors import EditInputError

if TYPE_CHECKING:
    import torch

ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image

MAX_INSTRUCTION_CHARS = 1000
"""Longest instruction accepted, counted after stripping surrounding whitespace."""

MASK_ASPECT_TOLERANCE = 0.01
"""Largest relative difference between mask and image aspect ratios that is resized away."""

_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_UINT16_MAX = 65535


def load_image(source: ImageSource) -> Image.Image:
    """Load an image to edit as an 8-bit RGB image, upright as its EXIF orientation says.

    ``source`` is a path, the bytes of an image file, or a Pillow image. Transparent pixels
    (RGBA, LA, palette or grayscale images with a transparent colour) are composited over
    white; grayscale, 1-bit, palette and CMYK images are converted to RGB; 16-bit grayscale
    is scaled from its full 0..65535 range to 0..255. Pillow itself reduces 16-bit RGB PNGs
    to 8 bits per channel when it opens them.

    Raises:
        EditInputError: ``image_not_found``, ``empty_image``, ``not_an_image``,
            ``truncated_image`` or ``image_too_large``; the message names the source.
    """
    image = _read(source, "image")
    return _to_rgb(image)


def load_mask(source: ImageSource, size: tuple[int, int]) -> Image.Image:
    """Load the mask of the region to edit as an ``L`` image of ``size`` (width, height).

    White (255) marks pixels to edit, black (0) pixels to keep; grey values are kept as they
    are, for soft edges. Conversion from other modes:

    - a mask with an alpha channel whose colour is the same in every pixel (a brush stroke
      painted on an otherwise empty layer) uses its alpha channel;
    - every other mask uses the luminance of its colour channels, ignoring any alpha;
    - 16-bit grayscale is scaled from its full 0..65535 range.

    A mask whose aspect ratio is within 1% (relative) of ``size`` is resized to ``size``
    with bilinear filtering, so a mask drawn on a scaled copy of the image still fits.

    Raises:
        EditInputError: ``mask_aspect_mismatch`` when the aspect ratios differ by more, and
            the codes of :func:`load_image` for a mask that cannot be read.
        ValueError: ``size`` has a side that is not a positive integer.
    """
    width, height = (operator.index(side) for side in size)
    if width <= 0 or height <= 0:
        raise ValueError(f"mask size must be positive, got {size!r}")
    mask = _to_l(_read(source, "mask"))
    if mask.size == (width, height):
        return mask
    mask_aspect = Fraction(mask.width, mask.height)
    image_aspect = Fraction(width, height)
    if abs(mask_aspect - image_aspect) / image_aspect > Fraction(MASK_ASPECT_TOLERANCE):
        raise EditInputError(
            "mask_aspect_mismatch",
            f"mask is {mask.width}x{mask.height} but the image is {width}x{height}; their aspect ratios differ "
            f"by more than {MASK_ASPECT_TOLERANCE:.0%}, so the mask cannot be scaled to fit",
        )
    return mask.resize((width, height), Image.Resampling.BILINEAR)


def working_size(width: int, height: int, max_side: int = 512, multiple: int = 8) -> tuple[int, int]:
    """Size (width, height) the model works at for an image of ``width`` x ``height``.

    The image is scaled down, keeping its aspect ratio, until its long side is at most
    ``max_side`` (never scaled up), then each side is rounded to the nearest multiple of
    ``multiple``, at least ``multiple`` and at most the largest multiple within ``max_side``.

    Raises:
        EditInputError: ``empty_image`` when a side is zero or negative.
        ValueError: ``multiple`` is not positive or ``max_side`` is smaller than ``multiple``.
    """
    width, height = operator.index(width), operator.index(height)
    max_side, multiple = operator.index(max_side), operator.index(multiple)
    if multiple <= 0:
        raise ValueError(f"multiple must be positive, got {multiple}")
    if max_side < multiple:
        raise ValueError(f"max_side must be at least multiple ({multiple}), got {max_side}")
    if width <= 0 or height <= 0:
        raise EditInputError("empty_image", f"image has no pixels: its size is {width}x{height}")
    scale = min(Fraction(1), Fraction(max_side, max(width, height)))
    largest = max_side // multiple * multiple

    def fit(side: int) -> int:
        # Exact fractions and round-half-up keep the result independent of float error.
        steps = int(side * scale / multiple + Fraction(1, 2))
        return min(largest, max(multiple, steps * multiple))

    return fit(width), fit(height)


def to_working_size(
    image: Image.Image,
    max_side: int = 512,
    multiple: int = 8,
    resample: Image.Resampling = Image.Resampling.LANCZOS,
) -> Image.Image:
    """Resize ``image`` to :func:`working_size`; an image already that size is returned as is."""
    size = working_size(image.width, image.height, max_side=max_side, multiple=multiple)
    if image.size == size:
        return image
    return image.resize(size, resample)


def check_instruction(text: str | None, max_chars: int = MAX_INSTRUCTION_CHARS) -> str:
    """Return the edit instruction stripped of surrounding whitespace.

    Raises:
        EditInputError: ``empty_instruction`` for ``None`` or blank text,
            ``instruction_too_long`` above ``max_chars`` characters (default :data:`MAX_INSTRUCTION_CHARS`).
        TypeError: ``text`` is neither a string nor ``None``.
    """
    if text is None:
        raise EditInputError("empty_instruction", "instruction is missing")
    if not isinstance(text, str):
        raise TypeError(f"instruction must be a string, got {type(text).__name__}")
    stripped = text.strip()
    if not stripped:
        raise EditInputError("empty_instruction", "instruction is empty")
    if len(stripped) > max_chars:
        raise EditInputError(
            "instruction_too_long", f"instruction has {len(stripped)} characters; at most {max_chars} are allowed"
        )
    return stripped


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 tensor in [-1, 1] of an image; non-RGB images are converted as by :func:`load_image`."""
    import torch

    pixels = np.asarray(_to_rgb(image), dtype=np.uint8)
    tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1).to(torch.float32)
    return tensor / 255.0 * 2.0 - 1.0


def tensor_to_image(t: torch.Tensor) -> Image.Image:
    """RGB image of a (3, H, W) tensor in [-1, 1], clamped and rounded as diffusers' ``numpy_to_pil``.

    Raises:
        ValueError: ``t`` is not shaped (3, H, W).
    """
    if t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(t.shape)}")
    import torch

    unit = (t.detach().to("cpu", torch.float32) / 2 + 0.5).clamp(0, 1)
    pixels = (unit * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(pixels)


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """(1, H, W) float32 tensor in [0, 1] of an ``L`` mask, 1 where the image is to be edited.

    Raises:
        ValueError: ``mask`` is not mode ``L``.
    """
    if mask.mode != "L":
        raise ValueError(f"expected a mode L mask, got mode {mask.mode}; load it with load_mask")
    import torch

    pixels = np.asarray(mask, dtype=np.uint8)
    return torch.from_numpy(pixels.copy()).to(torch.float32).div_(255.0).unsqueeze(0)


def _describe(source: ImageSource) -> str:
    if isinstance(source, bytes | bytearray | memoryview):
        return "uploaded bytes"
    if isinstance(source, Image.Image):
        filename = getattr(source, "filename", "")
        return f"image object from {filename}" if filename else "image object"
    return os.fspath(source)


def _read(source: ImageSource, what: str) -> Image.Image:
    """Open, fully decode and EXIF-rotate ``source``; ``what`` ("image" or "mask") starts each message."""
    label = _describe(source)
    if isinstance(source, Image.Image):
        _decode(source, what, label)
        image = source
    elif isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        if not data:
            raise EditInputError("empty_image", f"{what} {label} are empty (0 bytes)")
        image = _open(io.BytesIO(data), what, label)
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.exists():
            raise EditInputError("image_not_found", f"{what} not found: {label}")
        if path.is_dir():
            raise EditInputError("not_an_image", f"{what} {label} is a directory, not an image file")
        if path.stat().st_size == 0:
            raise EditInputError("empty_image", f"{what} file {label} is empty (0 bytes)")
        with path.open("rb") as fp:
            image = _open(fp, what, label)
    else:
        raise TypeError(f"{what} must be a path, bytes or a PIL image, got {type(source).__name__}")
    if image.width <= 0 or image.height <= 0:
        raise EditInputError("empty_image", f"{what} {label} has no pixels: its size is {image.width}x{image.height}")
    try:
        upright = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, struct.error):
        # A damaged EXIF block should not cost the user the picture: use it as stored.
        upright = image.copy()
    return upright if upright is not None else image


def _open(fp: IO[bytes], what: str, label: str) -> Image.Image:
    """Open and decode the image in ``fp`` while it is open, so nothing is read from it later."""
    try:
        image = Image.open(fp)
    except Image.DecompressionBombError as error:
        raise EditInputError("image_too_large", f"{what} {label} has too many pixels: {error}") from error
    except UnidentifiedImageError as error:
        raise EditInputError("not_an_image", f"{what} {label} is not an image Pillow can read") from error
    except (OSError, EOFError, struct.error) as error:
        # The format was recognised, but the header ends early.
        raise EditInputError("truncated_image", f"{what} {label} is cut short or damaged: {error}") from error
    except (SyntaxError, ValueError) as error:
        raise EditInputError("not_an_image", f"{what} {label} is not a valid image: {error}") from error
    _decode(image, what, label)
    return image


def _decode(image: Image.Image, what: str, label: str) -> None:
    # Pillow decodes lazily; without load() a truncated file only fails later, far from here.
    try:
        image.load()
    except Image.DecompressionBombError as error:
        raise EditInputError("image_too_large", f"{what} {label} has too many pixels: {error}") from error
    except (OSError, EOFError, SyntaxError, ValueError, struct.error) as error:
        raise EditInputError("truncated_image", f"{what} {label} is cut short or damaged: {error}") from error


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def _to_rgba(image: Image.Image) -> Image.Image:
    if image.mode == "La":
        # Pillow converts premultiplied La only to LA.
        image = image.convert("LA")
    return image.convert("RGBA")


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """8-bit ``L`` image of a 16-bit or 32-bit integer grayscale image, scaled rather than clipped."""
    values = np.asarray(image).astype(np.float64)
    # Mode I normally holds 16-bit samples (Pillow's decoding of 16-bit PNG and TIFF); wider
    # values are scaled by their own maximum so that they are not clipped either.
    top = max(float(values.max(initial=0.0)), _UINT16_MAX)
    scaled = np.rint(np.clip(values, 0.0, None) * (255.0 / top))
    return Image.fromarray(scaled.astype(np.uint8))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_l(image).convert("RGB")
    if _has_alpha(image):
        background = Image.new("RGBA", image.size, _WHITE)
        return Image.alpha_composite(background, _to_rgba(image)).convert("RGB")
    return image.convert("RGB")


def _to_l(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_l(image)
    if _has_alpha(image):
        rgba = np.asarray(_to_rgba(image))
        colour = rgba[..., :3]
        if (colour == colour[0, 0]).all():
            return Image.fromarray(np.ascontiguousarray(rgba[..., 3]))
        return Image.fromarray(np.ascontiguousarray(colour)).convert("L")
    if image.mode == "L":
        return image
    return image.convert("L")
