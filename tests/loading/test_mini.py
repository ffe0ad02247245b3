"""The ``mini`` preset: refused with how to train it while its weights are not installed; once they are, it
edits for real — held-out pairs of the recipe's data, scored against exact targets.

The sample is the first items of the recipe's held-out split (``xmgie data synth`` with the recipe's seed and
photo split: item ``i`` of a split does not depend on the count), whose source photo the model never saw. Every
item is edited three ways: all extensions with the true region as the user's mask, plain MGIE (no extension, no
mask) and all extensions with the automatic mask.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from xmgie.loading.mini import MINI_DIR
from xmgie.quality import (
    EXTENSIONS,
    GLOBAL_KINDS,
    KIND_KEYWORDS,
    autoencoder_round_trip,
    edit_and_score,
    item_scores,
    read_paired_metadata,
)
from xmgie.training.recipe import load_recipe
from xmgie.training.synth import write_synthetic_dataset

PER_KIND = 4
"""Held-out items per kind: two judged a kind by sampling noise (sepia and cooler passed or failed by item)."""
STEPS = 20
CONFIGURATIONS = {
    "all_user": {"mask": "user", "extensions": True},
    "plain": {"mask": "none", "extensions": False},
    "all_auto": {"mask": "auto", "extensions": True},
}
needs_mini = pytest.mark.skipif(
    not (MINI_DIR / "model_index.json").is_file(),
    reason="the trained mini weights are not in this installation (xmgie train --recipe mini writes them)",
)
L1_RATIO_BARS = {"add_shape": 0.8, "remove_shape": 0.8, "recolour_shape": 0.6, **dict.fromkeys(GLOBAL_KINDS, 0.6)}
"""Largest mean L1 to the target inside the region, as a share of the source's L1 to it, per kind."""


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """The first ``PER_KIND`` held-out items of every kind, as the recipe's synth stage writes them."""
    synth = load_recipe("mini")["synth"]
    test_items = PER_KIND * len(KIND_KEYWORDS)
    count = int(round(test_items / synth["test_fraction"]))
    folder = tmp_path_factory.mktemp("mini-held-out") / "data"
    counts = write_synthetic_dataset(
        folder,
        count,
        seed=synth["seed"],
        size=synth["size"],
        test_fraction=synth["test_fraction"],
        test_photos=synth["test_photos"],
    )
    assert counts["test"] == test_items
    return folder / "test"


