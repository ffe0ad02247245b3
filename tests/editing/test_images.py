from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xmgie.editing.errors import EditInputError
from xmgie.editing.images import (
    MAX_INSTRUCTION_CHARS,
    check_instruction,
    image_to_tensor,
    load_image,
    load_mask,
    mask_to_tensor,
    tensor_to_image,
    to_working_size,
    working_size,
)

RED = (255, 0, 0)
BLUE = (0, 0, 255)
GREEN = (0, 255, 0)
WHITE = (255, 255, 255)


def _png_bytes(image: Image.Image, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **params)
    return buffer.getvalue()


def _raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: list[bytes]) -> bytes:
    """A PNG assembled chunk by chunk, for pixel formats Pillow cannot write itself."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\x00" + row for row in rows))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def _quadrants(width: int, height: int) -> Image.Image:
    """Red top-left, green top-right, blue bottom-left, white bottom-right."""
    image = Image.new("RGB", (width, height), WHITE)
    half_w, half_h = width // 2, height // 2
    image.paste(RED, (0, 0, half_w, half_h))
    image.paste(GREEN, (half_w, 0, width, half_h))
    image.paste(BLUE, (0, half_h, half_w, height))
    return image


def _exif_orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def _close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


# load_image: orientation and modes


def test_exif_orientation_6_png_rotates_size_and_pixels(tmp_path: Path) -> None:
    path = tmp_path / "rotated.png"
    _quadrants(60, 40).save(path, exif=_exif_orientation(6))

    image = load_image(path)

    assert image.mode == "RGB"
    assert image.size == (40, 60)
    # Orientation 6 means "rotate 90 degrees clockwise to display": the stored top-left goes top-right.
    assert image.getpixel((39, 0)) == RED
    assert image.getpixel((0, 0)) == BLUE
    assert image.getpixel((39, 59)) == GREEN
    assert image.getpixel((0, 59)) == WHITE


def test_exif_orientation_6_jpeg_from_bytes() -> None:
    buffer = io.BytesIO()
    _quadrants(80, 48).save(buffer, "JPEG", quality=95, exif=_exif_orientation(6))

    image = load_image(buffer.getvalue())

    assert image.size == (48, 80)
    assert _close(image.getpixel((46, 1)), RED, 12)
    assert _close(image.getpixel((1, 1)), BLUE, 12)


def test_rgba_transparent_becomes_white_and_opaque_red_stays_red() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((1, 1), (0, 0, 0, 0))
    rgba.putpixel((2, 2), (0, 0, 255, 128))

    image = load_image(_png_bytes(rgba))

    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == RED
    assert image.getpixel((1, 1)) == WHITE
    # Half-transparent blue over white is a light blue, not blue and not black.
    assert _close(image.getpixel((2, 2)), (127, 127, 255), 1)


def test_la_transparent_becomes_white() -> None:
    la = Image.new("LA", (2, 1), (0, 255))
    la.putpixel((1, 0), (0, 0))

    image = load_image(la)

    assert image.getpixel((0, 0)) == (0, 0, 0)
    assert image.getpixel((1, 0)) == WHITE


def test_palette_with_transparency_becomes_white(tmp_path: Path) -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    path = tmp_path / "transparent.gif"
    palette.save(path, transparency=0)

    image = load_image(path)

    assert image.getpixel((0, 0)) == WHITE
    assert image.getpixel((1, 0)) == RED


def test_palette_colours_preserved() -> None:
    colours = [RED, GREEN, BLUE, (12, 34, 56)]
    palette = Image.new("P", (4, 1))
    palette.putpalette([channel for colour in colours for channel in colour] + [0] * (768 - 12))
    for x in range(4):
        palette.putpixel((x, 0), x)

    image = load_image(_png_bytes(palette))

    assert image.mode == "RGB"
    assert [image.getpixel((x, 0)) for x in range(4)] == colours


def test_grayscale_and_one_bit_become_rgb() -> None:
    gray = Image.new("L", (2, 1), 77)
    bits = Image.new("1", (2, 1), 0)
    bits.putpixel((1, 0), 1)

    assert load_image(_png_bytes(gray)).getpixel((0, 0)) == (77, 77, 77)
    loaded_bits = load_image(_png_bytes(bits))
    assert loaded_bits.mode == "RGB"
    assert loaded_bits.getpixel((0, 0)) == (0, 0, 0)
    assert loaded_bits.getpixel((1, 0)) == WHITE


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 32768, 65535, 257]], dtype=">u2")
    data = _raw_png(4, 1, 16, 0, [values[0].tobytes()])
    assert Image.open(io.BytesIO(data)).mode.startswith("I")

    image = load_image(data)

    red = [image.getpixel((x, 0))[0] for x in range(4)]
    assert red[0] == 0
    assert abs(red[1] - 128) <= 1
    assert red[2] == 255
    assert red[3] == 1


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_modes_are_scaled(mode: str) -> None:
    image = Image.new(mode, (3, 1))
    for x, value in enumerate([0, 32768, 65535]):
        image.putpixel((x, 0), value)

    rgb = load_image(image)

    assert rgb.getpixel((0, 0)) == (0, 0, 0)
    assert _close(rgb.getpixel((1, 0)), (128, 128, 128), 1)
    assert rgb.getpixel((2, 0)) == WHITE


def test_sixteen_bit_rgb_png() -> None:
    pixels = np.array([[[65535, 0, 0], [0, 32768, 65535]]], dtype=">u2")
    data = _raw_png(2, 1, 16, 2, [pixels[0].tobytes()])

    image = load_image(data)

    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == RED
    assert _close(image.getpixel((1, 0)), (0, 128, 255), 1)


def test_cmyk_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (2, 1), (0, 255, 255, 0))
    cmyk.putpixel((1, 0), (0, 0, 0, 0))
    buffer = io.BytesIO()
    cmyk.save(buffer, "TIFF")

    image = load_image(buffer.getvalue())

    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == RED
    assert image.getpixel((1, 0)) == WHITE


def test_rgb_pil_image_is_not_modified() -> None:
    original = _quadrants(6, 4)

    image = load_image(original)

    assert image is not original
    assert image.tobytes() == original.tobytes()


# load_image: bad input


def test_random_bytes_are_not_an_image() -> None:
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()

    with pytest.raises(EditInputError) as raised:
        load_image(data)

    assert raised.value.code == "not_an_image"
    assert "uploaded bytes" in raised.value.message


def test_text_file_is_not_an_image_and_message_names_path(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("not a picture")

    with pytest.raises(EditInputError) as raised:
        load_image(path)

    assert raised.value.code == "not_an_image"
    assert str(path) in raised.value.message


def test_png_cut_in_half_is_truncated(tmp_path: Path) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _png_bytes(Image.fromarray(noise))
    path = tmp_path / "half.png"
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(EditInputError) as raised:
        load_image(path)

    assert raised.value.code == "truncated_image"
    assert str(path) in raised.value.message


def test_jpeg_cut_short_bytes_is_truncated() -> None:
    noise = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG")
    data = buffer.getvalue()

    with pytest.raises(EditInputError) as raised:
        load_image(data[: len(data) * 2 // 3])

    assert raised.value.code == "truncated_image"


def test_zero_byte_file_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")

    with pytest.raises(EditInputError) as raised:
        load_image(path)

    assert raised.value.code == "empty_image"
    assert str(path) in raised.value.message


def test_zero_bytes_are_empty() -> None:
    with pytest.raises(EditInputError) as raised:
        load_image(b"")

    assert raised.value.code == "empty_image"


def test_zero_width_image_is_empty() -> None:
    with pytest.raises(EditInputError) as raised:
        load_image(Image.new("RGB", (0, 5)))

    assert raised.value.code == "empty_image"


def test_missing_path_is_not_found(tmp_path: Path) -> None:
    path = tmp_path / "missing.png"

    with pytest.raises(EditInputError) as raised:
        load_image(str(path))

    assert raised.value.code == "image_not_found"
    assert str(path) in raised.value.message


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(EditInputError) as raised:
        load_image(tmp_path)

    assert raised.value.code == "not_an_image"


# load_mask


def test_mask_resized_to_image_size() -> None:
    mask = Image.new("L", (100, 75), 0)
    mask.paste(255, (0, 0, 50, 75))

    loaded = load_mask(_png_bytes(mask), (400, 300))

    assert loaded.mode == "L"
    assert loaded.size == (400, 300)
    assert loaded.getpixel((10, 150)) == 255
    assert loaded.getpixel((390, 150)) == 0


def test_mask_within_one_percent_aspect_is_resized() -> None:
    loaded = load_mask(Image.new("L", (101, 100), 255), (200, 200))

    assert loaded.size == (200, 200)


def test_mask_aspect_mismatch_names_both_sizes() -> None:
    with pytest.raises(EditInputError) as raised:
        load_mask(Image.new("L", (200, 100), 255), (64, 64))

    assert raised.value.code == "mask_aspect_mismatch"
    assert "200x100" in raised.value.message
    assert "64x64" in raised.value.message


def test_rgba_mask_with_constant_colour_uses_alpha() -> None:
    stroke = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    stroke.putpixel((2, 2), (0, 0, 0, 255))

    loaded = load_mask(stroke, (4, 4))

    assert loaded.getpixel((2, 2)) == 255
    assert loaded.getpixel((0, 0)) == 0


def test_rgb_mask_uses_luminance() -> None:
    mask = Image.new("RGB", (2, 1), (0, 0, 0))
    mask.putpixel((1, 0), WHITE)

    loaded = load_mask(mask, (2, 1))

    assert loaded.mode == "L"
    assert np.asarray(loaded).tolist() == [[0, 255]]


def test_sixteen_bit_mask_is_scaled() -> None:
    mask = Image.new("I;16", (2, 1), 0)
    mask.putpixel((1, 0), 65535)

    assert np.asarray(load_mask(mask, (2, 1))).tolist() == [[0, 255]]


def test_mask_bad_input_codes_say_mask(tmp_path: Path) -> None:
    with pytest.raises(EditInputError) as missing:
        load_mask(tmp_path / "nope.png", (8, 8))
    with pytest.raises(EditInputError) as garbage:
        load_mask(b"definitely not a png", (8, 8))

    assert missing.value.code == "image_not_found"
    assert missing.value.message.startswith("mask")
    assert garbage.value.code == "not_an_image"
    assert garbage.value.message.startswith("mask")


# working size


def test_working_size_examples() -> None:
    assert working_size(1024, 768) == (512, 384)
    assert working_size(512, 512) == (512, 512)
    assert working_size(768, 1024) == (384, 512)


def test_working_size_odd_portrait() -> None:
    width, height = working_size(333, 517)

    assert max(width, height) <= 512
    assert width % 8 == 0
    assert height % 8 == 0
    assert (width, height) == (328, 512)


def test_working_size_small_image_not_upscaled_beyond_rounding() -> None:
    width, height = working_size(20, 12)

    assert (width, height) == (24, 16)
    assert width - 20 <= 4
    assert height - 12 <= 4


def test_working_size_tiny_side_is_at_least_multiple() -> None:
    assert working_size(4000, 10) == (512, 8)


def test_working_size_stays_within_max_side_not_multiple_of_step() -> None:
    width, height = working_size(1000, 1000, max_side=500, multiple=8)

    assert (width, height) == (496, 496)


def test_working_size_rejects_bad_arguments() -> None:
    with pytest.raises(EditInputError) as raised:
        working_size(0, 10)
    assert raised.value.code == "empty_image"
    with pytest.raises(ValueError, match="max_side"):
        working_size(10, 10, max_side=4, multiple=8)
    with pytest.raises(ValueError, match="multiple"):
        working_size(10, 10, multiple=0)


def test_to_working_size() -> None:
    image = _quadrants(1024, 768)
    already = _quadrants(512, 384)

    resized = to_working_size(image)

    assert resized.size == (512, 384)
    assert resized.getpixel((10, 10)) == RED
    assert to_working_size(already) is already


# instructions


def test_check_instruction_strips() -> None:
    assert check_instruction("  make it snowy \n") == "make it snowy"


@pytest.mark.parametrize("text", [None, "", "  ", "\n\t"])
def test_blank_instruction_is_empty(text: str | None) -> None:
    with pytest.raises(EditInputError) as raised:
        check_instruction(text)

    assert raised.value.code == "empty_instruction"


def test_instruction_length_limit() -> None:
    assert len(check_instruction("a" * MAX_INSTRUCTION_CHARS)) == MAX_INSTRUCTION_CHARS
    with pytest.raises(EditInputError) as raised:
        check_instruction("a" * (MAX_INSTRUCTION_CHARS + 1))

    assert raised.value.code == "instruction_too_long"


# tensors


def test_image_tensor_round_trip_is_exact() -> None:
    values = np.arange(256, dtype=np.uint8)
    pixels = np.stack([values.reshape(16, 16), values[::-1].reshape(16, 16), np.full((16, 16), 7, np.uint8)], -1)
    image = Image.fromarray(pixels)

    tensor = image_to_tensor(image)
    back = tensor_to_image(tensor)

    assert tensor.shape == (3, 16, 16)
    assert tensor.dtype == torch.float32
    assert tensor.min().item() == -1.0
    assert tensor.max().item() == 1.0
    assert back.mode == "RGB"
    assert np.array_equal(np.asarray(back), pixels)


def test_tensor_to_image_clamps() -> None:
    tensor = torch.tensor([-3.0, 0.0, 3.0]).view(3, 1, 1)

    assert tensor_to_image(tensor).getpixel((0, 0)) == (0, 128, 255)


def test_tensor_to_image_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match="3, H, W"):
        tensor_to_image(torch.zeros(1, 3, 4, 4))


def test_mask_to_tensor() -> None:
    mask = Image.new("L", (3, 2), 0)
    mask.putpixel((2, 1), 255)

    tensor = mask_to_tensor(mask)

    assert tensor.shape == (1, 2, 3)
    assert tensor.dtype == torch.float32
    assert tensor[0, 1, 2].item() == 1.0
    assert tensor.sum().item() == 1.0
