"""Target-based quality scores (:mod:`xmgie.quality`) and ``xmgie eval --paired`` on a synthetic split."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xmgie.editing.errors import EditInputError
from xmgie.quality import (
    PSNR_CAP,
    aggregate,
    colour_cast,
    format_table,
    item_scores,
    names_kind,
    read_paired_metadata,
    same_expressive,
    tone_gain,
)
from xmgie.training.synth import KINDS, write_synthetic_dataset


def images(size: int = 48) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A noisy source, a target with a square recoloured, and the square's mask."""
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), dtype=bool)
    mask[4:12, 4:12] = True
    target = source.copy()
    target[mask] = (250, 10, 10)
    return source, target, mask


def test_output_equal_to_the_target_scores_zero_and_the_source_one() -> None:
    source, target, mask = images()
    exact = item_scores(source, target, target, mask)
    assert exact["l1_inside"] == 0.0
    assert exact["l1_ratio"] == 0.0
    assert exact["psnr_inside"] == PSNR_CAP
    # Outside the square the target is the source: nothing to lose there.
    assert exact["psnr_outside"] == PSNR_CAP
    assert exact["far_outside_equal"] == 1.0
    untouched = item_scores(source, target, source, mask)
    assert untouched["l1_ratio"] == pytest.approx(1.0)
    assert untouched["l1_inside"] == pytest.approx(untouched["source_l1_inside"])
    assert untouched["psnr_inside"] < 30


def test_tone_gain_tells_an_overshoot_from_a_short_edit_and_from_the_wrong_way() -> None:
    # A darker target (every pixel × 0.7): its channel means and spreads all fall by 30 %.
    source = np.random.default_rng(1).uniform(0.2, 0.8, size=(500, 3))
    target = source * 0.7
    assert tone_gain(source, target, target) == pytest.approx(1.0)
    assert tone_gain(source, target, source) == pytest.approx(0.0)
    assert tone_gain(source, target, source * 0.85) == pytest.approx(0.5)  # half the change
    assert tone_gain(source, target, source * 0.4) == pytest.approx(2.0)  # twice as dark: too far
    assert tone_gain(source, target, source * 1.3) == pytest.approx(-1.0)  # brighter: the wrong way
    # A change of spread alone (more contrast about the mean) is measured too; no change gives no gain.
    stretched = source.mean(axis=0) + 1.5 * (source - source.mean(axis=0))
    assert tone_gain(source, stretched, source.mean(axis=0) + 0.5 * (source - source.mean(axis=0))) == pytest.approx(
        -1.0
    )
    assert tone_gain(source, source.copy(), target) is None
    as_images = item_scores(
        np.clip(source.reshape(25, 20, 3), 0, 1),
        np.clip(target.reshape(25, 20, 3), 0, 1),
        source.reshape(25, 20, 3),
        np.ones((25, 20), dtype=bool),
    )
    assert as_images["tone_gain"] == pytest.approx(0.0, abs=0.02)


