"""Draw the example masks: ``chelsea_mask.png`` (a white ellipse over the cat's head in ``chelsea.png``) and
``coffee_square_mask.png`` (a white square in the top right of ``coffee.png``, where the manifest asks for one
to be added), black elsewhere.

Run from anywhere with ``python examples/make_mask.py``; it reads the photos only for their sizes and writes
the masks next to them. The output is the same on every run.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

EXAMPLES = Path(__file__).resolve().parent
PHOTO = EXAMPLES / "chelsea.png"
MASK = EXAMPLES / "chelsea_mask.png"
SQUARE_PHOTO = EXAMPLES / "coffee.png"
SQUARE_MASK = EXAMPLES / "coffee_square_mask.png"

# Placed by eye on the 451x300 photo: the head runs from the left cheek to the right ear and from
# above the top edge (the ears are cut off there) down to the chin, so the box starts above the photo.
HEAD_BOX = (25, -45, 395, 290)
"""Bounding box (left, top, right, bottom) of the ellipse, in pixels of the photo."""

SQUARE_CENTRE = (5 / 6, 1 / 6)
"""The square's centre as fractions of width and height: ``top right`` in ``xmgie data synth``'s places."""
SQUARE_HALF_SIDE = 0.13
"""Half the square's side as a share of the photo's short side (``xmgie data synth`` draws 0.09–0.15)."""


def make_mask(size: tuple[int, int], box: tuple[int, int, int, int] = HEAD_BOX) -> Image.Image:
    """Mode ``L`` mask of ``size`` (width, height): 255 inside the ellipse in ``box``, 0 outside."""
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    return mask


def make_square_mask(size: tuple[int, int]) -> Image.Image:
    """Mode ``L`` mask of ``size`` (width, height): 255 inside the square at :data:`SQUARE_CENTRE`, 0 outside."""
    width, height = size
    half = SQUARE_HALF_SIDE * min(size)
    cx, cy = SQUARE_CENTRE[0] * width, SQUARE_CENTRE[1] * height
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle((round(cx - half), round(cy - half), round(cx + half), round(cy + half)), fill=255)
    return mask


def main() -> None:
    """Write both masks next to their photos."""
    for photo, target, draw in ((PHOTO, MASK, make_mask), (SQUARE_PHOTO, SQUARE_MASK, make_square_mask)):
        with Image.open(photo) as image:
            size = image.size
        draw(size).save(target, optimize=True)
        print(f"wrote {target} ({size[0]}x{size[1]})")


if __name__ == "__main__":
    main()
