"""The diffusion stage and the whole pipeline on the tiny preset."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionInstructPix2PixPipeline,
)
from PIL import Image

from tests.conftest import gradient_image
from xmgie.editing.detail import DEFAULT_DETAIL_EPSILON, transfer_detail
from xmgie.editing.errors import EditInputError
from xmgie.editing.images import load_image
from xmgie.editing.options import AutoMaskOptions, GBOptions
from xmgie.editing.pipeline import XMGIEPipeline


def reference_ip2p(pipe: XMGIEPipeline, scheduler) -> StableDiffusionInstructPix2PixPipeline:
    """diffusers' InstructPix2Pix pipeline over the same UNet and VAE, fed embeddings directly."""
    return StableDiffusionInstructPix2PixPipeline(
        vae=pipe.vae,
        text_encoder=None,
        tokenizer=None,
        unet=pipe.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.mark.parametrize(
    "scheduler_cls", [EulerAncestralDiscreteScheduler, DDIMScheduler, DPMSolverMultistepScheduler]
)
def test_diffusion_stage_reproduces_instruct_pix2pix(tiny_pipe, scheduler_cls):
    scheduler = scheduler_cls.from_config(tiny_pipe.scheduler.config)
    pipe = XMGIEPipeline(**{**tiny_pipe.components, "scheduler": scheduler})
    image = gradient_image(64, 48)
    prompt_embeds, negative_embeds, _ = pipe.encode_instructions([image], ["make it snow"], 96, {})

    expected = reference_ip2p(pipe, scheduler_cls.from_config(scheduler.config))(
        image=image,
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_embeds,
        num_inference_steps=4,
        guidance_scale=7.5,
        image_guidance_scale=1.5,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
    ).images

    with torch.no_grad():
        image_latents = pipe.prepare_image_latents(pipe.image_processor.preprocess(image))
        latents = pipe.denoise(
            image_latents,
            prompt_embeds,
            negative_embeds,
            num_inference_steps=4,
            guidance_scale=7.5,
            image_guidance_scale=1.5,
            generator=torch.Generator().manual_seed(3),
        )
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    ours = pipe.image_processor.postprocess(decoded, output_type="np")
    assert ours.shape == expected.shape == (1, 48, 64, 3)
    assert np.abs(ours - expected).max() <= 1e-4
    # Guidance matters: the unguided call gives another picture, so the comparison above has teeth.
    with torch.no_grad():
        unguided = pipe.denoise(
            image_latents,
            prompt_embeds,
            negative_embeds,
            num_inference_steps=4,
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(3),
        )
    assert not torch.allclose(unguided, latents, atol=1e-3)


def test_same_seed_same_output_other_seed_other_output(tiny_pipe):
    image = gradient_image(64, 64)

    def run(seed: int) -> np.ndarray:
        out = tiny_pipe(image, "add a rainbow", num_inference_steps=3, generator=torch.Generator().manual_seed(seed))
        return np.asarray(out.images[0])

    first, again, other = run(7), run(7), run(8)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


EXTENSIONS_OFF = {"pfb": False, "cam": False, "ie": False, "gb": False, "auto_mask": False}


@pytest.mark.parametrize(
    "extensions, atol",
    # With the extensions on, more float32 operations between rows of different batch sizes add rounding noise.
    [(EXTENSIONS_OFF, 1e-4), ({}, 1e-3)],
    ids=["foundation", "extensions"],
)
def test_batch_equals_items_edited_alone(tiny_pipe, extensions, atol):
    images = [gradient_image(64, 64, 0.0), gradient_image(64, 64, 1.5), gradient_image(48, 64, 3.0)]
    masks = [Image.new("L", image.size, 0) for image in images]
    for mask in masks:
        mask.paste(255, (8, 8, 40, 40))
    instructions = ["make it winter", "add fireworks in the sky", "turn the walls blue"]
    seeds = [11, 12, 13]
    batch = tiny_pipe(
        images,
        instructions,
        mask=masks,
        num_inference_steps=3,
        output_type="latent",
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        **extensions,
    )
    for index, (image, mask, instruction, seed) in enumerate(zip(images, masks, instructions, seeds, strict=True)):
        alone = tiny_pipe(
            image,
            instruction,
            mask=mask,
            num_inference_steps=3,
            output_type="latent",
            generator=torch.Generator().manual_seed(seed),
            **extensions,
        )
        assert alone.expressive_instructions[0] == batch.expressive_instructions[index]
        torch.testing.assert_close(batch.images[index], alone.images[0], atol=atol, rtol=1e-4)
    assert not torch.allclose(batch.images[0], batch.images[1])


@pytest.fixture(scope="module")
def tiny_pipe_float64(tiny_dir, model_cache):
    """The tiny pipeline in float64: batch independence is then compared without the float32 kernels' habit of
    rounding a batch of 3 rows differently from a batch of 1."""
    from xmgie.loading.directory import load_pipeline

    return load_pipeline(tiny_dir, cache_dir=model_cache, device="cpu", dtype=torch.float64)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="auto"),
        pytest.param({"ie": {"region": "outside_mask", "reference": "outside_mask"}}, id="auto-ie-outside-mask"),
        pytest.param({"ie": False}, id="auto-no-ie"),
        pytest.param({"auto_mask": {"mode": "always"}}, id="always"),
        pytest.param({"auto_mask": {"mode": "off"}}, id="off"),
    ],
)
def test_mixed_batch_equals_items_edited_alone(tiny_pipe_float64, options):
    """Masked and unmasked, local and global items in one call: each gets what it gets alone."""
    pipe = tiny_pipe_float64
    images = [gradient_image(64, 64, phase) for phase in (0.0, 1.5, 3.0)]
    box = Image.new("L", (64, 64), 0)
    box.paste(255, (8, 8, 40, 40))
    masks = [box, None, None]
    instructions = ["turn the walls blue", "make it look like a watercolor painting", "turn day into night"]
    seeds = [21, 22, 23]
    common = {"num_inference_steps": 2, "output_type": "latent", "auto_mask": {"draws": 4}, **options}
    if "auto_mask" in options:
        common["auto_mask"] = {"draws": 4, **options["auto_mask"]}
    batch = pipe(
        images, instructions, mask=masks, generator=[torch.Generator().manual_seed(s) for s in seeds], **common
    )
    assert batch.edit_scopes[0] == "local"
    expected_unmasked = "local" if options.get("auto_mask", {}).get("mode") == "always" else "global"
    assert batch.edit_scopes[1:] == [expected_unmasked] * 2
    for index, (image, mask, instruction, seed) in enumerate(zip(images, masks, instructions, seeds, strict=True)):
        alone = pipe(image, instruction, mask=mask, generator=torch.Generator().manual_seed(seed), **common)
        assert alone.edit_scopes[0] == batch.edit_scopes[index]
        torch.testing.assert_close(batch.images[index], alone.images[0], atol=1e-4, rtol=1e-4)


