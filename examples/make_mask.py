"""Draw ``chelsea_mask.png``: a white ellipse over the cat's head in ``chelsea.png``, black elsewhere.

Run from anywhere with ``python examples/make_mask.py``; it reads the photo only for its size
and writes the mask next to it. The output is the same on every run.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

EXAMPLES = Path(__file__).resolve().parent
PHOTO = EXAMPLES / "chelsea.png"
MASK = EXAMPLES / "chelsea_mask.png"

# Placed by eye on the 451x300 photo: the head runs from the left cheek to the right ear and from
# above the top edge (the ears are cut off there) down to the chin, so the box starts above the photo.
HEAD_BOX = (25, -45, 395, 290)
"""Bounding box (left, top, right, bottom) of the ellipse, in pixels of the photo."""


def make_mask(size: tuple[int, int], box: tuple[int, int, int, int] = HEAD_BOX) -> Image.Image:
    """Mode ``L`` mask of ``size`` (width, height): 255 inside the ellipse in ``box``, 0 outside."""
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    return mask


def main() -> None:
    """Write the mask for ``chelsea.png`` to ``chelsea_mask.png``."""
    with Image.open(PHOTO) as photo:
        size = photo.size
    make_mask(size).save(MASK, optimize=True)
    print(f"wrote {MASK} ({size[0]}x{size[1]})")


if __name__ == "__main__":
    main()
