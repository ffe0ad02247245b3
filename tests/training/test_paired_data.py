"""The paired-data loader: rows checked up front with errors naming the row, images cropped alike."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from xmgie.editing.errors import EditInputError
from xmgie.training.data import PairedEditDataset, read_pairs


def write_folder(folder, rows):
    folder.mkdir(exist_ok=True)
    with (folder / "metadata.jsonl").open("w") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return folder


@pytest.fixture
def images(tmp_path):
    """A 120×80 source whose left half is red, its target, a matching mask and a mask of another shape."""
    source = np.zeros((80, 120, 3), dtype=np.uint8)
    source[:, :60] = (255, 0, 0)
    Image.fromarray(source).save(tmp_path / "source.png")
    Image.fromarray(255 - source).save(tmp_path / "target.png")
    mask = np.zeros((80, 120), dtype=np.uint8)
    mask[:, :60] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.new("L", (50, 50), 255).save(tmp_path / "square_mask.png")
    (tmp_path / "notes.png").write_text("not an image")
    return tmp_path


GOOD = {"source_file": "source.png", "target_file": "target.png", "instruction": "invert it"}


def test_items_are_cropped_alike_and_expressive_defaults_to_the_instruction(images):
    folder = write_folder(images, [{**GOOD, "mask_file": "mask.png", "expressive_instruction": "All inverted."}, GOOD])
    dataset = PairedEditDataset(folder, 32)
    first, second = dataset[0], dataset[1]
    assert first["source_pixels"].shape == (3, 32, 32) and first["mask"].shape == (1, 32, 32)
    # The short side is scaled to 32 and the centre cut: the mask's edited pixels are the source's red ones.
    red = first["source_pixels"][0] > 0
    assert 0 < int(red.sum()) < 32 * 32
    assert np.array_equal((first["mask"][0] > 0.5).numpy(), red.numpy())
    assert np.allclose(first["target_pixels"].numpy(), -first["source_pixels"].numpy(), atol=0.05)
    assert first["expressive_instruction"] == "All inverted."
    assert second["expressive_instruction"] == "invert it"
    assert float(second["mask"].min()) == 1.0


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ({"source_file": "source.png", "target_file": "target.png"}, "'instruction' must be a non-empty string"),
        ({**GOOD, "instruction": "  "}, "'instruction' must be a non-empty string"),
        ({**GOOD, "target_file": "missing.png"}, "target_file 'missing.png'"),
        ({**GOOD, "source_file": "notes.png"}, "is not a readable image"),
        ({**GOOD, "mask_file": "square_mask.png"}, "aspect ratios differ"),
        ({**GOOD, "mask_file": 3}, "'mask_file' must be a non-empty string"),
    ],
)
def test_a_bad_row_is_refused_up_front_naming_its_line(images, bad_row, message):
    folder = write_folder(images, [GOOD, GOOD, bad_row, GOOD])
    with pytest.raises(EditInputError) as caught:
        read_pairs(folder)
    assert caught.value.code == "invalid_metadata_row"
    assert "metadata.jsonl line 3:" in str(caught.value)
    assert message in str(caught.value).replace(str(images) + "/", "")


def test_a_folder_without_metadata_or_rows_is_refused(tmp_path):
    with pytest.raises(EditInputError) as missing:
        read_pairs(tmp_path)
    assert missing.value.code == "metadata_not_found"
    write_folder(tmp_path, [])
    with pytest.raises(EditInputError) as empty:
        read_pairs(tmp_path)
    assert empty.value.code == "empty_dataset"


def test_rows_whose_answer_generation_cannot_reach_are_named_by_line(images):
    from xmgie.loading.mini import build_mini_tokenizer
    from xmgie.training.objective import unreachable_answer_lines

    rows = [
        {**GOOD, "instruction": "make it black and white", "expressive_instruction": "It becomes black and white."},
        {**GOOD, "instruction": "make it black and white", "expressive_instruction": "Every colour fades to grey."},
        # Without an expressive instruction the answer is the instruction, which the prompt quotes: unreachable.
        {**GOOD, "instruction": "make it darker"},
        {**GOOD, "instruction": "dim"},
    ]
    pairs = read_pairs(write_folder(images, rows))
    assert unreachable_answer_lines(build_mini_tokenizer(), pairs, image_tokens=16) == [1, 3]
