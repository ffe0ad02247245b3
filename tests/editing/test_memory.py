"""Memory at real size, shown on the tiny preset: VAE slicing and tiling, model and MLLM offload."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate.hooks import CpuOffload
from diffusers import AutoencoderKL
from PIL import Image

from tests.conftest import gradient_image
from xmgie.editing.pipeline import XMGIEPipeline
from xmgie.loading.directory import load_pipeline

SIZE = (64, 48)


def box_mask(size=SIZE, box=(16, 12, 48, 36)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


@pytest.fixture
def fresh_pipe(tiny_dir, model_cache) -> XMGIEPipeline:
    """A pipeline of its own: offload hooks attach to the modules, so the shared one must not get them."""
    return load_pipeline(tiny_dir, cache_dir=model_cache, device="cpu", dtype=torch.float32)


def edit_with_every_extension(pipe: XMGIEPipeline):
    """An edit with a user mask, PFB, CAM, IE and GB on (IE restricted to outside the mask)."""
    return pipe(
        gradient_image(*SIZE),
        "put a red hat on it",
        mask=box_mask(),
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(1),
        ie={"enabled": True, "scale": 0.5, "region": "outside_mask"},
        max_new_tokens=9,
    )


def assert_same_picture(image, reference) -> None:
    """Equal but for float rounding: moving modules between hooks may reorder a reduction, which can flip a
    pixel by one level (seen on 0.01 % of the pixels)."""
    difference = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(reference, dtype=np.int16))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.001


@pytest.fixture(scope="module")
def plain_edit(tiny_pipe):
    """The edit without any offload, for comparison."""
    return edit_with_every_extension(tiny_pipe)


class CallCounter:
    """Forward-hook record of the input shapes a module saw."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.handle = module.register_forward_pre_hook(lambda _module, args: self.shapes.append(tuple(args[0].shape)))


# ---------------------------------------------------------------------------------------------------- VAE


def test_vae_slices_equal_the_whole_batch(fresh_pipe):
    pipe = fresh_pipe
    pixels = torch.cat([pipe.image_processor.preprocess(gradient_image(*SIZE, phase=p)) for p in (0.0, 0.7, 1.9)])
    encoder = CallCounter(pipe.vae.encoder)
    decoder = CallCounter(pipe.vae.decoder)

    pipe.vae_slice_size = 3
    whole_latents = pipe.prepare_image_latents(pixels)
    whole_images = pipe.decode_latents(whole_latents * pipe.vae.config.scaling_factor)
    pipe.vae_slice_size = 1
    sliced_latents = pipe.prepare_image_latents(pixels)
    sliced_images = pipe.decode_latents(whole_latents * pipe.vae.config.scaling_factor)

    # One call for the whole batch, then one call per item.
    assert [shape[0] for shape in encoder.shapes] == [3, 1, 1, 1]
    assert [shape[0] for shape in decoder.shapes] == [3, 1, 1, 1]
    torch.testing.assert_close(sliced_latents, whole_latents, atol=1e-5, rtol=1e-5)
    for sliced, whole in zip(sliced_images, whole_images, strict=True):
        difference = np.abs(np.asarray(sliced, dtype=np.int16) - np.asarray(whole, dtype=np.int16))
        assert difference.max() <= 1  # uint8 rounding of float-identical images


