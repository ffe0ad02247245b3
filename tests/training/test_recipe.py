"""Recipes (``xmgie train --recipe``), the autoencoder stage, the ``mini`` architecture and its working-size cap."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from xmgie.cli import main
from xmgie.editing.errors import EditInputError
from xmgie.editing.images import load_image
from xmgie.loading.directory import load_pipeline
from xmgie.loading.mini import MINI_SIDE, build_mini_tokenizer
from xmgie.loading.tiny import build_tiny_pipeline
from xmgie.training.autoencoder import (
    AutoencoderConfig,
    _training_pixels,
    start_posterior_narrow,
    train_autoencoder,
)
from xmgie.training.recipe import load_recipe, train_stages
from xmgie.training.synth import write_synthetic_dataset


@pytest.fixture(scope="module")
def synth32(tmp_path_factory):
    output = tmp_path_factory.mktemp("recipe") / "synth"
    write_synthetic_dataset(output, 12, seed=1, size=32, kinds=("invert", "darker", "add_shape"))
    return output


def test_the_mini_tokenizer_spends_few_tokens_on_an_instruction_and_still_encodes_any_text():
    tokenizer = build_mini_tokenizer()
    words = "add a red circle in the top left"
    ids = tokenizer(words, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(words.split())  # one token per word of the recipe's language (bytes would be 32)
    for text in (words, "paint the château naïvely ✨", "[IMG0] is text here"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert tokenizer.convert_tokens_to_ids("[IMG7]") == len(tokenizer) - 1


def test_a_model_never_works_above_its_max_working_side(tmp_path):
    pipe = build_tiny_pipeline()
    pipe.register_to_config(max_working_side=32)
    pipe.save_pretrained(tmp_path / "capped", safe_serialization=True)
    pipe = load_pipeline(tmp_path / "capped", cache_dir=tmp_path, device="cpu", dtype=torch.float32)
    assert pipe.config.max_working_side == 32
    shapes = []

    def record(_pipe, _step, _timestep, tensors):
        shapes.append(tuple(tensors["latents"].shape[-2:]))
        return tensors

    image = Image.new("RGB", (128, 96), (120, 60, 30))
    out = pipe(image, "make it darker", num_inference_steps=1, max_side=512, callback_on_step_end=record, ie=False)
    assert shapes == [(3, 4)]  # 32×24 px through a VAE of factor 8, not 64×48
    assert out.images[0].size == (128, 96)  # results still come back at the input's size
    shapes.clear()
    pipe(image, "make it darker", num_inference_steps=1, max_side=16, callback_on_step_end=record, ie=False)
    assert shapes == [(2, 2)]  # a smaller max_side still wins (16×8 px would be 2×1; rounded up to one multiple)


def test_the_autoencoder_stage_learns_to_reconstruct_and_sets_the_latent_scale(synth32):
    pipe = build_tiny_pipeline()
    vae = pipe.vae
    pixels = _training_pixels(synth32 / "train", 32)

    def reconstruction_l1() -> float:
        with torch.no_grad():
            return (vae.decode(vae.encode(pixels).latent_dist.mean).sample - pixels).abs().mean().item()

    before = reconstruction_l1()
    history = train_autoencoder(vae, synth32 / "train", 32, AutoencoderConfig(steps=80, batch_size=4, progress=False))
    after = reconstruction_l1()
    assert len(history) == 80
    assert after < 0.85 * before
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean
    assert vae.config.scaling_factor == pytest.approx(1 / latents.std().item(), rel=1e-4)
    assert not any(p.requires_grad for p in vae.parameters())


def test_the_autoencoder_stage_starts_from_a_narrow_posterior(synth32):
    vae = build_tiny_pipeline().vae
    pixels = _training_pixels(synth32 / "train", 32)[:4]
    with torch.no_grad():
        fresh_std = vae.encode(pixels).latent_dist.std
        start_posterior_narrow(vae, -8.0)
        posterior = vae.encode(pixels).latent_dist
    # A fresh VAE samples its latents with a standard deviation near 1: noise as large as the latents.
    assert fresh_std.mean().item() > 0.5
    assert torch.allclose(posterior.std, torch.full_like(posterior.std, float(np.exp(-4.0))))
    assert posterior.mean.abs().mean().item() > 0  # the means are untouched


def write_recipe(path, **changes):
    recipe = {
        "architecture": "tiny",
        "synth": {"count": 8, "size": 32, "seed": 0, "kinds": ["invert", "add_shape"]},
        "autoencoder": {"steps": 3, "batch_size": 2},
        "train": {"resolution": 32, "batch_size": 2, "max_steps": 3, "learning_rate": 1e-3},
        **changes,
    }
    path.write_text(json.dumps(recipe))
    return path


def test_a_recipe_builds_trains_and_writes_a_model_that_edits(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.json")
    assert main(["train", "--recipe", str(recipe), "--output-dir", str(tmp_path / "run"), "--no-progress"]) == 0
    run = tmp_path / "run"
    assert (run / "data" / "train" / "metadata.jsonl").is_file() and (run / "data" / "test").is_dir()
    assert len((run / "autoencoder_log.jsonl").read_text().splitlines()) == 3
    assert len((run / "model" / "training_log.jsonl").read_text().splitlines()) == 3
    assert set(json.loads((run / "timings.json").read_text())) == {"synth", "autoencoder", "train"}
    # The autoencoder stage changed the built VAE; the objective then left it as the stage wrote it.
    init = load_pipeline(run / "init", cache_dir=tmp_path, device="cpu", dtype=torch.float32)
    model = load_pipeline(run / "model", cache_dir=tmp_path, device="cpu", dtype=torch.float32)
    built = build_tiny_pipeline()
    assert not torch.equal(init.vae.decoder.conv_out.weight, built.vae.decoder.conv_out.weight)
    assert torch.equal(model.vae.decoder.conv_out.weight, init.vae.decoder.conv_out.weight)
    assert not torch.equal(model.unet.conv_in.weight, init.unet.conv_in.weight)
    source = load_image(run / "data" / "test" / "images" / "00000_source.png")
    out = model(source, "invert the colours", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert np.asarray(out.images[0]).shape == (32, 32, 3)


def test_a_recipe_of_stages_trains_each_from_the_one_before_and_keeps_what_is_done(tmp_path):
    stages = [
        {"resolution": 32, "batch_size": 2, "max_steps": 2, "learning_rate": 1e-3},
        {"max_steps": 3, "masked_attention_share": 1.0},
    ]
    recipe = write_recipe(tmp_path / "r.json", train=stages)
    run = tmp_path / "run"
    assert main(["train", "--recipe", str(recipe), "--output-dir", str(run), "--no-progress"]) == 0
    first, last = run / "stages" / "1", run / "model"
    assert len((first / "training_log.jsonl").read_text().splitlines()) == 2
    assert len((last / "training_log.jsonl").read_text().splitlines()) == 3
    assert set(json.loads((run / "timings.json").read_text())) == {
        "synth",
        "autoencoder",
        "train_stage_1",
        "train_stage_2",
    }
    # The second stage starts from the first one's model, with the first one's fields changed by its own.
    second = json.loads((last / "training_config.json").read_text())
    assert second["model"] == str(first) and second["output_dir"] == str(last)
    assert (second["batch_size"], second["max_steps"], second["masked_attention_share"]) == (2, 3, 1.0)
    assert json.loads((first / "training_config.json").read_text())["masked_attention_share"] == 0.0
    staged = load_pipeline(first, cache_dir=tmp_path, device="cpu", dtype=torch.float32)
    model = load_pipeline(last, cache_dir=tmp_path, device="cpu", dtype=torch.float32)
    assert not torch.equal(model.unet.conv_in.weight, staged.unet.conv_in.weight)
    # Run again without its last stage's output: the finished first stage is kept as it is.
    written = (first / "training_log.jsonl").stat().st_mtime_ns
    shutil.rmtree(last)
    assert main(["train", "--recipe", str(recipe), "--output-dir", str(run), "--no-progress"]) == 0
    assert (first / "training_log.jsonl").stat().st_mtime_ns == written
    assert len((last / "training_log.jsonl").read_text().splitlines()) == 3


def test_bad_recipes_are_refused_with_a_code(tmp_path, capsys):
    assert load_recipe("mini")["architecture"] == "mini"
    cases = {
        "recipe_not_found": str(tmp_path / "nowhere.json"),
        "invalid_recipe": str(write_recipe(tmp_path / "a.json", architecture="huge")),
    }
    for code, recipe in cases.items():
        with pytest.raises(EditInputError) as refused:
            load_recipe(recipe)
        assert refused.value.code == code
    for part, field in (("train", "data"), ("train", "epochs"), ("autoencoder", "lr")):
        bad = write_recipe(tmp_path / "b.json", **{part: {field: 1}})
        with pytest.raises(EditInputError, match=f"{part}: unknown or fixed field"):
            load_recipe(bad)
    with pytest.raises(EditInputError, match="train: unknown or fixed field"):
        load_recipe(write_recipe(tmp_path / "c.json", train=[{"max_steps": 2}, {"epochs": 1}]))
    for stages in ([], [{"max_steps": 2}, 3]):
        with pytest.raises(EditInputError, match="list of stages") as refused:
            load_recipe(write_recipe(tmp_path / "d.json", train=stages))
        assert refused.value.code == "invalid_recipe"
    assert main(["train", "--recipe", "nosuch", "--output-dir", str(tmp_path / "out")]) == 2
    assert "recipe_not_found" in capsys.readouterr().err
    assert main(["train", "--output-dir", str(tmp_path / "out")]) == 2
    assert "--data FOLDER" in capsys.readouterr().err


def test_architecture_options_reach_the_builder_and_bad_ones_are_refused(tmp_path):
    # mini's UNet with 6 attention heads of 16 channels at width 96 instead of 16 of 4 at width 64: the recipe
    # builds, trains and saves that architecture.
    recipe = write_recipe(
        tmp_path / "heads.json",
        architecture="mini",
        architecture_options={"unet_heads": 6, "unet_width": 96},
        synth={"count": 8, "size": MINI_SIDE, "seed": 0, "kinds": ["invert", "add_shape"]},
        autoencoder={"steps": 1, "batch_size": 2},
        train={"resolution": MINI_SIDE, "batch_size": 2, "max_steps": 1},
    )
    run = tmp_path / "run"
    assert main(["train", "--recipe", str(recipe), "--output-dir", str(run), "--no-progress"]) == 0
    for folder in ("init", "model"):
        config = json.loads((run / folder / "unet" / "config.json").read_text())
        assert config["attention_head_dim"] == 6  # diffusers' name for the number of heads
        assert config["block_out_channels"] == [32, 96, 96, 96]
    model = load_pipeline(run / "model", cache_dir=tmp_path, device="cpu", dtype=torch.float32)
    attention = model.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2
    assert attention.heads == 6 and attention.inner_dim // attention.heads == 16
    assert "architecture_options" not in load_recipe("mini")  # the shipped weights' 16 heads at width 64
    for options, message in (
        ({"unet_heads": 5}, "dividing the UNet's width 64"),
        ({"unet_heads": 6}, "dividing the UNet's width 64"),
        ({"unet_heads": "4"}, "dividing the UNet's width 64"),
        ({"unet_heads": 4, "unet_width": 72}, "multiple of 16"),
        ({"heads": 4}, "mini has no option"),
        ([4], "is a JSON object"),
    ):
        bad = write_recipe(tmp_path / "bad.json", architecture="mini", architecture_options=options)
        with pytest.raises(EditInputError, match=message) as refused:
            load_recipe(bad)
        assert refused.value.code == "invalid_recipe"
    with pytest.raises(EditInputError, match=r"tiny has no option\(s\) \['unet_heads'\]"):
        load_recipe(write_recipe(tmp_path / "tiny.json", architecture_options={"unet_heads": 4}))


def test_mini_works_at_its_training_size():
    recipe = load_recipe("mini")
    assert {stage["resolution"] for stage in train_stages(recipe)} == {recipe["synth"]["size"]} == {MINI_SIDE}