@pytest.fixture(scope="module")
def mini(model_cache):
    import torch

    from xmgie.loading.directory import load_pipeline

    return load_pipeline("mini", cache_dir=model_cache, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def scores(mini, held_out):
    """Per configuration, one row of scores per held-out item (with its kind)."""
    rows = read_paired_metadata(held_out)
    return {
        name: [
            edit_and_score(
                mini,
                row,
                held_out,
                extensions=EXTENSIONS if configuration["extensions"] else (),
                mask_source=configuration["mask"],
                seed=index,
                num_inference_steps=STEPS,
            )
            for index, row in enumerate(rows)
        ]
        for name, configuration in CONFIGURATIONS.items()
    }


def by_kind(rows, score):
    values: dict[str, list[float]] = {}
    for row in rows:
        if row[score] is not None:
            values.setdefault(row["kind"], []).append(float(row[score]))
    return {kind: float(np.mean(v)) for kind, v in values.items()}


KNOWN_MISSES: dict[str, str] = {
    "more_contrast": "little of its change (ratio 0.83, tone gain 0.28; autoencoder floor 0.32)",
    "automatic_mask_local_iou": "the estimates find little of the shapes (IoU about 0.10)",
}
"""Bars the shipped mini weights do not reach yet (README, "What mini can and cannot do"): each is a strict
expected failure, so a model that reaches one fails the suite until the entry is removed."""


def known_miss(name: str):
    return (
        pytest.param(name, marks=pytest.mark.xfail(reason=KNOWN_MISSES[name], strict=True))
        if name in KNOWN_MISSES
        else name
    )


@needs_mini
@pytest.mark.parametrize("kind", [known_miss(kind) for kind in L1_RATIO_BARS])
def test_every_kind_comes_closer_to_its_exact_target_than_the_source_is(scores, kind):
    ratios = by_kind(scores["all_user"], "l1_ratio")
    assert set(ratios) == set(L1_RATIO_BARS)
    assert ratios[kind] <= L1_RATIO_BARS[kind], f"mean L1 ratio to the target of {kind}: {ratios[kind]:.3f}"


@needs_mini
def test_a_user_mask_with_pfb_and_gb_keeps_far_outside_pixels_exactly_and_plain_mgie_does_not(scores):
    kept = [row["far_outside_equal"] for row in scores["all_user"] if row["far_outside_equal"] is not None]
    plain = [row["far_outside_equal"] for row in scores["plain"] if row["far_outside_equal"] is not None]
    assert len(kept) == len(plain) == PER_KIND * 3  # the local kinds: global ones have no outside
    assert min(kept) == 1.0
    assert float(np.mean(plain)) < 0.5


@needs_mini
@pytest.mark.parametrize("scope", [known_miss("automatic_mask_local_iou"), known_miss("automatic_mask_global_scope")])
def test_automatic_masks_find_local_edits_and_judge_global_ones_global(scores, scope):
    rows = scores["all_auto"]
    if scope == "automatic_mask_local_iou":
        local_iou = [row["mask_iou"] for row in rows if row["kind"] not in GLOBAL_KINDS]
        assert float(np.mean(local_iou)) >= 0.5, local_iou
    else:
        global_right = [row["scope_correct"] for row in rows if row["kind"] in GLOBAL_KINDS]
        assert float(np.mean(global_right)) >= 0.9, global_right


@needs_mini
def test_the_expressive_instruction_names_the_edit_kind(scores):
    named = [row["names_kind"] for row in scores["plain"]]
    assert len(named) == PER_KIND * len(KIND_KEYWORDS)
    assert float(np.mean(named)) >= 0.8, by_kind(scores["plain"], "names_kind")


AUTOENCODER_L1_BAR = 0.04
"""Largest mean L1 (pixels in [0, 1]) of a held-out target through mini's VAE and back."""


@needs_mini
def test_the_autoencoder_reconstructs_held_out_targets(mini, held_out):
    errors = []
    for row in read_paired_metadata(held_out):
        target = np.asarray(Image.open(held_out / row["target_file"]).convert("RGB"), dtype=np.float64)
        trip = autoencoder_round_trip(mini, held_out / row["target_file"])
        assert trip.shape == target.shape and trip.dtype == np.uint8
        errors.append(float(np.abs(trip - target).mean()) / 255)
    assert 0 < float(np.mean(errors)) <= AUTOENCODER_L1_BAR, errors


@needs_mini
def test_detail_transfer_lowers_the_autoencoder_floor_of_colour_edits(mini, held_out):
    """The closest a decoded edit can come to a colour edit's target, without and with mini's detail transfer."""
    assert mini.resolve_detail()[0] > 0
    floors: dict[str, dict[bool, list[float]]] = {}
    for row in read_paired_metadata(held_out):
        if row["kind"] not in ("sepia", "more_contrast", "warmer", "cooler"):
            continue
        for detail in (False, True):
            trip = autoencoder_round_trip(
                mini, held_out / row["target_file"], held_out / row["source_file"] if detail else None
            )
            scores = item_scores(
                held_out / row["source_file"], held_out / row["target_file"], trip, held_out / row["mask_file"]
            )
            floors.setdefault(row["kind"], {}).setdefault(detail, []).append(scores["l1_ratio"])
    means = {kind: {detail: float(np.mean(v)) for detail, v in by.items()} for kind, by in floors.items()}
    assert len(means) == 4
    for kind, floor in means.items():
        assert floor[True] <= 0.8 * floor[False], (kind, floor)
    assert np.mean([floor[True] for floor in means.values()]) <= 0.7 * np.mean([f[False] for f in means.values()])


@needs_mini
def test_mini_is_the_package_directory_in_safetensors_within_its_budget(model_cache):
    from xmgie.loading import directory

    assert directory.resolve_model_dir("mini", model_cache) == MINI_DIR
    weights = list(MINI_DIR.rglob("*.safetensors"))
    assert {path.parent.name for path in weights} >= {"mllm", "edit_head", "unet", "vae"}
    assert not list(MINI_DIR.rglob("*.bin")) and not list(MINI_DIR.rglob("*.pt"))
    assert sum(path.stat().st_size for path in MINI_DIR.rglob("*") if path.is_file()) <= 25 * 1024 * 1024


def test_a_missing_mini_preset_is_refused_with_how_to_train_it(monkeypatch, tmp_path, model_cache):
    from xmgie.loading import directory

    monkeypatch.setattr(directory, "MINI_DIR", tmp_path / "mini")
    with pytest.raises(directory.ModelDirectoryError, match="xmgie train --recipe mini"):
        directory.resolve_model_dir("mini", model_cache)


def test_commands_and_services_default_to_mini(monkeypatch):
    from xmgie.cli import build_parser
    from xmgie.jobs.settings import Settings

    monkeypatch.delenv("XMGIE_MODEL", raising=False)
    parser = build_parser()
    for command in (
        ["edit", "x.png", "--instruction", "i", "--output", "o.png"],
        ["batch", "m.jsonl", "--output-dir", "o"],
        ["augment", "d", "--instructions", "i.txt", "--output-dir", "o"],
    ):
        assert parser.parse_args(command).model == "mini", command
    assert Settings().model == "mini"
    monkeypatch.setenv("XMGIE_MODEL", "tiny")
    assert build_parser().parse_args(["batch", "m.jsonl", "--output-dir", "o"]).model == "tiny"


@needs_mini
def test_mini_edits_with_the_guidance_and_the_noise_schedule_it_was_trained_for(mini):
    from diffusers import DDPMScheduler

    from xmgie.loading.mini import MINI_GUIDANCE_SCALE, MINI_IMAGE_GUIDANCE_SCALE

    assert mini.resolve_guidance() == (MINI_GUIDANCE_SCALE, MINI_IMAGE_GUIDANCE_SCALE) != (7.5, 1.5)
    assert mini.scheduler.config.prediction_type == "v_prediction"
    # Zero terminal SNR: the last timestep training sees keeps none of the target (InstructPix2Pix's keeps 7 %),
    # and sampling starts from that timestep, pure noise, as it does.
    training = DDPMScheduler.from_config(mini.scheduler.config)
    assert float(training.alphas_cumprod[-1].sqrt()) < 1e-3
    original = DDPMScheduler.from_config(mini.scheduler.config, rescale_betas_zero_snr=False)
    assert float(original.alphas_cumprod[-1].sqrt()) > 0.05
    mini.scheduler.set_timesteps(20)
    assert int(mini.scheduler.timesteps[0]) == training.config.num_train_timesteps - 1