def test_vae_tiles_above_the_threshold(fresh_pipe):
    pipe = fresh_pipe
    tile = pipe.vae.tile_sample_min_size  # 64 px for the tiny VAE, 512 for SD 1.5's
    pixels = pipe.image_processor.preprocess(gradient_image(112, 80))
    encoder = CallCounter(pipe.vae.encoder)
    decoder = CallCounter(pipe.vae.decoder)

    pipe.vae_tile_above = 112  # the long side is not above it: one piece
    latents = pipe.prepare_image_latents(pixels)
    pipe.decode_latents(latents)
    assert encoder.shapes == [(1, 3, 80, 112)]
    assert decoder.shapes == [(1, 4, 10, 14)]

    encoder.shapes.clear()
    decoder.shapes.clear()
    pipe.vae_tile_above = 111
    tiled_latents = pipe.prepare_image_latents(pixels)
    decoded = pipe.decode_latents(latents)
    assert not pipe.vae.use_tiling  # restored after the call
    assert tiled_latents.shape == latents.shape and decoded[0].size == (112, 80)
    # Tiles of at most ``tile`` pixels (``tile / 8`` latent pixels), overlapping by a quarter, cover the image.
    stride, latent_stride = int(tile * 0.75), int(tile // 8 * 0.75)
    assert len(encoder.shapes) == len(range(0, 80, stride)) * len(range(0, 112, stride)) > 1
    assert len(decoder.shapes) == len(range(0, 10, latent_stride)) * len(range(0, 14, latent_stride))
    assert all(max(shape[-2:]) <= tile for shape in encoder.shapes)
    assert all(max(shape[-2:]) <= tile // 8 for shape in decoder.shapes)


class PixelNorm(torch.nn.Module):
    """Normalisation over the channels of each pixel (GroupNorm's statistics span the whole image or tile)."""

    def __init__(self, norm: torch.nn.GroupNorm) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - x.mean(1, keepdim=True)) / (x.var(1, keepdim=True, unbiased=False) + self.eps).sqrt()
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def pixelwise_vae(vae: AutoencoderKL) -> AutoencoderKL:
    """A copy of ``vae`` whose output at a pixel depends on that pixel's neighbourhood only (a VAE that tiles
    exactly): 3×3 kernels keep their centre, norms act per pixel, no attention."""
    local = AutoencoderKL.from_config({**vae.config, "mid_block_add_attention": False})
    local.load_state_dict(vae.state_dict(), strict=False)
    with torch.no_grad():
        for name, module in list(local.named_modules()):
            if isinstance(module, torch.nn.Conv2d) and module.kernel_size == (3, 3):
                centre = module.weight[:, :, 1, 1].clone()
                module.weight.zero_()
                module.weight[:, :, 1, 1] = centre
            elif isinstance(module, torch.nn.GroupNorm):
                parent, _, child = name.rpartition(".")
                setattr(local.get_submodule(parent), child, PixelNorm(module))
    return local.eval()


def test_tiled_vae_equals_untiled_for_a_vae_that_tiles_exactly(fresh_pipe):
    # Random VAEs are far from tile-local (GroupNorm's statistics, attention, a receptive field wider than a 64-px
    # tile), so the tiny preset's tiled output differs from its untiled one; this VAE is local, so any difference
    # comes from how the tiles are cut, placed and blended back.
    pipe = XMGIEPipeline(**{**fresh_pipe.components, "vae": pixelwise_vae(fresh_pipe.vae)})
    pixels = pipe.image_processor.preprocess(gradient_image(112, 80))
    decoder = CallCounter(pipe.vae.decoder)
    latents = pipe.prepare_image_latents(pixels)
    untiled = np.asarray(pipe.decode_latents(latents)[0], dtype=np.int16)
    pipe.vae_tile_above = 64
    tiled_latents = pipe.prepare_image_latents(pixels)
    tiled = np.asarray(pipe.decode_latents(latents)[0], dtype=np.int16)
    assert len(decoder.shapes) == 1 + 6  # untiled, then 2×3 tiles
    assert latents.std() > 0.1 and untiled.std() > 5  # not a flat picture
    torch.testing.assert_close(tiled_latents, latents, atol=1e-4, rtol=1e-4)
    assert np.abs(tiled - untiled).max() <= 1


# ---------------------------------------------------------------------------------------------------- model offload


def weight_holding_components(pipe: XMGIEPipeline) -> dict[str, torch.nn.Module]:
    return {
        name: component
        for name, component in pipe.components.items()
        if isinstance(component, torch.nn.Module) and any(True for _ in component.parameters())
    }


def test_model_offload_sequence_covers_every_component_holding_weights(fresh_pipe):
    pipe = fresh_pipe
    chain = pipe.model_cpu_offload_seq.split("->")
    components = weight_holding_components(pipe)
    assert {"image_encoder", "identity_adapter"} <= components.keys()
    assert sorted(components) == sorted(chain)

    pipe.enable_model_cpu_offload(device="cpu")
    for name, component in components.items():
        assert isinstance(getattr(component, "_hf_hook", None), CpuOffload), name
    # The chain links each component's hook to the previous one's, in the sequence's order.
    hooks = {name: components[name]._hf_hook for name in chain}
    for previous, current in zip(chain, chain[1:], strict=False):
        assert hooks[current].prev_module_hook.model is components[previous]


class OffloadTracker:
    """Emulates on the CPU what model offload does on an accelerator, and records every weight used while away.

    On an accelerator a component's hook loads it and unloads the previous component of the sequence; a weight used
    while its component is unloaded sits on the CPU beside inputs on the accelerator (a device error there). Here the
    hooks' loads are tracked and a forward pre-hook on every weight-holding submodule checks its component is loaded.
    """

    def __init__(self, pipe: XMGIEPipeline) -> None:
        self.loaded: set[str] = set()
        self.violations: list[str] = []
        self.loads: list[str] = []
        components = weight_holding_components(pipe)
        chain = [name for name in pipe.model_cpu_offload_seq.split("->") if name in components]
        for position, name in enumerate(chain):
            hook = components[name]._hf_hook
            hook.pre_forward = self._tracking(hook.pre_forward, name, chain[position - 1] if position else None)
        for name, component in components.items():
            for sub_name, module in component.named_modules():
                if sub_name and any(True for _ in module.parameters(recurse=False)):
                    module.register_forward_pre_hook(self._checking(name, sub_name))

    def _tracking(self, pre_forward, name: str, previous: str | None):
        def tracked(module, *args, **kwargs):
            self.loaded.discard(previous)
            self.loaded.add(name)
            self.loads.append(name)
            return pre_forward(module, *args, **kwargs)

        return tracked

    def _checking(self, name: str, sub_name: str):
        def check(_module, _args):
            if name not in self.loaded:
                self.violations.append(f"{name}.{sub_name}")

        return check


def test_model_offload_runs_every_weight_through_its_components_hook(fresh_pipe):
    pipe = fresh_pipe
    pipe.enable_model_cpu_offload(device="cpu")
    tracker = OffloadTracker(pipe)
    edit_with_every_extension(pipe)
    assert tracker.violations == []
    assert {"mllm", "edit_head", "image_encoder", "identity_adapter", "unet", "vae"} <= set(tracker.loads)


def test_an_edit_with_every_extension_under_model_offload_equals_the_plain_edit(fresh_pipe, plain_edit):
    expected = plain_edit
    fresh_pipe.enable_model_cpu_offload(device="cpu")
    out = edit_with_every_extension(fresh_pipe)
    assert out.expressive_instructions == expected.expressive_instructions
    assert all(score is not None for score in out.identity_scores)
    assert out.identity_scores == pytest.approx(expected.identity_scores, abs=1e-6)
    for image, reference in zip(out.images, expected.images, strict=True):
        assert_same_picture(image, reference)


# ---------------------------------------------------------------------------------------------------- MLLM offload


def test_mllm_offload_keeps_the_mllm_off_the_device_but_for_the_instruction_stage(fresh_pipe, plain_edit):
    pipe = fresh_pipe
    pipe.enable_mllm_offload("cpu")
    assert pipe._execution_device == torch.device("cpu")
    events: list[str] = []
    original_to = pipe.mllm.to

    def recording_to(*args, **kwargs):
        events.append(f"mllm to {args[0] if args else kwargs['device']}")
        return original_to(*args, **kwargs)

    pipe.mllm.to = recording_to
    pipe.mllm.register_forward_pre_hook(lambda *_: events.append("mllm"))
    pipe.unet.register_forward_pre_hook(lambda *_: events.append("unet"))
    out = edit_with_every_extension(pipe)

    # Moved to the execution device before generating, back to the CPU before any diffusion, never again.
    first_unet = events.index("unet")
    assert events[0] == "mllm to cpu" and events[1] == "mllm"
    assert events[first_unet - 1] == "mllm to cpu"
    assert set(events[1 : first_unet - 1]) == {"mllm"}
    assert set(events[first_unet:]) == {"unet"}
    for image, reference in zip(out.images, plain_edit.images, strict=True):
        assert_same_picture(image, reference)


def test_one_offload_mode_at_a_time(fresh_pipe):
    fresh_pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(ValueError, match="one offload mode"):
        fresh_pipe.enable_mllm_offload("cpu")