def test_colour_cast_names_a_tint_that_l1_and_tone_gain_pass_over() -> None:
    # A black and white target; one output is the target's grey a little brighter, the other as close in L1
    # but tinted green — channel spreads that move the target's way, so the tone gain is about as good.
    rgb = np.random.default_rng(2).uniform(0.2, 0.8, size=(30, 40, 3))
    grey = np.repeat((rgb @ [0.299, 0.587, 0.114])[..., None], 3, axis=-1)
    brighter, green = np.clip(grey + 0.06, 0, 1), np.clip(grey + [-0.04, 0.05, -0.04], 0, 1)
    everywhere = np.ones((30, 40), dtype=bool)
    scores = {
        name: item_scores(rgb, grey, output, everywhere) for name, output in [("grey", brighter), ("green", green)]
    }
    assert scores["grey"]["colour_cast"] == pytest.approx(0.0, abs=1e-9)  # luma is not a cast
    # The tint's own chroma (I, Q) = (−0.025, −0.047), up to the images' rounding to 8 bits.
    assert scores["green"]["colour_cast"] == pytest.approx(np.hypot(-0.02466, -0.04707), rel=0.02)
    assert scores["green"]["colour_cast"] > 0.04
    assert abs(scores["green"]["l1_inside"] - scores["grey"]["l1_inside"]) < 0.02
    assert scores["green"]["tone_gain"] > 0.8 and scores["grey"]["tone_gain"] > 0.8
    # The cast of the mean colour: a region whose pixels carry opposite tints has none.
    tinted = grey.copy()
    tinted[:15] += [0.05, -0.05, 0.0]
    tinted[15:] -= [0.05, -0.05, 0.0]
    assert colour_cast(grey.reshape(-1, 3), tinted.reshape(-1, 3)) == pytest.approx(0.0, abs=1e-9)
    assert "colour_cast" in format_table(aggregate([{"kind": "k", **scores["green"]}]))


def test_a_far_change_lowers_far_outside_equal_and_a_near_one_does_not() -> None:
    source, target, mask = images()
    far = target.copy()
    far[40, 40] = 255 - far[40, 40]
    scores = item_scores(source, target, far, mask, far_px=10)
    assert 0 < scores["far_outside_equal"] < 1
    assert scores["psnr_outside"] < PSNR_CAP
    near = target.copy()
    near[13, 13] = 255 - near[13, 13]  # next to the square: within far_px
    assert item_scores(source, target, near, mask, far_px=10)["far_outside_equal"] == 1.0


def test_global_regions_have_no_outside() -> None:
    source, _, _ = images()
    target = 255 - source
    scores = item_scores(source, target, target, np.ones(source.shape[:2], dtype=bool), kind="invert")
    assert scores["psnr_outside"] is None
    assert scores["far_outside_equal"] is None
    assert scores["l1_ratio"] == 0.0


def test_mask_iou_of_known_masks_and_resizing() -> None:
    source, target, mask = images()
    half = np.zeros_like(mask)
    half[4:12, 4:8] = True  # half of the square
    assert item_scores(source, target, target, mask, estimated_mask=half)["mask_iou"] == pytest.approx(0.5)
    shifted = np.zeros_like(mask)
    shifted[20:28, 20:28] = True
    assert item_scores(source, target, target, mask, estimated_mask=shifted)["mask_iou"] == 0.0
    # A soft mask at twice the size: thresholded at 0.5 and resized to the target's size.
    big = np.kron(mask.astype(np.float64), np.ones((2, 2))) * 0.6
    assert item_scores(source, target, target, mask, estimated_mask=big)["mask_iou"] == pytest.approx(1.0)
    below = big * 0.5
    assert item_scores(source, target, target, mask, estimated_mask=below)["mask_iou"] == 0.0
    assert item_scores(source, target, target, mask)["mask_iou"] is None
    # An output at another size is resized to the target's.
    enlarged = Image.fromarray(target).resize((96, 96), Image.Resampling.NEAREST)
    assert item_scores(source, target, enlarged, mask)["l1_ratio"] < 0.2


def test_names_kind_and_scope() -> None:
    assert names_kind("The whole photo becomes black and white.", "black_and_white")
    assert names_kind("Every colour turned GREY.", "black_and_white")
    assert names_kind("The photo is inverted like a negative.", "invert")
    assert names_kind("A red circle is added at the top.", "add_shape")
    assert not names_kind("The red circle is recoloured blue.", "remove_shape")
    assert not names_kind("The whole photo becomes brighter.", "darker")
    assert names_kind(None, "sepia") is None
    source, target, mask = images()
    assert item_scores(source, target, target, mask, edit_scope="local", kind="add_shape")["scope_correct"] is True
    assert item_scores(source, target, target, mask, edit_scope="global", kind="add_shape")["scope_correct"] is False
    assert item_scores(source, target, target, mask, edit_scope="global", kind="night")["scope_correct"] is True
    assert item_scores(source, target, target, mask, edit_scope="local")["scope_correct"] is None


