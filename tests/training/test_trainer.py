"""``xmgie train`` on the tiny preset: MGIE's two losses, frozen parts, dropout, checkpoints and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from xmgie.cli import main
from xmgie.editing.images import load_image
from xmgie.editing.mllm import IMG_TOKENS
from xmgie.loading.directory import load_pipeline
from xmgie.training.data import PairedEditDataset, collate_pairs
from xmgie.training.ema import ParameterAverage
from xmgie.training.objective import (
    IGNORE_INDEX,
    MGIEObjective,
    PairLatents,
    StepNoise,
    build_teacher_forcing_batch,
    draw_conditioning_dropout,
    edit_size_weights,
    min_snr_weights,
    num_image_tokens,
    region_loss_weights,
)
from xmgie.training.synth import write_synthetic_dataset
from xmgie.training.trainer import StepSampler, TrainingConfig, latest_checkpoint, train

RESOLUTION = 32


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Two training pairs (one fixed batch) of the synthetic dataset."""
    output = tmp_path_factory.mktemp("pairs") / "synth"
    write_synthetic_dataset(output, 3, seed=0, size=RESOLUTION, kinds=("invert", "add_shape"))
    return output / "train"


def config(pairs, output, model_cache, **changes) -> TrainingConfig:
    values = {
        "data": str(pairs),
        "output_dir": str(output),
        "cache_dir": str(model_cache),
        "resolution": RESOLUTION,
        "batch_size": 2,
        "max_steps": 4,
        "learning_rate": 3e-3,
        "progress": False,
    }
    return TrainingConfig(**{**values, **changes})


def parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def fixed_losses(model_dir, pairs, model_cache) -> dict[str, float]:
    """Both losses of the fixed batch with fixed noise and no dropout."""
    pipe = load_pipeline(model_dir, cache_dir=model_cache, device="cpu", dtype=torch.float32)
    from diffusers import DDPMScheduler

    objective = MGIEObjective(
        pipe.mllm, pipe.edit_head, pipe.unet, pipe.vae, DDPMScheduler.from_config(pipe.scheduler.config)
    )
    batch = collate_pairs([item for item in PairedEditDataset(pairs, RESOLUTION)])
    inputs = build_teacher_forcing_batch(
        pipe.tokenizer,
        pipe.feature_extractor,
        num_image_tokens(pipe.mllm),
        batch["source_image"],
        batch["instruction"],
        batch["expressive_instruction"],
    )
    totals = {"instruction_loss": 0.0, "edit_loss": 0.0}
    with torch.no_grad():
        for draw in range(4):
            noise = StepNoise.draw(torch.Generator().manual_seed(draw), 2, (4, 4, 4), 1000, dropout_rate=0.0)
            losses = objective(inputs, batch["source_pixels"], batch["target_pixels"], noise)
            for name in totals:
                totals[name] += losses[name].item() / 4
    return totals


def test_both_losses_fall_over_a_few_dozen_steps_on_a_fixed_batch(pairs, tiny_dir, model_cache, tmp_path):
    before = fixed_losses(tiny_dir, pairs, model_cache)
    result = train(config(pairs, tmp_path / "out", model_cache, max_steps=30, warmup_steps=3))
    after = fixed_losses(tmp_path / "out", pairs, model_cache)
    assert result.steps == 30 and len(result.history) == 30
    assert after["instruction_loss"] < 0.7 * before["instruction_loss"], (before, after)
    assert after["edit_loss"] < 0.8 * before["edit_loss"], (before, after)
    # The log has one row per step with both losses; the warm-up ramps the learning rate.
    log = (tmp_path / "out" / "training_log.jsonl").read_text().splitlines()
    assert len(log) == 30
    assert result.history[0]["lr"] < result.history[5]["lr"] == pytest.approx(3e-3)


