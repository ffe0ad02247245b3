"""PFB, CAM, IE, GB and the automatic mask on the tiny preset: each shown by its effect."""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from tests.conftest import gradient_image
from xmgie.editing.attention import CrossAttentionControl, edit_processors_installed
from xmgie.editing.blur import DEFAULT_SIGMA_MAX, resize_mask
from xmgie.editing.images import mask_to_tensor
from xmgie.editing.masks import estimate_edit_masks, mask_pyramid, threshold_difference_map
from xmgie.editing.options import CAMOptions, PFBOptions
from xmgie.editing.pipeline import XMGIEPipeline

SIZE = (128, 96)
OFF = {"pfb": False, "cam": False, "ie": False, "gb": False, "auto_mask": False}


def box_mask(size=SIZE, box=(40, 24, 96, 72)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


@pytest.fixture(scope="module")
def conditioning(tiny_pipe):
    """Image latents and edit/null conditioning of one item, as the pipeline makes them."""
    image = gradient_image(*SIZE)
    prompt, negative, _ = tiny_pipe.encode_instructions([image], ["put a red hat on it"], 96, {})
    with torch.no_grad():
        latents = tiny_pipe.prepare_image_latents(tiny_pipe.image_processor.preprocess(image))
    return image, latents, prompt, negative


def run(pipe, image, mask=None, seed=5, steps=4, instruction="put a red hat on it", **options):
    return pipe(
        image,
        instruction,
        mask=mask,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        **options,
    )


def far_outside(mask: Image.Image, distance: float) -> np.ndarray:
    outside = np.asarray(mask) < 128
    return ndimage.distance_transform_edt(outside) > distance


def test_all_switches_off_is_the_foundation_output_bit_for_bit(tiny_pipe, conditioning):
    image, latents, prompt, negative = conditioning
    out = run(tiny_pipe, image, mask=box_mask(), **OFF)
    with torch.no_grad():
        plain = tiny_pipe.denoise(
            latents, prompt, negative, num_inference_steps=4, generator=torch.Generator().manual_seed(5)
        )
    expected = tiny_pipe.decode_latents(plain)[0]
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(expected))
    assert out.identity_scores == [None]


def test_pfb_and_gb_keep_pixels_far_outside_the_mask_exactly(tiny_pipe):
    image, mask = gradient_image(*SIZE), box_mask()
    source = np.asarray(image)
    far = far_outside(mask, 3 * DEFAULT_SIGMA_MAX)
    inside = np.asarray(mask) > 128

    edited = np.asarray(run(tiny_pipe, image, mask=mask, cam=False, ie=False).images[0])
    assert np.array_equal(edited[far], source[far])
    assert np.abs(edited[inside].astype(int) - source[inside]).mean() > 5

    plain = np.asarray(run(tiny_pipe, image, mask=mask, **OFF).images[0])
    assert np.abs(plain[far].astype(int) - source[far]).mean() > 5