def test_an_expressive_instruction_is_exact_only_with_every_part_of_the_datasets_own() -> None:
    reference = "A new red circle is added in the image's top left area, nothing else changes."
    assert same_expressive(reference, reference)
    assert same_expressive("a new RED circle is added in the  image's top left area, nothing else changes.", reference)
    # Naming the kind, the colour and the shape is not enough: the place is wrong.
    wrong_place = reference.replace("top left", "top right")
    assert names_kind(wrong_place, "add_shape") and not same_expressive(wrong_place, reference)
    assert same_expressive(None, reference) is None and same_expressive(reference, None) is None
    source, target, mask = images()
    scores = item_scores(source, target, target, mask, expressive=wrong_place, reference_expressive=reference)
    assert scores["expressive_exact"] is False
    assert item_scores(source, target, target, mask, expressive=reference)["expressive_exact"] is None
    table = aggregate([{"kind": "add_shape", "expressive_exact": flag} for flag in (True, False, False, None)])
    assert table["add_shape"]["expressive_exact_share"] == pytest.approx(1 / 3)


def test_aggregate_means_per_kind_ignoring_none() -> None:
    rows = [
        {"kind": "sepia", "l1_ratio": 0.0, "psnr_outside": None, "scope_correct": True, "names_kind": False},
        {"kind": "sepia", "l1_ratio": 1.0, "psnr_outside": None, "scope_correct": False, "names_kind": False},
        {"kind": "add_shape", "l1_ratio": 0.5, "psnr_outside": 40.0, "scope_correct": True, "names_kind": True},
    ]
    table = aggregate(rows)
    assert list(table) == ["add_shape", "sepia", "all"]
    assert table["sepia"]["n"] == 2
    assert table["sepia"]["l1_ratio"] == pytest.approx(0.5)
    assert table["sepia"]["psnr_outside"] is None
    assert table["sepia"]["scope_accuracy"] == pytest.approx(0.5)
    assert table["all"]["psnr_outside"] == pytest.approx(40.0)
    assert table["all"]["names_kind_share"] == pytest.approx(1 / 3)
    text = format_table(table)
    assert text.splitlines()[0].startswith("| kind | n | l1_ratio")
    assert "| sepia | 2 | 0.500 |" in text
    assert len(text.splitlines()) == 2 + 3


# --- xmgie eval --paired ---------------------------------------------------------------------------------------------