def test_odd_sized_rgba_comes_back_at_its_own_size(tiny_pipe):
    rgba = Image.new("RGBA", (67, 45), (200, 30, 30, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 20, 45))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    image = load_image(buffer.getvalue())
    out = tiny_pipe(image, "make it green", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (67, 45)
    assert out.images[0].mode == "RGB"
    assert {"mllm", "edit_head", "vae_encode", "diffusion", "vae_decode", "auto_mask"} <= set(out.timings)
    assert all(seconds > 0 for seconds in out.timings.values())


def test_callback_sees_every_step_and_can_replace_latents(tiny_pipe):
    seen: list[int] = []

    def callback(pipe, step, timestep, kwargs):
        seen.append(step)
        return {"latents": torch.zeros_like(kwargs["latents"])}

    out = tiny_pipe(
        gradient_image(32, 32),
        "x",
        num_inference_steps=4,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=callback,
    )
    assert seen == [0, 1, 2, 3]
    assert torch.count_nonzero(out.images[0]) == 0


def test_bad_batches_are_refused_with_a_clear_error(tiny_pipe):
    image = gradient_image(32, 32)
    with pytest.raises(EditInputError) as error:
        tiny_pipe(image, "   ")
    assert error.value.code == "empty_instruction"
    with pytest.raises(ValueError, match="2 images but 1 instructions"):
        tiny_pipe([image, image], ["x"])
    with pytest.raises(EditInputError) as error:
        tiny_pipe(image, "x", mask=Image.new("L", (16, 32)))
    assert error.value.code == "mask_size_mismatch"
    with pytest.raises(ValueError, match="mode 'RGBA'"):
        tiny_pipe(image.convert("RGBA"), "x")


def test_seeded_generators_are_on_the_execution_device_and_seeded(tiny_pipe):
    generators = tiny_pipe.seeded_generators([3, 11])
    assert [g.device for g in generators] == [tiny_pipe._execution_device] * 2
    assert [g.initial_seed() for g in generators] == [3, 11]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_seeded_generators_draw_on_cuda_when_the_pipeline_runs_there(tiny_pipe):
    import copy

    pipe = copy.deepcopy(tiny_pipe).to("cuda")
    (generator,) = pipe.seeded_generators([5])
    assert generator.device.type == "cuda"
    out = pipe(gradient_image(64, 64), "add a hat", num_inference_steps=2, generator=generator, output_type="latent")
    assert out.images[0].device.type == "cuda"


def test_a_model_directory_carries_the_guidance_its_edits_default_to(tiny_pipe, tmp_path):
    assert tiny_pipe.resolve_guidance() == (7.5, 1.5)  # no guidance in its model_index.json: InstructPix2Pix's
    guided = XMGIEPipeline(**tiny_pipe.components, guidance_scale=1.5, image_guidance_scale=1.0)
    guided.save_pretrained(tmp_path / "model", safe_serialization=True)
    loaded = XMGIEPipeline.from_pretrained(tmp_path / "model")
    assert loaded.resolve_guidance() == (1.5, 1.0)
    assert loaded.resolve_guidance(4.0, None) == (4.0, 1.0)  # what a call gives wins, one scale at a time

    image = gradient_image(64, 64)

    def run(**guidance) -> np.ndarray:
        out = loaded(
            image,
            "add a rainbow",
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(2),
            **EXTENSIONS_OFF,
            **guidance,
        )
        return np.asarray(out.images[0], dtype=np.int16)

    by_default = run()
    assert np.array_equal(by_default, run(guidance_scale=1.5, image_guidance_scale=1.0))
    assert np.abs(by_default - run(guidance_scale=7.5, image_guidance_scale=1.5)).max() > 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_every_prediction_type_converts_back_to_the_noise_it_implies(prediction_type):
    from diffusers import DDPMScheduler

    from xmgie.editing.blending import epsilon_from_prediction

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    generator = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(2, 3, 4, 4, 4, generator=generator)
    timesteps = torch.tensor([40, 700, 999])
    noisy = scheduler.add_noise(clean, noise, timesteps)
    output = {
        "epsilon": noise,
        "v_prediction": scheduler.get_velocity(clean, noise, timesteps),
        "sample": clean,
    }[prediction_type]
    for row, t in enumerate(timesteps):
        alpha = scheduler.alphas_cumprod[t]
        implied = epsilon_from_prediction(output[row], noisy[row], alpha, prediction_type)
        assert torch.allclose(implied, noise[row], atol=1e-4)
        # The conversion has teeth: reading the output as another type gives another noise.
        if prediction_type != "epsilon":
            assert not torch.allclose(output[row], noise[row], atol=1e-2)
    with pytest.raises(ValueError, match="prediction_type"):
        epsilon_from_prediction(noise, noisy, scheduler.alphas_cumprod[0], "x0")


def edit_gradient(pipe, instruction: str = "add a rainbow", seed: int = 1, **options):
    """A two-step edit of a 64×64 gradient with a fixed seed."""
    image = gradient_image(64, 64)
    return pipe(image, instruction, num_inference_steps=2, generator=torch.Generator().manual_seed(seed), **options)


def test_a_model_directory_carries_its_automatic_mask_mode(tiny_pipe, tmp_path):
    XMGIEPipeline(**tiny_pipe.components, auto_mask_mode="off").save_pretrained(tmp_path / "model")
    loaded = XMGIEPipeline.from_pretrained(tmp_path / "model")

    def run(**options):
        return edit_gradient(loaded, **options)

    # Unset: the model's "off" — no estimate, a global edit.
    unset = run()
    assert unset.masks == [None] and unset.edit_scopes == ["global"] and "auto_mask" not in unset.timings
    # A call that asks for an estimate gets one (the same model, "always": local to the estimate).
    asked = run(auto_mask={"mode": "always", "min_spread": 0.0})
    assert asked.masks[0] is not None and asked.edit_scopes == ["local"] and "auto_mask" in asked.timings
    # A model that sets no mode estimates by default, as before.
    assert tiny_pipe.resolve_auto_mask(AutoMaskOptions()).mode == "auto"
    assert loaded.resolve_auto_mask(AutoMaskOptions(mode="auto")).mode == "auto"


def test_a_model_directory_carries_its_automatic_mask_threshold_and_a_call_overrides_it(tiny_pipe, tmp_path):
    settings = {"auto_mask_strength": 0.7, "auto_mask_level": 0.04, "auto_mask_smoothing": 1.5}
    XMGIEPipeline(**tiny_pipe.components, **settings).save_pretrained(tmp_path / "model")
    loaded = XMGIEPipeline.from_pretrained(tmp_path / "model")
    resolved = loaded.resolve_auto_mask(AutoMaskOptions())
    assert (resolved.strength, resolved.level, resolved.smoothing) == (0.7, 0.04, 1.5)
    plain = tiny_pipe.resolve_auto_mask(AutoMaskOptions())
    assert (plain.strength, plain.level, plain.smoothing) == (0.5, 0.0, 0.0)  # DiffEdit's relative rule
    assert loaded.resolve_auto_mask(AutoMaskOptions(level=0.0, strength=0.4)).level == 0.0
    assert loaded.resolve_auto_mask(AutoMaskOptions(level=0.0, strength=0.4)).strength == 0.4
    # The level acts: above every difference the estimate is empty and the edit global; at a tiny level the
    # conditioning's difference covers the image, also global; the relative rule on the same call finds a blob.

    def run(**auto_mask):
        return edit_gradient(loaded, auto_mask={"mode": "auto", **auto_mask})

    assert run(level=10.0).edit_scopes == ["global"]
    assert run(level=1e-6).edit_scopes == ["global"]
    blob = run(level=0.0, smoothing=0.0, min_spread=0.0)
    assert blob.edit_scopes == ["local"] and 0.0 < blob.mask_fractions[0] < 0.6


def test_a_model_directory_carries_its_gb_blur_and_a_call_overrides_it(tiny_pipe, tmp_path):
    XMGIEPipeline(**tiny_pipe.components, gb_sigma_max=0.5, gb_sigma_s=1.0).save_pretrained(tmp_path / "model")
    loaded = XMGIEPipeline.from_pretrained(tmp_path / "model")
    assert (loaded.resolve_gb(GBOptions()).sigma_max, loaded.resolve_gb(GBOptions()).sigma_s) == (0.5, 1.0)
    assert tiny_pipe.resolve_gb(GBOptions()).sigma_max == 5.0 and tiny_pipe.resolve_gb(GBOptions()).sigma_s == 10.0
    assert loaded.resolve_gb(GBOptions(sigma_max=3.0)).sigma_max == 3.0
    image = gradient_image(64, 64)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[24:40, 24:40] = 255
    ring = np.zeros((64, 64), dtype=bool)  # 3 px outside the mask: past the model's feather, inside the default's
    ring[21:43, 21:43] = True
    ring[22:42, 22:42] = False

    def outside_changed(**options) -> float:
        out = loaded(
            image,
            "add a rainbow",
            mask=Image.fromarray(mask),
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(1),
            **options,
        )
        changed = np.any(np.asarray(out.images[0]) != np.asarray(image), axis=-1)
        return float(changed[ring].mean())

    assert outside_changed() == 0.0
    assert outside_changed(gb={"sigma_max": 5.0, "sigma_s": 10.0}) > 0.5


def test_a_model_with_a_detail_radius_puts_the_source_detail_into_its_decoded_edits(tiny_pipe, tmp_path):
    XMGIEPipeline(**tiny_pipe.components, detail_radius=2).save_pretrained(tmp_path / "model")
    loaded = XMGIEPipeline.from_pretrained(tmp_path / "model")
    assert loaded.resolve_detail() == (2, DEFAULT_DETAIL_EPSILON)
    assert tiny_pipe.resolve_detail()[0] == 0
    image = gradient_image(64, 64)

    def edit(**options):
        plain = dict(pfb=False, cam=False, ie=False, gb=False, auto_mask=False)
        return edit_gradient(loaded, "make it warmer", seed=3, **plain, **options).images[0]

    latents = edit(output_type="latent")
    with torch.no_grad():
        pixels = loaded.image_processor.preprocess(image)
        decoded = loaded.vae.decode(latents[None] / loaded.vae.config.scaling_factor).sample
        round_trip = loaded.vae.decode(loaded.prepare_image_latents(pixels)).sample
    expected = transfer_detail(decoded, round_trip, pixels, radius=2, epsilon=DEFAULT_DETAIL_EPSILON)
    expected = np.asarray(loaded.image_processor.postprocess(expected, output_type="pil")[0], dtype=int)
    plain = np.asarray(loaded.image_processor.postprocess(decoded, output_type="pil")[0], dtype=int)

    assert np.abs(np.asarray(edit(), dtype=int) - expected).max() <= 1
    assert np.abs(np.asarray(edit(detail=False), dtype=int) - plain).max() <= 1
    assert np.abs(expected - plain).mean() > 1.0