def test_latents_outside_the_mask_track_the_reference_during_blended_steps(tiny_pipe, conditioning):
    image, latents, prompt, negative = conditioning
    edit_masks = mask_to_tensor(box_mask())[None]
    steps, seen = 6, []

    def record(pipe, step, timestep, kwargs):
        seen.append(kwargs["latents"].clone())
        return {}

    with torch.no_grad():
        tiny_pipe.denoise(
            latents,
            prompt,
            negative,
            num_inference_steps=steps,
            edit_masks=edit_masks,
            pfb=PFBOptions(latent_blend_fraction=0.5),
            generator=torch.Generator().manual_seed(1),
            callback_on_step_end=record,
        )
    reference = tiny_pipe.reference_latents
    outside = resize_mask(edit_masks, tuple(latents.shape[-2:])) == 0
    outside = outside.expand_as(seen[0])
    assert outside.any()
    for step in range(steps // 2):
        torch.testing.assert_close(seen[step][outside], reference[step + 1][outside], atol=0, rtol=0)
    assert not torch.allclose(seen[-2][outside], reference[steps - 1][outside])


@pytest.mark.parametrize("reference", ["noise", "inversion"])
def test_pfb_in_one_batched_call_equals_a_separate_reference_call(tiny_pipe, conditioning, reference):
    # In float64, so that what is compared is the algorithm, not float32 kernels that round differently
    # for a batch of 3 rows than for a batch of 4.
    image, latents, prompt, negative = conditioning
    pipe = XMGIEPipeline(
        **{
            **tiny_pipe.components,
            "unet": copy.deepcopy(tiny_pipe.unet).double(),
            "identity_adapter": copy.deepcopy(tiny_pipe.identity_adapter).double(),
        }
    )
    edit_masks = mask_to_tensor(box_mask())[None]
    tokens = pipe.identity_adapter.tokens(torch.randn(1, 32, dtype=torch.float64))
    results = {}
    for sequential in (False, True):
        results[sequential] = pipe.denoise(
            latents,
            prompt,
            negative,
            num_inference_steps=4,
            edit_masks=edit_masks,
            pfb=PFBOptions(reference=reference),
            cam=CAMOptions(),
            pfb_sequential=sequential,
            identity_tokens=tokens,
            identity_scale=0.5,
            generator=torch.Generator().manual_seed(2),
        )
    assert (results[False] - results[True]).abs().max() <= 1e-4
    unblended = pipe.denoise(
        latents, prompt, negative, num_inference_steps=4, generator=torch.Generator().manual_seed(2)
    )
    assert not torch.allclose(unblended, results[False], atol=1e-3)


def test_cam_hard_zeroes_attention_to_the_edit_conditioning_outside_the_mask(tiny_pipe, conditioning):
    image, latents, prompt, negative = conditioning
    edit_masks = mask_to_tensor(box_mask())[None]
    for enabled in (True, False):
        with torch.no_grad():
            tiny_pipe.denoise(
                latents,
                prompt,
                negative,
                num_inference_steps=2,
                edit_masks=edit_masks,
                cam=CAMOptions(enabled=enabled),
                capture_attention=True,
                generator=torch.Generator().manual_seed(0),
            )
        records = tiny_pipe.attention_records
        assert len(records) == sum(1 for n in tiny_pipe.unet.attn_processors if n.endswith("attn2.processor"))
        for name, calls in records.items():
            for record in calls:
                length = record.edit_probability.shape[2]
                mask = mask_pyramid(edit_masks, *latents.shape[-2:])[length]
                outside = (mask < 0.5)[:, None, :].expand(record.edit_probability.shape[:3])
                mass = record.edit_probability.sum(-1)
                if enabled:
                    if outside.any():
                        assert mass[outside].abs().max() == 0, name
                    assert (mass[~outside] > 0.99).all(), name
                else:
                    assert (mass > 0.99).all(), name


def test_identity_scale_zero_is_exactly_no_ie_and_nonzero_changes_the_output(tiny_pipe):
    image, mask = gradient_image(*SIZE), box_mask()
    base = {"mask": mask, "pfb": False, "cam": False, "gb": False}
    without = np.asarray(run(tiny_pipe, image, ie=False, **base).images[0])
    zero = run(tiny_pipe, image, ie={"scale": 0.0}, **base)
    strong = run(tiny_pipe, image, ie={"scale": 2.0}, **base)
    assert np.array_equal(np.asarray(zero.images[0]), without)
    assert not np.array_equal(np.asarray(strong.images[0]), without)
    assert -1.0 <= strong.identity_scores[0] <= 1.0


def test_identity_branch_acts_only_inside_its_region(tiny_pipe, conditioning):
    image, latents, prompt, negative = conditioning
    region = mask_to_tensor(box_mask())[None]
    tokens = tiny_pipe.identity_adapter.tokens(torch.randn(1, 32))
    with torch.no_grad():
        tiny_pipe.denoise(
            latents,
            prompt,
            negative,
            num_inference_steps=2,
            identity_tokens=tokens,
            identity_scale=1.0,
            identity_regions=region,
            capture_attention=True,
            generator=torch.Generator().manual_seed(0),
        )
    records = tiny_pipe.attention_records
    assert records
    for name, calls in records.items():
        for record in calls:
            output = record.identity_output
            region_flat = mask_pyramid(region, *latents.shape[-2:])[output.shape[1]]
            outside = (region_flat == 0).repeat(output.shape[0] // region_flat.shape[0], 1)
            inside = region_flat.repeat(output.shape[0] // region_flat.shape[0], 1) == 1
            if outside.any():
                assert output[outside].abs().max() == 0, name
            if inside.any():
                assert output[inside].abs().max() > 0, name


DRAWS = 8


@contextmanager
def conditioning_confined_to(pipe, known: torch.Tensor, draws: int = DRAWS):
    """The controlled local setting: while the automatic mask draws (one item, ``2·draws`` rows in one UNet call),
    hard cross-attention masking confines the edit conditioning to the ``known`` (1, 1, h, w) latent region."""
    control = CrossAttentionControl(
        batch_size=draws, num_branches=2, edit_masks=mask_pyramid(known.repeat(draws, 1, 1, 1), *known.shape[-2:])
    )
    with edit_processors_installed(pipe.unet, control):
        yield


def known_latent_box(latents: torch.Tensor) -> torch.Tensor:
    return (resize_mask(mask_to_tensor(box_mask())[None], tuple(latents.shape[-2:])) >= 0.5).float()


def estimate(pipe, latents, prompt, negative, **options):
    return estimate_edit_masks(
        pipe.unet,
        pipe.scheduler,
        latents,
        prompt,
        negative,
        latent_scale=pipe.vae.config.scaling_factor,
        draws=options.pop("draws", DRAWS),
        generator=torch.Generator().manual_seed(0),
        **options,
    )


def test_automatic_mask_finds_where_the_edit_conditioning_can_act(tiny_pipe, conditioning):
    image, latents, prompt, negative = conditioning
    known = known_latent_box(latents)
    with conditioning_confined_to(tiny_pipe, known):
        estimated = estimate(tiny_pipe, latents, prompt, negative).masks
    estimated, known = estimated[0, 0] > 0.5, known[0, 0] > 0.5
    iou = (estimated & known).sum() / (estimated | known).sum()
    assert iou >= 0.7, float(iou)


def test_automatic_mask_can_be_empty_partial_or_full(tiny_pipe, conditioning):
    image, latents, prompt, negative = conditioning
    # Empty: the edit conditioning is the null conditioning, so it changes the prediction nowhere.
    empty = estimate(tiny_pipe, latents, negative, negative)
    # Partial: the conditioning can act only inside a box.
    with conditioning_confined_to(tiny_pipe, known_latent_box(latents)):
        partial = estimate(tiny_pipe, latents, prompt, negative)
    # Full: unconstrained, the conditioning acts about equally everywhere (a flat difference map).
    full = estimate(tiny_pipe, latents, prompt, negative)
    assert empty.fractions() == [0.0]
    assert 0.1 < partial.fractions()[0] < 0.5
    assert full.fractions() == [1.0]
    assert full.spread[0] < 0.35 < partial.spread[0]


def test_automatic_mask_in_chunks_equals_one_call(tiny_pipe, conditioning):
    image, latents, prompt, negative = conditioning
    other = tiny_pipe.prepare_image_latents(tiny_pipe.image_processor.preprocess(gradient_image(*SIZE, 2.0)))
    batch = (torch.cat([latents, other]), prompt.repeat(2, 1, 1), negative.repeat(2, 1, 1))
    # A flat map is full whatever its details; min_spread 0 keeps the relative threshold in play.
    one_call = estimate(tiny_pipe, *batch, draws=4, chunk=16, min_spread=0.0)
    chunked = estimate(tiny_pipe, *batch, draws=4, chunk=3, min_spread=0.0)
    torch.testing.assert_close(chunked.difference, one_call.difference, atol=1e-5, rtol=1e-5)
    assert torch.equal(chunked.masks, one_call.masks)
    assert 0.0 < one_call.fractions()[0] < 1.0


def box_iou(mask: np.ndarray, box: np.ndarray) -> float:
    return float((mask & box).sum() / max((mask | box).sum(), 1))


def test_an_absolute_level_calls_an_uneven_global_edit_global_and_still_finds_a_local_one():
    rows, cols = np.mgrid[0:32, 0:32]
    box = (abs(rows - 16) < 6) & (abs(cols - 12) < 6)
    # A global edit of uneven strength (a brightening acts more on the dark half): above the level everywhere.
    uneven = torch.from_numpy(np.where(cols < 16, 0.2, 0.05) + 0.002 * rows)
    # A local edit: a strong difference inside the box over the model's small residual elsewhere.
    local = torch.from_numpy(np.where(box, 0.15, 0.01) + 0.0005 * rows)
    relative, _ = threshold_difference_map(uneven)
    assert 0.0 < relative.mean() < 0.6  # DiffEdit's rule, relative to the mean, makes a blob of it
    absolute, _ = threshold_difference_map(uneven, level=0.03)
    assert absolute.all()
    found, _ = threshold_difference_map(local, level=0.03)
    assert box_iou(found, box) == 1.0
    nothing, _ = threshold_difference_map(local, level=0.5)
    assert not nothing.any()  # nothing changes enough: an empty mask, a global edit in the pipeline


def test_smoothing_the_map_keeps_pixel_noise_out_of_the_mask():
    rows, cols = np.mgrid[0:32, 0:32]
    box = (abs(rows - 16) < 6) & (abs(cols - 12) < 6)
    noise = np.random.default_rng(0).normal(0.0, 0.012, (32, 32))
    local = torch.from_numpy(np.where(box, 0.05, 0.015) + noise)
    speckled, _ = threshold_difference_map(local, level=0.03)
    smoothed, _ = threshold_difference_map(local, level=0.03, smoothing=1.5)
    assert box_iou(speckled, box) < 0.7
    assert box_iou(smoothed, box) >= 0.85


def test_the_map_is_in_noise_units_whatever_the_model_predicts(tiny_pipe, conditioning):
    from diffusers import EulerAncestralDiscreteScheduler

    image, latents, prompt, negative = conditioning
    as_epsilon = estimate(tiny_pipe, latents, prompt, negative, draws=2, strength=0.7)
    velocity = EulerAncestralDiscreteScheduler.from_config(tiny_pipe.scheduler.config, prediction_type="v_prediction")
    as_velocity = estimate_edit_masks(
        tiny_pipe.unet,
        velocity,
        latents,
        prompt,
        negative,
        latent_scale=tiny_pipe.vae.config.scaling_factor,
        draws=2,
        strength=0.7,
        generator=torch.Generator().manual_seed(0),
    )
    # Read as v, the same outputs imply the noise difference √ᾱ·(v_edit − v_null): the map is scaled by √ᾱ.
    alpha = velocity.alphas_cumprod[int(round(0.7 * (len(velocity.alphas_cumprod) - 1)))]
    torch.testing.assert_close(as_velocity.difference, alpha.sqrt() * as_epsilon.difference, rtol=1e-4, atol=1e-6)


def test_automatic_mask_is_upsampled_smoothly(tiny_pipe):
    latent = torch.zeros(1, 12, 16)
    for row in range(12):
        latent[0, row, : row + 2] = 1.0  # a staircase edge
    values = np.asarray(tiny_pipe.item_masks([None], [latent], [SIZE])[0])
    assert set(np.unique(values)) <= {0, 255}
    mask = values > 127
    blocks = mask.reshape(12, 8, 16, 8).transpose(0, 2, 1, 3).reshape(12, 16, 64)
    mixed = (blocks.any(axis=-1) & ~blocks.all(axis=-1)).sum()
    assert mixed >= 10  # the outline cuts through latent pixels instead of following their 8-pixel blocks


def test_a_global_instruction_without_a_mask_edits_the_whole_image(tiny_pipe):
    image = gradient_image(*SIZE)
    source = np.asarray(image).astype(int)

    def changed(out) -> float:
        return float((np.abs(np.asarray(out.images[0]).astype(int) - source).max(axis=-1) > 0).mean())

    # The tiny model's conditioning acts everywhere: the automatic estimate is flat, so the edit is global.
    edited = run(tiny_pipe, image, instruction="make it look like a watercolor painting")
    assert edited.edit_scopes == ["global"] and edited.mask_fractions == [1.0]
    assert edited.masks == [None] and edited.preservation == [None]
    assert changed(edited) >= 0.9
    # Always confining the edit to the thresholded blob (the former behaviour) keeps most of the source.
    blob = run(
        tiny_pipe,
        image,
        instruction="make it look like a watercolor painting",
        auto_mask={"mode": "always", "min_spread": 0.0},
    )
    assert blob.edit_scopes == ["local"] and 0.0 < blob.mask_fractions[0] < 0.5
    assert changed(blob) < 0.9


def test_the_estimated_local_edit_says_local(tiny_pipe, conditioning):
    image, latents, prompt, negative = conditioning
    with conditioning_confined_to(tiny_pipe, known_latent_box(latents)):
        out = run(tiny_pipe, image, auto_mask={"draws": DRAWS, "chunk": 2 * DRAWS})
    assert out.edit_scopes == ["local"]
    estimated, known = np.asarray(out.masks[0]) > 127, np.asarray(box_mask()) > 127
    assert out.mask_fractions[0] == pytest.approx(estimated.mean())
    assert (estimated & known).sum() / (estimated | known).sum() >= 0.7
    far = far_outside(out.masks[0], 3 * DEFAULT_SIGMA_MAX)
    assert np.array_equal(np.asarray(out.images[0])[far], np.asarray(image)[far])


def test_auto_mask_off_makes_an_unmasked_edit_global_and_a_masked_one_local(tiny_pipe):
    image = gradient_image(*SIZE)
    out = tiny_pipe(
        [image, image],
        ["add a hat", "add a hat"],
        mask=[None, box_mask()],
        num_inference_steps=2,
        generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
        auto_mask={"mode": "off"},
        ie=False,
    )
    assert out.edit_scopes == ["global", "local"]
    assert out.mask_fractions[0] == 1.0
    assert out.mask_fractions[1] == pytest.approx((np.asarray(box_mask()) > 127).mean())
    assert "auto_mask" not in out.timings


def test_without_a_mask_the_automatic_mask_is_used_and_returned(tiny_pipe):
    image = gradient_image(*SIZE)
    out = run(tiny_pipe, image, ie=False, auto_mask={"mode": "always"})
    mask = out.masks[0]
    assert mask is not None and mask.size == image.size and mask.mode == "L"
    values = np.asarray(mask)
    assert set(np.unique(values)) <= {0, 255}
    assert out.preservation[0] is not None
    off = run(tiny_pipe, image, **OFF)
    assert off.masks == [None] and off.preservation == [None]


def test_an_item_without_a_mask_does_not_switch_off_its_neighbours_extensions(tiny_pipe):
    images = [gradient_image(*SIZE, 0.0), gradient_image(*SIZE, 2.0)]
    out = tiny_pipe(
        images,
        ["add a hat", "add a hat"],
        mask=[box_mask(), None],
        num_inference_steps=3,
        generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
        auto_mask=False,
        ie=False,
    )
    far = far_outside(box_mask(), 3 * DEFAULT_SIGMA_MAX)
    assert np.array_equal(np.asarray(out.images[0])[far], np.asarray(images[0])[far])
    assert out.masks[1] is None and out.preservation[1] is None
    assert out.preservation[0] is not None


def test_cam_restricts_token_ranges_of_a_clip_text_prompt(tiny_pipe):
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from xmgie.editing.attention import text_cross_attention_masking

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
        )
    ).eval()
    with torch.no_grad():
        prompt = text_encoder(torch.arange(77)[None] % 99).last_hidden_state
        negative = text_encoder(torch.zeros(1, 77, dtype=torch.long)).last_hidden_state
    ip2p = StableDiffusionInstructPix2PixPipeline(
        vae=tiny_pipe.vae,
        text_encoder=None,
        tokenizer=None,
        unet=tiny_pipe.unet,
        scheduler=tiny_pipe.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    image = gradient_image(*SIZE)
    masks = mask_to_tensor(box_mask())[None]
    latent_size = (SIZE[1] // 8, SIZE[0] // 8)
    with text_cross_attention_masking(
        ip2p, masks, latent_size, token_ranges=[(1, 4, "inside"), (4, 6, "outside")], mode=None, capture=True
    ) as control:
        ip2p(
            image=image,
            prompt_embeds=prompt,
            negative_prompt_embeds=negative,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        )
    assert len(control.records) == 10
    for name, calls in control.records.items():
        for record in calls:
            probability = record.edit_probability[0]  # (heads, positions, tokens)
            inside = mask_pyramid((masks >= 0.5).float(), *latent_size)[probability.shape[1]][0] >= 0.5
            if (~inside).any():
                assert probability[:, ~inside, 1:4].abs().max() == 0, name
                assert probability[:, ~inside, 4:6].min() > 0, name
            if inside.any():
                assert probability[:, inside, 4:6].abs().max() == 0, name
                assert probability[:, inside, 1:4].min() > 0, name
            assert probability[:, :, 6:].min() > 0, name
    # The processors are removed on leaving the block.
    assert not any(type(p).__name__ == "EditCrossAttnProcessor" for p in tiny_pipe.unet.attn_processors.values())


def test_identity_reference_image_is_used_and_required(tiny_pipe):
    from xmgie.editing.errors import EditInputError

    image, mask = gradient_image(*SIZE), box_mask()
    base = {"mask": mask, "pfb": False, "cam": False, "gb": False}
    with pytest.raises(EditInputError) as error:
        run(tiny_pipe, image, ie={"reference": "image", "scale": 1.0}, **base)
    assert error.value.code == "missing_identity_image"
    own = np.asarray(run(tiny_pipe, image, ie={"scale": 1.0}, **base).images[0])
    other = run(
        tiny_pipe,
        image,
        ie={"reference": "image", "scale": 1.0},
        identity_image=Image.new("RGB", (40, 40), (250, 10, 10)),
        **base,
    )
    assert not np.array_equal(np.asarray(other.images[0]), own)


def test_cam_without_guidance_gives_the_outside_the_null_conditioning(tiny_pipe, conditioning):
    # With guidance_scale 1 there is one branch; where the mask is empty CAM must act as the null conditioning,
    # so a mask with no edit region gives exactly the denoising conditioned on the null conditioning.
    image, latents, prompt, negative = conditioning
    empty = torch.zeros(1, 1, *latents.shape[-2:])
    common = dict(num_inference_steps=3, guidance_scale=1.0)
    with torch.no_grad():
        masked = tiny_pipe.denoise(
            latents,
            prompt,
            negative,
            edit_masks=empty,
            cam=CAMOptions(),
            generator=torch.Generator().manual_seed(4),
            **common,
        )
        null = tiny_pipe.denoise(latents, negative, negative, generator=torch.Generator().manual_seed(4), **common)
        edit = tiny_pipe.denoise(latents, prompt, negative, generator=torch.Generator().manual_seed(4), **common)
    torch.testing.assert_close(masked, null, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(edit, null, atol=1e-3)


def test_cam_attends_to_the_null_conditioning_only_for_rows_whose_mask_is_not_full(tiny_pipe, conditioning):
    # A batch that masks some items and not others (a training batch with masked attention): rows with a full
    # mask skip the null conditioning's projections and attention, and come out as when every row computes it.
    image, latents, prompt, negative = conditioning
    unet, rows, size = tiny_pipe.unet, 3, latents.shape[-2:]
    noisy = torch.randn(rows, *latents.shape[1:], generator=torch.Generator().manual_seed(2))
    model_input = torch.cat([noisy, latents.repeat(rows, 1, 1, 1)], dim=1)
    masks = torch.ones(rows, 1, *size)
    masks[0, :, : size[0] // 2] = 0  # a region: the top half is outside
    masks[2] = 0  # an empty region: the null conditioning everywhere
    layers = [module for name, module in unet.named_modules() if name.endswith("attn2")]

    def forward(control: CrossAttentionControl | None) -> tuple[torch.Tensor, list[int]]:
        projected: list[int] = []
        hooks = [
            layer.to_k.register_forward_hook(lambda module, args, output: projected.append(args[0].shape[0]))
            for layer in layers
        ]
        try:
            with torch.no_grad(), edit_processors_installed(unet, control) if control else nullcontext():
                out = unet(model_input, torch.full((rows,), 500), prompt.repeat(rows, 1, 1), return_dict=False)[0]
        finally:
            for hook in hooks:
                hook.remove()
        return out, projected

    def cam(edit_masks: torch.Tensor, capture: bool = False) -> CrossAttentionControl:
        control = CrossAttentionControl(batch_size=rows, num_branches=1, capture=capture)
        control.edit_masks = mask_pyramid(edit_masks, *size)
        control.null_conditioning = negative.repeat(rows, 1, 1)
        return control

    skipping, skipping_rows = forward(cam(masks))
    every, every_rows = forward(cam(masks, capture=True))  # captured attention needs every row's null branch
    torch.testing.assert_close(skipping, every, rtol=0, atol=1e-6)
    # Per layer: the conditioning's keys for the 3 rows, then the null conditioning's for the masked rows only.
    assert skipping_rows == [rows, 2] * len(layers)
    assert every_rows == [rows, rows] * len(layers)
    unmasked, _ = forward(cam(torch.ones(rows, 1, *size)))
    plain, _ = forward(None)
    torch.testing.assert_close(unmasked, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(skipping[1], unmasked[1], rtol=0, atol=1e-6)


def test_latents_stay_float32_between_steps_with_a_bfloat16_unet(tiny_pipe, conditioning):
    image, latents, prompt, negative = conditioning
    bf16 = XMGIEPipeline(**{**tiny_pipe.components, "unet": copy.deepcopy(tiny_pipe.unet).to(torch.bfloat16)})
    seen = []

    def record(pipe, step, timestep, kwargs):
        seen.append(kwargs["latents"].dtype)
        return {}

    edit_masks = mask_to_tensor(box_mask())[None]
    results = {}
    for name, pipe in (("float32", tiny_pipe), ("bfloat16", bf16)):
        with torch.no_grad():
            results[name] = pipe.denoise(
                latents,
                prompt,
                negative,
                num_inference_steps=4,
                edit_masks=edit_masks,
                pfb=PFBOptions(),
                cam=CAMOptions(),
                generator=torch.Generator().manual_seed(7),
                callback_on_step_end=record if pipe is bf16 else None,
            )
    assert seen == [torch.float32] * 4
    assert results["bfloat16"].dtype == torch.float32
    scale = results["float32"].abs().max()
    assert (results["bfloat16"] - results["float32"]).abs().max() <= 0.05 * scale


def blended_run(pipe, conditioning, pfb: PFBOptions, latent_side: int = 64):
    """One denoising step on a ``latent_side``² latent (64: a 512-pixel image); what PFB blended, and where."""
    _, _, prompt, negative = conditioning
    image_latents = torch.randn(1, 4, latent_side, latent_side, generator=torch.Generator().manual_seed(0))
    edit_masks = torch.zeros(1, 1, latent_side, latent_side)
    edit_masks[..., latent_side // 4 : latent_side // 2, latent_side // 4 : latent_side // 2] = 1
    rows = {}

    def count_rows(name):
        def hook(module, inputs, output):
            rows.setdefault(name, output.shape[0])

        return hook

    hooks = [
        pipe.unet.up_blocks[1].upsamplers[0].register_forward_hook(count_rows("up_blocks.1.upsamplers.0")),
        pipe.unet.up_blocks[2].register_forward_hook(count_rows("up_blocks.2")),
    ]
    try:
        with torch.no_grad():
            pipe.denoise(
                image_latents,
                prompt,
                negative,
                num_inference_steps=1,
                edit_masks=edit_masks,
                pfb=pfb,
                generator=torch.Generator().manual_seed(0),
            )
    finally:
        for hook in hooks:
            hook.remove()
    return pipe.pfb_blended_sizes, rows


def test_pfb_blends_the_encoder_middle_and_decoder_at_1_4_and_1_8_of_the_latent(tiny_pipe, conditioning):
    sizes, rows = blended_run(tiny_pipe, conditioning, PFBOptions())
    # 512-pixel image: 64×64 latent; the default levels are its 16×16 and 8×8 resolutions, as documented.
    assert set(sizes.values()) == {(16, 16), (8, 8)}
    assert {name.rsplit(".", 2)[0] for name in sizes} == {
        "down_blocks.2",
        "down_blocks.3",
        "mid_block",
        "up_blocks.0",
        "up_blocks.1",
    }
    assert sizes["down_blocks.2.attentions.0"] == (16, 16) and sizes["up_blocks.1.attentions.0"] == (16, 16)
    assert sizes["mid_block"] == sizes["up_blocks.0.resnets.0"] == (8, 8)
    # The reference rows (one of four) are dropped before the last blended level's upsampler.
    assert rows == {"up_blocks.1.upsamplers.0": 3, "up_blocks.2": 3}

    sizes, _ = blended_run(tiny_pipe, conditioning, PFBOptions(levels=("1/2",)))
    assert set(sizes.values()) == {(32, 32)}
    # Whole blocks: an up block's output comes after its upsampler.
    sizes, _ = blended_run(tiny_pipe, conditioning, PFBOptions(blocks=("mid_block", "up_blocks.0", "up_blocks.1")))
    assert sizes == {"mid_block": (8, 8), "up_blocks.0": (16, 16), "up_blocks.1": (32, 32)}


def test_inversion_start_samples_from_the_inverted_latent(tiny_pipe, conditioning):
    image, latents, prompt, negative = conditioning
    edit_masks = mask_to_tensor(box_mask())[None]

    def denoise(reference, **kwargs):
        with torch.no_grad():
            return tiny_pipe.denoise(
                latents,
                prompt,
                negative,
                num_inference_steps=3,
                edit_masks=edit_masks,
                pfb=PFBOptions(reference=reference),
                generator=torch.Generator().manual_seed(3),
                **kwargs,
            )

    started = denoise("inversion_start")
    inverted = tiny_pipe.reference_latents[0]
    assert torch.equal(started, denoise("inversion", latents=inverted.clone()))
    assert not torch.allclose(started, denoise("inversion"), atol=1e-3)


def test_gb_feather_scales_with_the_input_size_and_is_computed_once(tiny_pipe, monkeypatch):
    from xmgie.editing import pipeline as pipeline_module
    from xmgie.editing.options import GBOptions

    working = (64, 64)
    bands, working_masks = {}, {}
    for side in (256, 512):
        mask = Image.new("L", (side, side), 0)
        mask.paste(255, (side // 4, side // 4, 3 * side // 4, 3 * side // 4))
        at_working, at_input = tiny_pipe.soft_masks([mask], working, GBOptions())
        row = at_input[0][side // 2]
        bands[side] = int(((row > 0.01) & (row < 0.99)).sum())
        working_masks[side] = at_working
    # Twice the input size, twice the feather in input pixels: the same share of the picture.
    assert bands[256] >= 20
    assert abs(bands[512] - 2 * bands[256]) <= 4
    torch.testing.assert_close(working_masks[256], working_masks[512], atol=0.02, rtol=0)

    calls = []
    soften = pipeline_module.soften_mask
    monkeypatch.setattr(pipeline_module, "soften_mask", lambda *a, **k: calls.append(1) or soften(*a, **k))
    image = gradient_image(256, 192)
    mask = box_mask((256, 192), (80, 48, 192, 144))
    run(tiny_pipe, image, mask=mask, steps=2, ie=False, max_side=128)
    assert len(calls) == 1
