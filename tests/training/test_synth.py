"""``xmgie data synth``: exact targets, exact masks, disjoint splits, reproducible files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from xmgie.cli import main
from xmgie.training.data import read_pairs
from xmgie.training.objective import answer_token_ids, first_banned_answer_token, prompt_token_ids
from xmgie.training.synth import (
    COLOURS,
    GLOBAL_EXPRESSIVE,
    GLOBAL_PHRASINGS,
    GLOBAL_TRANSFORMS,
    LOCAL_EXPRESSIVE,
    LOCAL_KINDS,
    LOCAL_PHRASINGS,
    PLACES,
    SHAPES,
    YIQ,
    jitter_colours,
    write_synthetic_dataset,
    write_whole_photo_items,
)


def rows(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def pixels(folder, name):
    return np.asarray(Image.open(folder / name))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    output = tmp_path_factory.mktemp("synth") / "data"
    assert main(["data", "synth", "--output", str(output), "--count", "30", "--seed", "7", "--size", "48"]) == 0
    return output


def test_splits_are_folders_in_the_paired_layout_that_share_no_photo(synth):
    train, test = rows(synth / "train"), rows(synth / "test")
    assert (len(train), len(test)) == (24, 6)
    assert {row["split"] for row in train} == {"train"} and {row["split"] for row in test} == {"test"}
    assert not {row["photo"] for row in train} & {row["photo"] for row in test}
    assert len(read_pairs(synth / "train")) == 24 and len(read_pairs(synth / "test")) == 6
    assert Image.open(synth / "train" / train[0]["source_file"]).size == (48, 48)
    # Crops differ in place and scale: no two sources of the split are the same picture.
    sources = {pixels(synth / "train", row["source_file"]).tobytes() for row in train}
    assert len(sources) == len(train)


def test_global_targets_are_the_exact_transform_and_the_mask_is_full(synth):
    seen = set()
    for split in ("train", "test"):
        for row in rows(synth / split):
            if row["kind"] not in GLOBAL_TRANSFORMS:
                continue
            seen.add(row["kind"])
            source = pixels(synth / split, row["source_file"])
            target = pixels(synth / split, row["target_file"])
            assert np.array_equal(target, GLOBAL_TRANSFORMS[row["kind"]](source)), row["kind"]
            assert pixels(synth / split, row["mask_file"]).min() == 255
            if row["kind"] == "invert":
                assert np.array_equal(target, 255 - source)
            if row["kind"] == "black_and_white":
                assert np.array_equal(target[..., 0], target[..., 1]) and np.array_equal(
                    target[..., 1], target[..., 2]
                )
    assert seen == set(GLOBAL_TRANSFORMS)


def test_local_masks_cover_exactly_the_changed_pixels(synth):
    kinds = set()
    for split in ("train", "test"):
        for row in rows(synth / split):
            if row["kind"] not in LOCAL_KINDS:
                continue
            kinds.add(row["kind"])
            source = pixels(synth / split, row["source_file"]).astype(int)
            target = pixels(synth / split, row["target_file"]).astype(int)
            mask = pixels(synth / split, row["mask_file"]) == 255
            changed = (source != target).any(axis=-1)
            assert 0 < mask.sum() < mask.size / 4
            assert np.array_equal(changed, mask), row["kind"]
            assert row["colour"] in row["instruction"] or row["shape"] in row["instruction"]
            assert row["place"] in row["expressive_instruction"]
    assert kinds == set(LOCAL_KINDS)


def test_the_same_seed_writes_identical_files_and_another_seed_other_ones(tmp_path):
    def files(folder):
        return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}

    write_synthetic_dataset(tmp_path / "a", 14, seed=3, size=32)
    write_synthetic_dataset(tmp_path / "b", 14, seed=3, size=32)
    write_synthetic_dataset(tmp_path / "c", 14, seed=4, size=32)
    first, second, other = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert first == second
    assert first.keys() == other.keys() and first != other


def test_a_repeated_trigram_of_the_prompt_is_found_where_generation_bans_it():
    prompt = [5, 6, 7, 8, 9]
    assert first_banned_answer_token(prompt, [1, 2, 3]) is None
    # "6 7 8" is in the prompt: the answer's 8 after 6 7 can never be generated.
    assert first_banned_answer_token(prompt, [1, 6, 7, 8]) == 3
    # The answer's own trigrams count too.
    assert first_banned_answer_token(prompt, [1, 2, 3, 1, 2, 3]) == 5
    assert first_banned_answer_token(prompt, [1, 6, 7, 8], ngram_size=4) is None


def test_every_synth_answer_names_its_kind_and_can_be_generated_under_mgie_decoding():
    """With ``no_repeat_ngram_size=3`` MGIE never generates a trigram its prompt has, so an expressive
    instruction that repeats one (``black and white``, ``in the top left``) could be learnt but never produced."""
    from xmgie.loading.mini import build_mini_tokenizer
    from xmgie.quality import names_kind

    tokenizer = build_mini_tokenizer()
    image_tokens = 16
    colours = list(COLOURS)
    checked = 0
    for kind, phrasings in GLOBAL_PHRASINGS.items():
        for phrasing in phrasings:
            prompt = prompt_token_ids(tokenizer, phrasing, image_tokens)
            assert names_kind(GLOBAL_EXPRESSIVE[kind], kind)
            answer = answer_token_ids(tokenizer, GLOBAL_EXPRESSIVE[kind])
            assert first_banned_answer_token(prompt, answer) is None, (kind, phrasing)
            checked += 1
    for kind in LOCAL_KINDS:
        for shape in SHAPES:
            for place in PLACES:
                for index, colour in enumerate(colours):
                    parts = {"shape": shape, "place": place, "colour": colour, "new_colour": colours[index - 1]}
                    expressive = LOCAL_EXPRESSIVE[kind].format(**parts)
                    assert names_kind(expressive, kind), expressive
                    answer = answer_token_ids(tokenizer, expressive)
                    for phrasing in LOCAL_PHRASINGS[kind]:
                        prompt = prompt_token_ids(tokenizer, phrasing.format(**parts), image_tokens)
                        assert first_banned_answer_token(prompt, answer) is None, (phrasing, parts)
                        checked += 1
    assert checked == 27 + 3 * 3 * 9 * 8 * 3


def test_colour_jitter_turns_the_training_crops_colours_and_keeps_their_luma_crop_and_edit(tmp_path):
    write_synthetic_dataset(tmp_path / "plain", 48, seed=2, size=32)
    write_synthetic_dataset(tmp_path / "jittered", 48, seed=2, size=32, colour_jitter=0.5)
    plain, jittered = tmp_path / "plain", tmp_path / "jittered"
    # The test split keeps the photos' own colours, file for file.
    for name in ["metadata.jsonl", *(row["source_file"] for row in rows(plain / "test"))]:
        assert (plain / "test" / name).read_bytes() == (jittered / "test" / name).read_bytes()
    before, after = rows(plain / "train"), rows(jittered / "train")
    chosen = [row.get("colour_jitter", False) for row in after]
    assert 0.3 < sum(chosen) / len(chosen) < 0.7
    luma = np.array([0.299, 0.587, 0.114])
    turned, luma_changes = [], []
    for old, new, is_jittered in zip(before, after, chosen, strict=True):
        # The crop, the edit and its words do not depend on the jitter.
        for key in ("kind", "crop", "flip", "photo", "instruction", "expressive_instruction"):
            assert old[key] == new[key], key
        assert np.array_equal(pixels(plain / "train", old["mask_file"]), pixels(jittered / "train", new["mask_file"]))
        source = pixels(jittered / "train", new["source_file"])
        original = pixels(plain / "train", old["source_file"])
        if not is_jittered:
            assert np.array_equal(source, original)
            continue
        # Luma kept (up to rounding and the clipping of saturated colours), chroma turned.
        luma_changes.append(np.abs(source @ luma - original @ luma).mean())
        turned.append(np.abs(source.astype(int) - original.astype(int)).mean())
        target = pixels(jittered / "train", new["target_file"])
        if new["kind"] in GLOBAL_TRANSFORMS:
            assert np.array_equal(target, GLOBAL_TRANSFORMS[new["kind"]](source)), new["kind"]
        else:
            changed = (source != target).any(axis=-1)
            assert np.array_equal(changed, pixels(jittered / "train", new["mask_file"]) == 255), new["kind"]
    assert np.median(luma_changes) < 2 and max(luma_changes) < 12
    assert np.mean(turned) > 8


def test_jitter_keeps_grey_grey_and_turns_a_colour_to_another_hue():
    rng = np.random.default_rng(0)
    grey = np.full((4, 4, 3), 120, dtype=np.uint8)
    assert np.abs(jitter_colours(grey, rng).astype(int) - 120).max() <= 1
    red = np.zeros((4, 4, 3), dtype=np.uint8)
    red[..., 0] = 200
    hues = {tuple(jitter_colours(red, np.random.default_rng(seed))[0, 0] // 40) for seed in range(8)}
    assert len(hues) >= 4


def hue_turns(before, after):
    """Per pixel, the angle in degrees (−180 to 180) by which the chroma plane of YIQ turned."""
    old = before.reshape(-1, 3).astype(float) @ YIQ[1:].T
    new = after.reshape(-1, 3).astype(float) @ YIQ[1:].T
    return np.degrees(np.angle((new[:, 0] + 1j * new[:, 1]) * (old[:, 0] - 1j * old[:, 1])))


def test_the_hue_bound_limits_the_turn_and_zero_scales_saturation_only():
    # Mid-tone colours, well inside the RGB cube, so that no channel clips.
    colours = np.array([[[150, 110, 90], [90, 130, 110], [110, 110, 150], [140, 130, 95]]], dtype=np.uint8)
    chroma = np.linalg.norm(colours.reshape(-1, 3).astype(float) @ YIQ[1:].T, axis=1)
    free, bounded = [], []
    for seed in range(40):
        free.append(hue_turns(colours, jitter_colours(colours, np.random.default_rng(seed))))
        bounded.append(hue_turns(colours, jitter_colours(colours, np.random.default_rng(seed), max_hue=36)))
        unturned = jitter_colours(colours, np.random.default_rng(seed), max_hue=0)
        assert np.abs(hue_turns(colours, unturned)).max() < 4  # only rounding to uint8
        scaled = np.linalg.norm(unturned.reshape(-1, 3).astype(float) @ YIQ[1:].T, axis=1) / chroma
        assert np.ptp(scaled) < 0.1 and 0.55 < scaled.mean() < 1.45  # one saturation factor per crop
    # Bounded: every turn within 36° (plus rounding), both ways; unbounded: turns far beyond it.
    assert np.abs(np.concatenate(bounded)).max() < 40
    assert np.concatenate(bounded).min() < -15 and np.concatenate(bounded).max() > 15
    assert np.abs(np.concatenate(free)).max() > 120


def test_the_hue_bound_reaches_the_dataset_and_its_settings(tmp_path):
    write_synthetic_dataset(tmp_path / "plain", 24, seed=3, size=32)
    write_synthetic_dataset(tmp_path / "free", 24, seed=3, size=32, colour_jitter=1.0)
    write_synthetic_dataset(tmp_path / "bounded", 24, seed=3, size=32, colour_jitter=1.0, colour_jitter_hue=20)
    settings = json.loads((tmp_path / "bounded" / "synth.json").read_text())
    assert settings["colour_jitter"] == 1.0 and settings["colour_jitter_hue"] == 20
    largest = {}
    for name in ("free", "bounded"):
        turns = []
        for old, new in zip(rows(tmp_path / "plain" / "train"), rows(tmp_path / name / "train"), strict=True):
            assert new["colour_jitter"] is True
            before = pixels(tmp_path / "plain" / "train", old["source_file"])
            after = pixels(tmp_path / name / "train", new["source_file"])
            # Each crop's typical turn, over its clearly coloured pixels (grey ones have no hue to turn).
            coloured = np.linalg.norm(before.reshape(-1, 3).astype(float) @ YIQ[1:].T, axis=1) > 20
            turns.append(np.median(hue_turns(before, after)[coloured]))
        largest[name] = np.abs(turns).max()
    assert largest["bounded"] <= 22 < largest["free"]


@pytest.mark.parametrize(
    ("options", "message"), [({"colour_jitter": 1.5}, "colour jitter"), ({"colour_jitter_hue": 200}, "hue")]
)
def test_a_jitter_share_or_hue_out_of_range_is_refused(tmp_path, options, message):
    from xmgie.editing.errors import EditInputError

    with pytest.raises(EditInputError, match=message) as refused:
        write_synthetic_dataset(tmp_path / "x", 10, **options)
    assert refused.value.code == "invalid_option" and not (tmp_path / "x").exists()


def test_whole_photo_items_are_each_photo_whole_with_each_global_kinds_exact_target(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(4)
    wide, tall = rng.integers(0, 256, (20, 36, 3), dtype=np.uint8), rng.integers(0, 256, (30, 16, 3), dtype=np.uint8)
    Image.fromarray(wide).save(photos / "wide.png")
    Image.fromarray(tall).save(photos / "tall.png")
    Image.fromarray(np.zeros((20, 36), dtype=np.uint8)).save(photos / "wide_mask.png")  # not a photo
    written = write_whole_photo_items(tmp_path / "whole", photos, kinds=("sepia", "warmer"))
    assert written == rows(tmp_path / "whole")
    assert [(row["photo"], row["kind"]) for row in written] == [
        ("tall.png", "sepia"),
        ("tall.png", "warmer"),
        ("wide.png", "sepia"),
        ("wide.png", "warmer"),
    ]
    for row in written:
        source = pixels(tmp_path / "whole", row["source_file"])
        assert np.array_equal(source, wide if row["photo"] == "wide.png" else tall)  # whole, at its own size
        target = pixels(tmp_path / "whole", row["target_file"])
        assert np.array_equal(target, GLOBAL_TRANSFORMS[row["kind"]](source))
        assert (pixels(tmp_path / "whole", row["mask_file"]) == 255).all()
        assert row["instruction"] == GLOBAL_PHRASINGS[row["kind"]][0] and row["scope"] == "global"
    # The rows read as a paired folder, as the quality scores read it.
    assert len(read_pairs(tmp_path / "whole")) == 4


def test_whole_photo_items_refuse_a_local_kind(tmp_path):
    from xmgie.editing.errors import EditInputError

    with pytest.raises(EditInputError, match="add_shape") as refused:
        write_whole_photo_items(tmp_path / "whole", kinds=("add_shape",))
    assert refused.value.code == "invalid_option"