def xmgie(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xmgie.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        cwd=Path(__file__).resolve().parents[1],
    )


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic split with one item of every kind."""
    root = tmp_path_factory.mktemp("synth") / "data"
    write_synthetic_dataset(root, len(KINDS) + 2, size=32, seed=3, test_fraction=0.1)
    assert {row["kind"] for row in read_paired_metadata(root / "train")} == set(KINDS)
    return root / "train"


def copies(split: Path, folder: Path, which: str) -> Path:
    """``folder`` holding the split's ``which`` images (source or target) named by their source's stem."""
    folder.mkdir()
    for row in read_paired_metadata(split):
        shutil.copy(split / row[f"{which}_file"], folder / Path(row["source_file"]).name)
    return folder


def test_eval_paired_scores_targets_zero_and_sources_one(split: Path, tmp_path: Path) -> None:
    for which, ratio in (("target", 0.0), ("source", 1.0)):
        outputs = copies(split, tmp_path / which, which)
        report = tmp_path / f"{which}.json"
        result = xmgie("eval", "--paired", str(split), "--outputs", str(outputs), "--json", str(report))
        assert result.returncode == 0, result.stderr
        rows = json.loads(report.read_text())["rows"]
        assert len(rows) == len(read_paired_metadata(split))
        assert {row["kind"] for row in rows} == set(KINDS)
        for row in rows:
            assert row["l1_ratio"] == pytest.approx(ratio), row
        table = json.loads(report.read_text())["table"]
        assert table["all"]["l1_ratio"] == pytest.approx(ratio)
        assert table["add_shape"]["far_outside_equal"] == 1.0
        lines = result.stdout.splitlines()
        assert lines[0].startswith("| kind |")
        assert any(line.startswith("| recolour_shape |") for line in lines)
        assert any(line.startswith("| all |") for line in lines)


def test_eval_paired_reads_batch_results(split: Path, tmp_path: Path) -> None:
    outputs = copies(split, tmp_path / "outputs", "target")
    metadata = read_paired_metadata(split)
    lines = []
    for index, row in enumerate(metadata):
        local = row["kind"] in ("add_shape", "remove_shape", "recolour_shape")
        mask = None
        if local:
            mask = tmp_path / f"{index}_mask.png"
            shutil.copy(split / row["mask_file"], mask)
        lines.append(
            {
                "index": index,
                "image": str(split / row["source_file"]),
                "output": None,
                "mask": str(mask) if mask else None,
                "edit_scope": "local" if local else "global",
                # The first item's expressive instruction names its kind but is not the dataset's.
                "expressive_instruction": row["expressive_instruction"] + (" Also bluer." if index == 0 else ""),
            }
        )
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = tmp_path / "report.json"
    result = xmgie(
        "eval", "--paired", str(split), "--outputs", str(outputs), "--results", str(results), "--json", str(report)
    )
    assert result.returncode == 0, result.stderr
    table = json.loads(report.read_text())["table"]
    assert table["all"]["scope_accuracy"] == 1.0
    assert table["all"]["names_kind_share"] == 1.0
    assert table["all"]["expressive_exact_share"] == pytest.approx(1 - 1 / len(metadata))
    assert table["all"]["mask_iou"] == 1.0


def test_eval_paired_bad_row_names_it(split: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(split, broken)
    lines = (broken / "metadata.jsonl").read_text().splitlines()
    row = json.loads(lines[2])
    del row["target_file"]
    lines[2] = json.dumps(row)
    (broken / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    result = xmgie("eval", "--paired", str(broken), "--outputs", str(tmp_path))
    assert result.returncode == 2
    assert "invalid_metadata" in result.stderr and "line 3" in result.stderr and "target_file" in result.stderr
    with pytest.raises(EditInputError) as caught:
        read_paired_metadata(broken)
    assert caught.value.code == "invalid_metadata"


def test_conditioning_separation_finds_kinds_the_edit_head_cannot_tell_apart(split: Path, tiny_pipe) -> None:
    from xmgie.quality import conditioning_separation

    first, second = read_paired_metadata(split)[:2]
    rows = [
        {**first, "kind": "a"},
        {**second, "kind": "a"},
        # "same" is "a" again under another name: the UNet could never tell them apart
        {**first, "kind": "same"},
        {**second, "kind": "same"},
        {**first, "kind": "other", "instruction": "turn the sky into a sunset"},
    ]
    table = conditioning_separation(tiny_pipe, rows, split)
    assert table["a"]["nearest"] == "same" and table["a"]["distance"] == pytest.approx(0.0, abs=1e-5)
    assert table["other"]["nearest"] in {"a", "same"} and table["other"]["distance"] > 1e-3
    assert table["a"]["n"] == 2 and table["a"]["spread"] > 0 and table["other"]["spread"] == 0
    # the ratio weighs the distance by the two kinds' spreads: 0 for the duplicate, positive for the other
    assert table["a"]["ratio"] == pytest.approx(0.0, abs=1e-5)
    nearest = table["other"]["nearest"]
    assert table["other"]["ratio"] == pytest.approx(table["other"]["distance"] / (table[nearest]["spread"] / 2))