def test_a_resumed_run_ends_with_the_parameters_of_the_uninterrupted_one(pairs, model_cache, tmp_path):
    whole = train(
        config(pairs, tmp_path / "whole", model_cache, max_steps=4, checkpoint_every=2, gradient_accumulation_steps=2)
    )
    checkpoint = latest_checkpoint(tmp_path / "whole")
    assert checkpoint is not None and checkpoint.name == "step-000002"
    resumed = train(
        config(
            pairs,
            tmp_path / "resumed",
            model_cache,
            max_steps=4,
            gradient_accumulation_steps=2,
            resume=str(checkpoint),
        )
    )
    assert resumed.history == whole.history
    log = (tmp_path / "resumed" / "training_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3, 4]
    first = load_pipeline(tmp_path / "whole", cache_dir=model_cache, device="cpu", dtype=torch.float32)
    second = load_pipeline(tmp_path / "resumed", cache_dir=model_cache, device="cpu", dtype=torch.float32)
    middle = load_pipeline(checkpoint, cache_dir=model_cache, device="cpu", dtype=torch.float32)
    for name in ("mllm", "edit_head", "unet"):
        assert same(parameters(getattr(first, name)), parameters(getattr(second, name))), name
        assert not same(parameters(getattr(first, name)), parameters(getattr(middle, name))), name


def test_cached_latents_train_as_encoding_at_every_step_and_encode_each_image_once(
    pairs, model_cache, tmp_path, monkeypatch
):
    from diffusers import AutoencoderKL

    encoded = []
    original = AutoencoderKL.encode

    def counting_encode(self, x, *args, **kwargs):
        encoded.append(x.shape[0])
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting_encode)
    plain = train(config(pairs, tmp_path / "plain", model_cache, max_steps=4))
    encoded_plain, encoded[:] = sum(encoded), []
    cached = train(config(pairs, tmp_path / "cached", model_cache, max_steps=4, cache_latents=True))
    # Every step encodes its sources and targets (2 + 2 images); the cache encodes the 2 pairs once.
    assert encoded_plain == 4 * 4
    assert sum(encoded) == 2 * 2
    for before, after in zip(plain.history, cached.history, strict=True):
        for name in ("instruction_loss", "edit_loss"):
            assert after[name] == pytest.approx(before[name], rel=1e-4, abs=1e-6), (name, before, after)
    first = load_pipeline(tmp_path / "plain", cache_dir=model_cache, device="cpu", dtype=torch.float32)
    second = load_pipeline(tmp_path / "cached", cache_dir=model_cache, device="cpu", dtype=torch.float32)
    for name in ("edit_head", "unet"):
        a, b = parameters(getattr(first, name)), parameters(getattr(second, name))
        assert all(torch.allclose(a[key], b[key], atol=1e-5) for key in a), name


def test_frozen_components_do_not_change(pairs, tiny_pipe, model_cache, tmp_path):
    train(config(pairs, tmp_path / "head", model_cache, train=("edit_head",), max_steps=2))
    head_only = load_pipeline(tmp_path / "head", cache_dir=model_cache, device="cpu", dtype=torch.float32)
    for name in ("mllm", "unet", "vae"):
        assert same(parameters(getattr(tiny_pipe, name)), parameters(getattr(head_only, name))), name
    assert not same(parameters(tiny_pipe.edit_head), parameters(head_only.edit_head))

    train(config(pairs, tmp_path / "default", model_cache, max_steps=2))
    default = load_pipeline(tmp_path / "default", cache_dir=model_cache, device="cpu", dtype=torch.float32)
    # MGIE's default: the vision tower stays frozen while the language model, edit head and UNet learn.
    assert same(parameters(tiny_pipe.mllm.model.vision_tower), parameters(default.mllm.model.vision_tower))
    assert same(parameters(tiny_pipe.vae), parameters(default.vae))
    for module in ("language_model", "multi_modal_projector"):
        assert not same(
            parameters(getattr(tiny_pipe.mllm.model, module)), parameters(getattr(default.mllm.model, module))
        )
    assert not same(parameters(tiny_pipe.unet), parameters(default.unet))


def test_conditioning_dropout_rates_are_instruct_pix2pix_ones():
    drop_conditioning, drop_image = draw_conditioning_dropout(200_000, torch.Generator().manual_seed(0))
    rates = {
        "conditioning only": (drop_conditioning & ~drop_image).float().mean().item(),
        "image only": (~drop_conditioning & drop_image).float().mean().item(),
        "both": (drop_conditioning & drop_image).float().mean().item(),
        "neither": (~drop_conditioning & ~drop_image).float().mean().item(),
    }
    for name in ("conditioning only", "image only", "both"):
        assert rates[name] == pytest.approx(0.05, abs=0.003), rates
    assert rates["neither"] == pytest.approx(0.85, abs=0.005), rates


def objective_and_batch(pairs, tiny_pipe):
    """The tiny model's objective (DDPM training schedule), the fixed batch and its MLLM inputs."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(tiny_pipe.scheduler.config)
    objective = MGIEObjective(tiny_pipe.mllm, tiny_pipe.edit_head, tiny_pipe.unet, tiny_pipe.vae, scheduler)
    batch = collate_pairs([item for item in PairedEditDataset(pairs, RESOLUTION)])
    inputs = build_teacher_forcing_batch(
        tiny_pipe.tokenizer,
        tiny_pipe.feature_extractor,
        num_image_tokens(tiny_pipe.mllm),
        batch["source_image"],
        batch["instruction"],
        batch["expressive_instruction"],
    )
    return objective, batch, inputs


def test_dropped_items_reach_the_unet_as_null_conditioning_and_zero_image(pairs, tiny_pipe):
    objective, batch, inputs = objective_and_batch(pairs, tiny_pipe)
    # The [IMG] states are the ones that predict the [IMG] tokens; only the answer carries labels.
    img_ids = torch.tensor(tiny_pipe.tokenizer.convert_tokens_to_ids(IMG_TOKENS))
    for row in range(2):
        assert torch.equal(inputs.input_ids[row, inputs.img_positions[row] + 1], img_ids)
        answer = inputs.labels[row] != IGNORE_INDEX
        assert torch.equal(inputs.labels[row, answer][-9:-1], img_ids)
        assert inputs.labels[row, answer][-1] == tiny_pipe.tokenizer.eos_token_id
    seen = {}
    hook = tiny_pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(sample=args[0], conditioning=kwargs["encoder_hidden_states"]),
        with_kwargs=True,
    )
    try:
        noise = StepNoise.draw(torch.Generator().manual_seed(0), 2, (4, 4, 4), 1000)
        noise.drop_conditioning = torch.tensor([True, False])
        noise.drop_image = torch.tensor([False, True])
        with torch.no_grad():
            objective(inputs, batch["source_pixels"], batch["target_pixels"], noise)
            null = tiny_pipe.edit_head.null_conditioning(1)[0]
    finally:
        hook.remove()
    assert torch.allclose(seen["conditioning"][0], null, atol=1e-6)
    assert not torch.allclose(seen["conditioning"][1], null, atol=1e-3)
    assert seen["sample"][1, 4:].abs().max() == 0 and seen["sample"][0, 4:].abs().max() > 0


def test_a_null_target_of_source_teaches_the_null_branch_no_edit(pairs, tiny_pipe):
    objective, batch, inputs = objective_and_batch(pairs, tiny_pipe)
    seen = []
    hook = tiny_pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0][:, :4].clone()))
    noise = StepNoise.draw(torch.Generator().manual_seed(0), 2, (4, 4, 4), 1000)
    # Item 0 loses its conditioning only (the null branch); item 1 loses conditioning and image (unconditional).
    noise.drop_conditioning = torch.tensor([True, True])
    noise.drop_image = torch.tensor([False, True])
    try:
        with torch.no_grad():
            for null_target in ("target", "source"):
                objective(inputs, batch["source_pixels"], batch["target_pixels"], noise, null_target=null_target)
            latents = PairLatents.of(tiny_pipe.vae, batch["source_pixels"], batch["target_pixels"])
    finally:
        hook.remove()
    scale = tiny_pipe.vae.config.scaling_factor
    target = (latents.target_mean + latents.target_std * noise.latent_noise) * scale
    noised = lambda clean: objective.noise_scheduler.add_noise(clean, noise.noise, noise.timesteps)  # noqa: E731
    as_target, as_source = seen
    assert torch.allclose(as_target, noised(target), atol=1e-5)
    # "source": the null branch denoises the source's latent, so ε(image, ∅) learns no edit; the unconditional
    # item keeps the target, so the image guidance still learns what the image adds.
    assert torch.allclose(as_source[0], noised(latents.source * scale)[0], atol=1e-5)
    assert torch.allclose(as_source[1], as_target[1])
    assert not torch.allclose(as_source[0], as_target[0], atol=1e-3)
    with pytest.raises(ValueError, match="null_target"):
        objective(inputs, batch["source_pixels"], batch["target_pixels"], noise, null_target="nothing")


def test_region_weights_give_a_small_region_its_share_of_the_loss_and_each_item_its_weight():
    masks = torch.zeros(4, 1, 32, 32)
    masks[0, :, 4:10, 4:10] = 1  # a local edit's region: 36 of 1,024 pixels
    masks[1] = 1  # a global edit: the whole image
    masks[3, :, :, :20] = 1  # a region already larger than the share
    weights = region_loss_weights(masks, (16, 16), share=0.5)
    region = torch.nn.functional.adaptive_avg_pool2d(masks, (16, 16))
    assert torch.allclose(weights.mean(dim=(1, 2, 3)), torch.ones(4))
    # Under an error that is the same everywhere, the small region now carries half of its item's loss.
    assert float((weights[0] * region[0]).sum() / weights[0].sum()) == pytest.approx(0.5)
    assert float(region[0].mean()) < 0.05
    for item in (1, 2, 3):  # full, empty, large: plain mean squares
        assert torch.equal(weights[item], torch.ones_like(weights[item]))
    assert torch.equal(region_loss_weights(masks, (16, 16), share=0.0), torch.ones_like(weights))


def test_the_edit_loss_weighs_each_pixel_by_its_region_weight(pairs, tiny_pipe):
    objective, batch, inputs = objective_and_batch(pairs, tiny_pipe)
    assert objective.noise_scheduler.config.prediction_type == "epsilon"
    kinds = [json.loads(line)["kind"] for line in (pairs / "metadata.jsonl").read_text().splitlines()]
    assert kinds == ["invert", "add_shape"] and 0 < float(batch["mask"][1].mean()) < 0.2
    seen = {}
    hook = tiny_pipe.unet.register_forward_hook(lambda module, args, output: seen.update(prediction=output[0]))
    noise = StepNoise.draw(torch.Generator().manual_seed(0), 2, (4, 4, 4), 1000)
    try:
        with torch.no_grad():
            plain = objective(inputs, batch["source_pixels"], batch["target_pixels"], noise)["edit_loss"]
            weighted = objective(
                inputs,
                batch["source_pixels"],
                batch["target_pixels"],
                noise,
                region_masks=batch["mask"],
                region_loss_share=0.5,
            )["edit_loss"]
    finally:
        hook.remove()
    squared_error = (seen["prediction"] - noise.noise).pow(2)
    assert float(plain) == pytest.approx(float(squared_error.mean()), rel=1e-5)
    expected = (squared_error * region_loss_weights(batch["mask"], (4, 4), 0.5)).mean()
    assert float(weighted) == pytest.approx(float(expected), rel=1e-5)
    assert abs(float(weighted) - float(plain)) > 1e-4 * float(plain)


def test_masked_attention_items_are_drawn_last_at_their_share():
    plain = StepNoise.draw(torch.Generator().manual_seed(3), 8, (4, 4, 4), 1000)
    masked = StepNoise.draw(torch.Generator().manual_seed(3), 8, (4, 4, 4), 1000, masked_attention_share=0.5)
    assert plain.mask_attention is None
    for name in ("timesteps", "noise", "latent_noise", "drop_conditioning", "drop_image"):
        assert torch.equal(getattr(plain, name), getattr(masked, name)), name
    many = StepNoise.draw(torch.Generator().manual_seed(0), 100_000, (1, 1, 1), 1000, masked_attention_share=0.3)
    assert float(many.mask_attention.float().mean()) == pytest.approx(0.3, abs=0.005)
    every = StepNoise.draw(torch.Generator().manual_seed(0), 64, (1, 1, 1), 1000, masked_attention_share=1.0)
    assert bool(every.mask_attention.all())


def test_noisy_timestep_items_are_drawn_last_and_tilt_the_timesteps_to_the_noisier_half():
    plain = StepNoise.draw(torch.Generator().manual_seed(3), 64, (4, 4, 4), 1000, masked_attention_share=0.5)
    tilted = StepNoise.draw(
        torch.Generator().manual_seed(3), 64, (4, 4, 4), 1000, masked_attention_share=0.5, noisy_timestep_share=0.5
    )
    assert plain.noisy_timestep is None
    for name in ("noise", "latent_noise", "drop_conditioning", "drop_image", "mask_attention"):
        assert torch.equal(getattr(plain, name), getattr(tilted, name)), name
    redrawn = tilted.noisy_timestep
    assert 0 < int(redrawn.sum()) < 64
    assert torch.equal(tilted.timesteps[~redrawn], plain.timesteps[~redrawn])
    assert bool((tilted.timesteps[redrawn] >= 500).all())
    # A share s draws a timestep of the noisier half (1 + s) / (1 - s) times as often as one of the other half.
    many = StepNoise.draw(torch.Generator().manual_seed(0), 200_000, (1, 1, 1), 1000, noisy_timestep_share=0.5)
    assert float(many.noisy_timestep.float().mean()) == pytest.approx(0.5, abs=0.005)
    assert float((many.timesteps >= 500).float().mean()) == pytest.approx(0.75, abs=0.005)
    assert int(many.timesteps.min()) == 0 and int(many.timesteps.max()) == 999


def spy(monkeypatch, module, name: str, pick) -> list:
    """Record ``pick(*args)`` of every call of ``module.name``, which still runs."""
    seen: list = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args: seen.append(pick(*args)) or original(*args))
    return seen


def train_command(pairs, model_cache, output, steps: int, *options: str) -> int:
    """``xmgie train`` of tiny on ``pairs`` for ``steps`` steps of 2 items, with ``options``."""
    common = ["train", "--data", str(pairs), "--cache-dir", str(model_cache), "--model", "tiny", "--no-progress"]
    common += ["--resolution", str(RESOLUTION), "--batch-size", "2", "--max-steps", str(steps)]
    return main([*common, "--output-dir", str(output), *options])


def test_the_command_tilts_the_timesteps_by_the_share_it_is_given(pairs, model_cache, tmp_path, monkeypatch):
    from xmgie.training import objective as objective_module

    shares = spy(monkeypatch, objective_module, "noisy_timesteps", lambda timesteps, total, share, rng: share)
    assert train_command(pairs, model_cache, tmp_path / "uniform", 2) == 0
    assert shares == []
    assert train_command(pairs, model_cache, tmp_path / "tilted", 2, "--noisy-timestep-share", "0.4") == 0
    assert shares == [0.4, 0.4]


def test_masked_attention_reads_the_conditioning_only_inside_the_region(pairs, tiny_pipe):
    """An item trained with its cross-attention masked (CAM as with a user's mask) attends to its conditioning
    inside its region and to the null conditioning outside: with an empty region it is predicted exactly as with
    its conditioning dropped, with a full one exactly as without the masking (tiny's UNet reads the conditioning
    through cross-attention only)."""
    objective, batch, inputs = objective_and_batch(pairs, tiny_pipe)
    processors = {name: type(p) for name, p in tiny_pipe.unet.attn_processors.items()}
    predictions = []
    hook = tiny_pipe.unet.register_forward_hook(lambda module, args, output: predictions.append(output[0]))
    noise = StepNoise.draw(torch.Generator().manual_seed(0), 2, (4, 4, 4), 1000, dropout_rate=0.0)
    masks = batch["mask"].clone()
    masks[0] = 0  # item 0: an empty region
    masks[1] = 1  # item 1: the whole image
    try:
        with torch.no_grad():
            objective(inputs, batch["source_pixels"], batch["target_pixels"], noise)
            noise.mask_attention = torch.tensor([True, True])
            objective(inputs, batch["source_pixels"], batch["target_pixels"], noise, region_masks=masks)
            noise.mask_attention = None
            noise.drop_conditioning = torch.tensor([True, True])
            objective(inputs, batch["source_pixels"], batch["target_pixels"], noise)
    finally:
        hook.remove()
    plain, masked, dropped = predictions
    assert torch.allclose(masked[0], dropped[0], atol=1e-5)
    assert not torch.allclose(plain[0], dropped[0], atol=1e-4)
    assert torch.allclose(masked[1], plain[1], atol=1e-5)
    # The UNet's own processors are back after the step.
    assert {name: type(p) for name, p in tiny_pipe.unet.attn_processors.items()} == processors


def test_min_snr_weights_clamp_the_signal_to_noise_ratio_at_gamma():
    from diffusers import DDPMScheduler

    epsilon = DDPMScheduler(num_train_timesteps=1000)
    velocity = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    timesteps = torch.tensor([0, 50, 400, 999])
    alphas = epsilon.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    assert float(snr[0]) > 5 > float(snr[2])  # the clamp acts on the near-clean timesteps only
    for scheduler, denominator in ((epsilon, snr), (velocity, snr + 1)):
        weights = min_snr_weights(scheduler, timesteps, 5.0)
        assert torch.allclose(weights, torch.minimum(snr, torch.tensor(5.0)) / denominator)
    # ε-prediction: the noisy timesteps keep weight 1 and the near-clean ones fall to γ / SNR.
    assert torch.allclose(min_snr_weights(epsilon, timesteps[2:], 5.0), torch.ones(2))
    assert float(min_snr_weights(epsilon, timesteps[:1], 5.0)) < 0.01


def test_min_snr_weighting_weighs_each_item_of_the_edit_loss_by_its_timestep(pairs, tiny_pipe):
    objective, batch, inputs = objective_and_batch(pairs, tiny_pipe)
    seen = {}
    hook = tiny_pipe.unet.register_forward_hook(lambda module, args, output: seen.update(prediction=output[0]))
    noise = StepNoise.draw(torch.Generator().manual_seed(0), 2, (4, 4, 4), 1000)
    noise.timesteps = torch.tensor([10, 700])
    try:
        with torch.no_grad():
            weighted = objective(inputs, batch["source_pixels"], batch["target_pixels"], noise, snr_gamma=5.0)
    finally:
        hook.remove()
    squared_error = (seen["prediction"] - noise.noise).pow(2)
    weights = min_snr_weights(objective.noise_scheduler, noise.timesteps, 5.0)
    assert float(weights[0]) < 0.1 and float(weights[1]) == pytest.approx(1.0)
    expected = (squared_error * weights[:, None, None, None]).mean()
    assert float(weighted["edit_loss"]) == pytest.approx(float(expected), rel=1e-5)


def test_edit_size_weights_make_each_items_loss_relative_to_its_edits_size():
    source = torch.zeros(4, 2, 4, 4)
    target = source.clone()
    target[0] += 2.0  # a large global edit
    target[1] += 0.5  # a subtle global edit, a quarter of its size
    target[2, :, :2] += 1.0  # an edit of half the picture, size sqrt(1/2)
    # target[3] is no edit at all: its size is floored, so it cannot take the whole batch's weight
    weights = edit_size_weights(target, source, 1.0)
    assert float(weights.mean()) == pytest.approx(1.0)
    assert float(weights[1] / weights[0]) == pytest.approx(4.0)
    assert float(weights[2] / weights[0]) == pytest.approx(2.0 / 0.5**0.5)
    sizes = torch.tensor([2.0, 0.5, 0.5**0.5, 0.0])
    assert float(weights[3] / weights[0]) == pytest.approx(2.0 / (0.1 * float(sizes.mean())))
    # Power 2 weighs by the squared size; power 0 leaves every item at 1.
    assert float(edit_size_weights(target, source, 2.0)[1] / edit_size_weights(target, source, 2.0)[0]) == (
        pytest.approx(16.0)
    )
    assert torch.equal(edit_size_weights(target, source, 0.0), torch.ones(4))
    # Region weights count in the size: the half-picture edit weighted 3 on its half (1 elsewhere) is sqrt(3) as large.
    pixel_weights = torch.ones(4, 1, 4, 4)
    pixel_weights[2, :, :2] = 3.0
    weighted = edit_size_weights(target, source, 1.0, pixel_weights)
    assert float(weighted[2] / weighted[0]) == pytest.approx(2.0 / (1.5**0.5))


def test_edit_size_weighting_weighs_each_item_of_the_edit_loss_by_its_edit(pairs, tiny_pipe):
    objective, batch, inputs = objective_and_batch(pairs, tiny_pipe)
    seen = {}
    hook = tiny_pipe.unet.register_forward_hook(lambda module, args, output: seen.update(prediction=output[0]))
    noise = StepNoise.draw(torch.Generator().manual_seed(0), 2, (4, 4, 4), 1000)
    noise.drop_conditioning[:] = False
    noise.drop_image[:] = False
    try:
        with torch.no_grad():
            plain = objective(inputs, batch["source_pixels"], batch["target_pixels"], noise)
            prediction = seen["prediction"]
            weighted = objective(inputs, batch["source_pixels"], batch["target_pixels"], noise, edit_size_power=1.0)
    finally:
        hook.remove()
    assert torch.equal(seen["prediction"], prediction)  # the weights change the loss, not the forward pass
    latents = PairLatents.of(tiny_pipe.vae, batch["source_pixels"], batch["target_pixels"])
    weights = edit_size_weights(latents.target_mean, latents.source, 1.0)
    assert abs(float(weights[0]) - float(weights[1])) > 0.05  # the two pairs' edits differ in size
    squared_error = (prediction - noise.noise).pow(2)
    assert float(plain["edit_loss"]) == pytest.approx(float(squared_error.mean()), rel=1e-5)
    expected = (squared_error * weights[:, None, None, None]).mean()
    assert float(weighted["edit_loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(weighted["edit_loss"]) != pytest.approx(float(plain["edit_loss"]), rel=1e-3)


def test_the_command_trains_in_bf16_and_the_directory_edits(pairs, tiny_dir, model_cache, tmp_path):
    out = tmp_path / "model"
    command = [sys.executable, "-m", "xmgie.cli", "train", "--data", str(pairs), "--output-dir", str(out)]
    command += ["--model", str(tiny_dir), "--resolution", str(RESOLUTION), "--batch-size", "2", "--max-steps", "2"]
    command += ["--precision", "bf16", "--cache-latents", "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    assert "trained 2 steps" in done.stdout
    assert json.loads((out / "training_config.json").read_text())["cache_latents"] is True
    source = pairs / "images" / "00000_source.png"
    assert (
        main(
            [
                "edit",
                str(source),
                "--instruction",
                "invert the colours",
                "--model",
                str(out),
                "--steps",
                "2",
                "--max-side",
                "64",
                "--seed",
                "1",
                "--output",
                str(tmp_path / "edit.png"),
            ]
        )
        == 0
    )
    assert load_image(tmp_path / "edit.png").size == load_image(source).size


def test_bad_options_and_a_missing_checkpoint_are_refused(pairs, model_cache, tmp_path, capsys):
    from xmgie.editing.errors import EditInputError

    with pytest.raises(EditInputError, match="--train: unknown component"):
        train(config(pairs, tmp_path / "x", model_cache, train=("text_encoder",)))
    with pytest.raises(EditInputError, match="--region-loss-share"):
        train(config(pairs, tmp_path / "x", model_cache, region_loss_share=1.0))
    with pytest.raises(EditInputError, match="--masked-attention-share"):
        train(config(pairs, tmp_path / "x", model_cache, masked_attention_share=1.5))
    with pytest.raises(EditInputError, match="--noisy-timestep-share"):
        train(config(pairs, tmp_path / "x", model_cache, noisy_timestep_share=1.0))
    with pytest.raises(EditInputError, match="--null-target"):
        train(config(pairs, tmp_path / "x", model_cache, null_target="nothing"))
    with pytest.raises(EditInputError, match="--snr-gamma"):
        train(config(pairs, tmp_path / "x", model_cache, snr_gamma=-1.0))
    for power in (-1.0, 2.5):
        with pytest.raises(EditInputError, match="--edit-size-power"):
            train(config(pairs, tmp_path / "x", model_cache, edit_size_power=power))
    with pytest.raises(EditInputError) as missing:
        train(config(pairs, tmp_path / "x", model_cache, resume="latest"))
    assert missing.value.code == "checkpoint_not_found"
    # A bad row stops the command before the model is loaded, with exit status 2 and the row's line.
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metadata.jsonl").write_text('{"source_file": "a.png"}\n')
    assert (
        main(["train", "--data", str(tmp_path / "bad"), "--output-dir", str(tmp_path / "y"), "--model", "nowhere"])
        == 2
    )
    error = capsys.readouterr().err
    assert "invalid_metadata_row" in error and "metadata.jsonl line 1:" in error
    assert not (tmp_path / "y").exists()


def take(sampler: StepSampler, count: int) -> list[int]:
    return [index for index, _ in zip(sampler, range(count), strict=False)]


def test_processes_share_each_step_and_a_restart_reads_what_the_whole_run_would():
    one = take(StepSampler(5, 2, seed=1, process=0, processes=1), 20)
    assert sorted(one[:5]) == list(range(5)) and sorted(one[5:10]) == list(range(5)) and one[:5] != one[5:10]
    first, second = take(StepSampler(5, 1, 1, 0, 2), 10), take(StepSampler(5, 1, 1, 1, 2), 10)
    # Two processes of one sample each read, step by step, the two samples one process of two reads.
    assert [index for pair in zip(first, second, strict=True) for index in pair] == one
    assert take(StepSampler(5, 2, seed=1, process=0, processes=1, start_batch=3), 14) == one[6:]


def test_the_teacher_forced_prompt_is_the_one_inference_generates_from(tiny_pipe):
    from xmgie.editing.mllm import generate_expressive_instructions
    from xmgie.training.objective import prompt_token_ids

    seen = []
    hook = tiny_pipe.mllm.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["input_ids"], kwargs["attention_mask"])), with_kwargs=True
    )
    instructions = ["make it black and white", "add a red circle in the top left"]
    try:
        generate_expressive_instructions(
            tiny_pipe.mllm,
            tiny_pipe.tokenizer,
            tiny_pipe.feature_extractor,
            [Image.new("RGB", (40, 30), (90, 20, 200))] * 2,
            instructions,
            max_new_tokens=10,
        )
    finally:
        hook.remove()
    input_ids, attention_mask = seen[0]
    for row, instruction in enumerate(instructions):
        prompt = input_ids[row, attention_mask[row].bool()].tolist()
        assert prompt == prompt_token_ids(tiny_pipe.tokenizer, instruction, num_image_tokens(tiny_pipe.mllm))


def test_conditioning_spread_measures_how_much_items_differ():
    from xmgie.training.objective import conditioning_spread

    common = torch.randn(1, 77, 8)
    assert conditioning_spread(common.repeat(4, 1, 1)).item() == pytest.approx(0.0, abs=1e-6)
    assert conditioning_spread(common).item() == pytest.approx(0.0, abs=1e-6)
    # Two items ±d around a common vector c: deviation |d|, size sqrt(|c|² + |d|²).
    c, d = torch.full((1, 4), 3.0), torch.full((1, 4), 4.0)
    assert conditioning_spread(torch.cat([c + d, c - d])).item() == pytest.approx(4 / 5)


def test_the_average_follows_the_schedule_and_is_applied_only_inside_the_block():
    weight = torch.nn.Parameter(torch.zeros(3))
    average = ParameterAverage([weight], decay=0.9)
    expected = None
    for step, value in enumerate([1.0, 2.0, 4.0, 8.0], start=1):
        with torch.no_grad():
            weight.fill_(value)
        average.update(step)
        rate = 1 - min(0.9, (1 + step) / (10 + step))
        expected = value if expected is None else expected + rate * (value - expected)
    assert torch.allclose(average.averages[0], torch.full((3,), expected))
    assert 1.0 < expected < 8.0
    with average.applied():
        assert torch.allclose(weight, torch.full((3,), expected))
    assert torch.equal(weight, torch.full((3,), 8.0))
    with pytest.raises(ValueError, match="decay"):
        ParameterAverage([weight], decay=1.0)


def test_a_run_writes_the_average_keeps_raw_checkpoints_and_resumes_it(pairs, model_cache, tmp_path):
    options = {"max_steps": 3, "checkpoint_every": 1}
    train(config(pairs, tmp_path / "raw", model_cache, **options))
    train(config(pairs, tmp_path / "ema", model_cache, ema_decay=0.5, **options))
    checkpoint = latest_checkpoint(tmp_path / "ema")
    assert checkpoint is not None and checkpoint.name == "step-000002"
    train(config(pairs, tmp_path / "resumed", model_cache, ema_decay=0.5, resume=str(checkpoint), **options))

    def unet(folder):
        return parameters(load_pipeline(folder, cache_dir=model_cache, device="cpu", dtype=torch.float32).unet)

    raw = [unet(tmp_path / "raw" / "checkpoints" / f"step-00000{step}") for step in (1, 2)] + [unet(tmp_path / "raw")]
    for step in (1, 2):  # checkpoints hold the step's own weights, as without the average
        assert same(unet(tmp_path / "ema" / "checkpoints" / f"step-00000{step}"), raw[step - 1])
    expected = dict(raw[0])
    for step in (2, 3):
        rate = 1 - min(0.5, (1 + step) / (10 + step))
        expected = {name: value + rate * (raw[step - 1][name] - value) for name, value in expected.items()}
    averaged = unet(tmp_path / "ema")
    assert all(torch.allclose(averaged[name], expected[name], atol=1e-6) for name in expected)
    assert not same(averaged, raw[2])
    resumed = unet(tmp_path / "resumed")
    assert all(torch.allclose(resumed[name], averaged[name], atol=1e-6) for name in averaged)


def test_repeated_items_come_that_many_times_an_epoch_and_a_restart_still_reads_the_whole_run():
    sampler = StepSampler(3, 1, seed=2, process=0, processes=1, repeats=[1, 3, 1])
    stream = take(sampler, 15)
    for epoch in range(3):
        assert sorted(stream[epoch * 5 : epoch * 5 + 5]) == [0, 1, 1, 1, 2]
    assert stream[:5] != stream[5:10]
    assert take(StepSampler(3, 1, seed=2, process=0, processes=1, start_batch=4, repeats=[1, 3, 1]), 11) == stream[4:]
    # Without repeats the stream is the one it always was.
    assert take(StepSampler(5, 2, seed=1, process=0, processes=1, repeats=[1] * 5), 20) == take(
        StepSampler(5, 2, seed=1, process=0, processes=1), 20
    )


def test_repeat_rules_match_metadata_columns_and_refuse_what_matches_nothing(pairs):
    from xmgie.editing.errors import EditInputError
    from xmgie.training.data import read_pairs
    from xmgie.training.trainer import row_repeats

    rows = read_pairs(pairs)
    kinds = [row.extra["kind"] for row in rows]
    assert set(kinds) == {"invert", "add_shape"}
    assert row_repeats(rows, ["kind=add_shape:3"]) == [3 if kind == "add_shape" else 1 for kind in kinds]
    # A row two rules match is read by the larger count.
    both = row_repeats(rows, ["scope=local:2", "kind=add_shape:4", "scope=global:5"])
    assert both == [4 if kind == "add_shape" else 5 for kind in kinds]
    with pytest.raises(EditInputError, match="no metadata row has kind = 'sepia'"):
        row_repeats(rows, ["kind=sepia:2"])
    for bad in ("kind=add_shape", "kind=add_shape:0", "=x:2", "kind:2", "kind=add_shape:1.5"):
        with pytest.raises(EditInputError, match="COLUMN=VALUE:TIMES"):
            row_repeats(rows, [bad])


def test_a_run_reads_the_repeated_rows_as_often_as_asked(pairs, model_cache, tmp_path, monkeypatch, capsys):
    from xmgie.training.data import read_pairs

    kinds = [row.extra["kind"] for row in read_pairs(pairs)]
    reads: list[str] = []
    original = PairedEditDataset.__getitem__
    monkeypatch.setattr(
        PairedEditDataset, "__getitem__", lambda self, index: reads.append(kinds[index]) or original(self, index)
    )
    epoch = kinds.count("invert") + 3 * kinds.count("add_shape")
    train(
        config(
            pairs, tmp_path / "out", model_cache, batch_size=1, max_steps=2 * epoch, repeat_rows=("kind=add_shape:3",)
        )
    )
    assert len(reads) == 2 * epoch
    assert reads.count("add_shape") == 2 * 3 * kinds.count("add_shape")
    # The command line takes the same rules and refuses a malformed one before loading anything.
    assert main(["train", "--data", str(pairs), "--output-dir", str(tmp_path / "bad"), "--repeat-rows", "kind"]) == 2
    assert "COLUMN=VALUE:TIMES" in capsys.readouterr().err


def test_the_command_masks_the_attention_of_the_share_it_is_given(pairs, model_cache, tmp_path, monkeypatch):
    from xmgie.editing import attention as attention_module

    masked_steps = spy(monkeypatch, attention_module, "install_edit_processors", lambda _, control: control.batch_size)
    assert train_command(pairs, model_cache, tmp_path / "never", 3) == 0
    assert masked_steps == []
    assert train_command(pairs, model_cache, tmp_path / "always", 3, "--masked-attention-share", "1") == 0
    assert masked_steps == [2, 2, 2]
