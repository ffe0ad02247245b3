"""Per-stage timing of one MGIE edit: the ``tiny`` preset, or real-size models with random weights.

Default mode loads the ``tiny`` preset and edits ``examples/chelsea.png``; ``--real-shapes`` builds
SD 1.5 InstructPix2Pix (UNet, VAE), LLaVA-7B (CLIP ViT-L/14 vision tower) and IP-Adapter's image encoder
(OpenCLIP ViT-H/14) at their real sizes with random weights, directly on the device, so the timings and
memory are those of the released model without downloading anything.

``--real-shapes`` first prints the bytes each stage holds (weights under each offload mode, activations)
computed on the meta device: no weight is allocated, so it runs on any machine. Without ``--device``
(or with ``--device meta``) that table is all it prints; on CUDA the timed runs follow, with measured
peaks.

    python benchmarks/bench_edit.py --device cpu --steps 4 --size 128 --repeats 2
    python benchmarks/bench_edit.py --real-shapes                       # the memory table only
    python benchmarks/bench_edit.py --real-shapes --device cuda --batch 4 --json real.json
    # code-path smoke test only (the reduced models' figures mean nothing):
    python benchmarks/bench_edit.py --real-shapes --device cpu --llm-layers 1 --vision-layers 1 \
        --steps 1 --size 256 --max-new-tokens 10 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from xmgie.editing import mllm as mllm_stage
from xmgie.editing.edit_head import EditMapper
from xmgie.editing.identity import IdentityAdapter
from xmgie.editing.mllm import IMAGE_PATCH_TOKEN, MAX_NEW_TOKENS
from xmgie.editing.pipeline import XMGIEPipeline
from xmgie.loading.directory import component_bytes, load_pipeline
from xmgie.loading.tiny import IP2P_SCHEDULER_CONFIG, build_byte_tokenizer

STAGES = ("mllm", "edit_head", "vae_encode", "diffusion", "vae_decode")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "chelsea.png"
INSTRUCTION = "make the cat wear a red hat"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MIB = 2**20
GIB = 2**30
SD15_UNET_LAYOUT = {
    "in_channels": 8,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
"""SD 1.5's InstructPix2Pix UNet layout (8 input channels); channels and depth are chosen per use."""
SD15_UNET_CHANNELS = (320, 640, 1280, 1280)
SD15_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
    "layers_per_block": 2,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
"""SD 1.5's VAE."""
IP_ADAPTER_IMAGE_ENCODER = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 1024,
    "hidden_act": "gelu",
}
"""IP-Adapter SD 1.5's image encoder (``models/image_encoder``: OpenCLIP ViT-H/14 with a 1024-d projection)."""
MGIE_TEXT_TOKENS = 100
"""Text tokens of MGIE's prompt with LLaMA's tokenizer (system prompt, instruction, template), BOS included."""


def source_image(size: int) -> PIL.Image.Image:
    """The example photo at ``size×size``, or an RGB gradient when the example is missing."""
    if EXAMPLE.is_file():
        with PIL.Image.open(EXAMPLE) as image:
            return image.convert("RGB").resize((size, size), PIL.Image.Resampling.LANCZOS)
    ramp = PIL.Image.linear_gradient("L")
    flat = PIL.Image.new("L", ramp.size, 128)
    return PIL.Image.merge("RGB", (ramp, ramp.rotate(90), flat)).resize((size, size))


@contextmanager
def materialise_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly on ``device`` in ``dtype`` (no full-precision copy on the CPU first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_real_shapes(
    device: torch.device, dtype: torch.dtype, llm_layers: int, vision_layers: int, unet_scale: str
) -> XMGIEPipeline:
    """MGIE's real architecture (LLaVA-7B, MGIE edit head, SD 1.5 InstructPix2Pix) with random weights."""
    tokenizer = build_byte_tokenizer()  # byte-level ids are all < 32011, so it drives the 7B embedding
    mllm_config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=vision_layers,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            projection_dim=768,
        ),
        text_config=LlamaConfig(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=llm_layers,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32011,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PATCH_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="linear",
    )
    full = unet_scale == "full"
    with torch.no_grad(), materialise_on(device, dtype):
        mllm = LlavaForConditionalGeneration(mllm_config)
        edit_head = EditMapper()
        unet = UNet2DConditionModel(
            sample_size=64,
            block_out_channels=SD15_UNET_CHANNELS if full else (32, 64, 64, 64),
            layers_per_block=2 if full else 1,
            **SD15_UNET_LAYOUT,
        )
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        image_encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(**{**IP_ADAPTER_IMAGE_ENCODER, "num_hidden_layers": 32 * vision_layers // 24})
        )
        identity_adapter = IdentityAdapter.from_unet(unet, image_embed_dim=IP_ADAPTER_IMAGE_ENCODER["projection_dim"])
    for module in (mllm, edit_head, unet, vae, image_encoder, identity_adapter):
        module.to(device).eval()
    feature_extractor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    scheduler = EulerAncestralDiscreteScheduler(**IP2P_SCHEDULER_CONFIG)
    pipe = XMGIEPipeline(
        mllm, tokenizer, feature_extractor, edit_head, unet, vae, scheduler, image_encoder, identity_adapter
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Scaled dot-product attention as the fused CUDA kernels hold it: the output only, no score matrix."""
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


class ActivationMeter(TorchDispatchMode):
    """Peak bytes of the tensors created inside the block (activations; weights exist before), on any device.

    Every operator's fresh outputs (views and in-place results excluded) count from creation until the last Python
    reference goes. Attention counts as fused (flash / memory-efficient kernels, as on CUDA in half precision); on
    the meta device PyTorch would otherwise expand it into the score matrix.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def __enter__(self) -> ActivationMeter:
        self._attention = torch.nn.functional.scaled_dot_product_attention
        torch.nn.functional.scaled_dot_product_attention = _fused_attention
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        torch.nn.functional.scaled_dot_product_attention = self._attention
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(result.alias_info is not None for result in func._schema.returns):
            for tensor in tree_flatten(out)[0]:
                if isinstance(tensor, torch.Tensor):
                    size = tensor.numel() * tensor.element_size()
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(tensor, self._free, size)
        return out

    def _free(self, size: int) -> None:
        self.live -= size


def measured_activations(run) -> int:
    """Peak activation bytes of ``run()`` (a function of no arguments), outputs included."""
    with torch.no_grad(), ActivationMeter() as meter:
        run()
    return meter.peak


STAGE_COMPONENTS = {
    "mllm": ("mllm",),
    "edit_head": ("edit_head",),
    "identity": ("image_encoder", "identity_adapter"),
    "vae_encode": ("vae",),
    "diffusion": ("unet", "identity_adapter"),
    "vae_decode": ("vae",),
}
"""The components each stage runs (what model offload puts on the device for it)."""
OFFLOAD_MODES = ("none", "model", "mllm")
CARDS_GIB = {"24 GB": 24, "16 GB": 16}
RESERVE_GIB = 1.0
"""Kept free on a card for the CUDA context and the allocator's fragmentation."""


def held_weights(stage: str, mode: str, weights: dict[str, int]) -> int:
    """Weight bytes on the device while ``stage`` runs under offload ``mode``."""
    if mode == "none":
        return sum(weights.values())
    if mode == "model":
        return sum(weights[name] for name in STAGE_COMPONENTS[stage])
    return sum(size for name, size in weights.items() if name != "mllm" or stage == "mllm")


def _mllm_activations(config, batch: int, new_tokens: int, dtype: torch.dtype, lean: bool) -> int:
    """The MLLM stage's cache and kept hidden states for ``batch`` items."""
    return mllm_stage.mllm_activation_bytes(
        config,
        batch_size=batch,
        text_tokens=MGIE_TEXT_TOKENS,
        new_tokens=new_tokens,
        dtype=dtype,
        lean_hidden_states=lean,
    ).total


def memory_table(args: argparse.Namespace, large_side: int = 2048) -> dict:
    """Per stage, the weight bytes held under each offload mode and the activation bytes, on the meta device;
    and the VAE decode's activations at ``large_side`` pixels, whole group against sliced and tiled."""
    dtype = args.dtype
    pipe = build_real_shapes(torch.device("meta"), dtype, args.llm_layers, args.vision_layers, args.unet_scale)
    weights = component_bytes(pipe, dtype)
    batch, size = args.batch, args.size
    mllm_batch = min(batch, getattr(mllm_stage, "DEFAULT_MLLM_BATCH_SIZE", batch))
    latent = size // pipe.vae_scale_factor
    rows = 4 * batch  # three guidance branches and PFB's reference ride in one UNet call
    meta = {"device": "meta", "dtype": dtype}
    text_config = pipe.mllm.config.text_config

    def edit_head() -> None:
        pipe.edit_head(torch.empty(batch, 8, text_config.hidden_size, **meta))
        pipe.edit_head.null_conditioning(batch)

    def identity() -> None:
        embeds = pipe.image_encoder(pixel_values=torch.empty(batch, 3, 224, 224, **meta)).image_embeds
        pipe.identity_adapter.tokens(embeds)

    def vae_encode() -> None:
        pipe.prepare_image_latents(torch.empty(batch, 3, size, size, **meta))

    def diffusion() -> None:
        sample = torch.empty(rows, 8, latent, latent, **meta)
        pipe.unet(sample, 500, encoder_hidden_states=torch.empty(rows, 77, 768, **meta))

    def vae_decode() -> None:
        latents = torch.empty(batch, 4, latent, latent, **meta)
        with pipe._vae_tiling(size):
            for chunk in latents.split(pipe.vae_slice_size):
                pipe.vae.decode(chunk, return_dict=False)

    activations = {
        "mllm": _mllm_activations(pipe.mllm.config, mllm_batch, args.max_new_tokens, dtype, lean=True),
        "edit_head": measured_activations(edit_head),
        "identity": measured_activations(identity),
        "vae_encode": measured_activations(vae_encode),
        "diffusion": measured_activations(diffusion),
        "vae_decode": measured_activations(vae_decode),
    }
    every_layer = _mllm_activations(pipe.mllm.config, mllm_batch, args.max_new_tokens, dtype, lean=False)

    # The VAE at a large size over the whole group at once, as it ran before slicing and tiling.
    big = large_side
    whole_group = measured_activations(
        lambda: pipe.vae.decode(torch.empty(batch, 4, big // 8, big // 8, **meta), return_dict=False)
    )

    def sliced_tiled() -> None:
        with pipe._vae_tiling(big):
            for chunk in torch.empty(batch, 4, big // 8, big // 8, **meta).split(pipe.vae_slice_size):
                pipe.vae.decode(chunk, return_dict=False)

    peaks = {
        mode: max(held_weights(stage, mode, weights) + activations[stage] for stage in STAGE_COMPONENTS)
        for mode in OFFLOAD_MODES
    }
    return {
        "batch": batch,
        "mllm_batch": mllm_batch,
        "size": size,
        "dtype": str(dtype).removeprefix("torch."),
        "weights": weights,
        "activations": activations,
        "mllm_every_layer_states": every_layer,
        "held": {
            mode: {stage: held_weights(stage, mode, weights) for stage in STAGE_COMPONENTS} for mode in OFFLOAD_MODES
        },
        "peaks": peaks,
        "vae_decode_large": {
            "side": big,
            "whole_group": whole_group,
            "sliced_tiled": measured_activations(sliced_tiled),
        },
    }


def print_memory_table(table: dict) -> None:
    """The memory table as Markdown (the README's), then which offload mode fits which card."""
    gib = lambda value: f"{value / GIB:.2f}"  # noqa: E731
    print(
        f"\nmemory per stage, GiB ({table['dtype']}, batch {table['batch']} "
        f"(MLLM chunks of {table['mllm_batch']}), {table['size']}×{table['size']}; computed on the meta device)\n"
    )
    print("| stage | weights held: none | model | mllm | activations |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for stage in STAGE_COMPONENTS:
        held = [gib(table["held"][mode][stage]) for mode in OFFLOAD_MODES]
        activations = gib(table["activations"][stage])
        if stage == "mllm":
            activations += f" (every layer's states: {gib(table['mllm_every_layer_states'])})"
        print(f"| {stage} | " + " | ".join(held) + f" | {activations} |")
    print("| **peak** | " + " | ".join(f"**{gib(table['peaks'][mode])}**" for mode in OFFLOAD_MODES) + " | |")
    decode = table["vae_decode_large"]
    print(
        f"\nVAE decode at {decode['side']}×{decode['side']}, batch {table['batch']}: "
        f"whole group {gib(decode['whole_group'])} GiB, "
        f"sliced and tiled {gib(decode['sliced_tiled'])} GiB"
    )
    print("weights (GiB): " + ", ".join(f"{name} {gib(size)}" for name, size in table["weights"].items()))
    for card, capacity in CARDS_GIB.items():
        fits = [mode for mode in OFFLOAD_MODES if table["peaks"][mode] / GIB + RESERVE_GIB <= capacity]
        print(f"a {card} card ({RESERVE_GIB:.0f} GiB kept free): " + (", ".join(fits) if fits else "no mode fits"))


class Probe:
    """Counts MLLM forward passes (= new tokens per call) and the longest prompt seen."""

    def __init__(self, pipe: XMGIEPipeline, device: torch.device) -> None:
        self.device = device
        self.calls = 0
        self.prompt_tokens = 0
        pipe.mllm.register_forward_pre_hook(self._on_mllm_forward, with_kwargs=True)

    def _on_mllm_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.calls += 1
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None:
            self.prompt_tokens = max(self.prompt_tokens, input_ids.shape[1])

    def reset(self) -> None:
        """Forget the previous run's counts and peaks."""
        self.calls = 0


def run_once(pipe: XMGIEPipeline, probe: Probe, args: argparse.Namespace, batch: int) -> dict[str, Any]:
    """One edit of ``batch`` copies of the source image; per-stage seconds, wall seconds, tokens and peaks."""
    device = probe.device
    generators = [torch.Generator(device=device).manual_seed(i) for i in range(batch)]
    probe.reset()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = pipe(
        [args.image] * batch,
        [INSTRUCTION] * batch,
        num_inference_steps=args.steps,
        generator=generators,
        max_side=args.size,
        max_new_tokens=args.max_new_tokens,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    record: dict[str, Any] = {stage: out.timings.get(stage, 0.0) for stage in STAGES}
    record.update(wall=wall, new_tokens=probe.calls, peak_bytes=dict(out.peak_memory))
    return record


def summarise(runs: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    """Mean seconds per stage, wall and throughput over the measured runs of one batch size."""
    stages = {stage: statistics.fmean(run[stage] for run in runs) for stage in STAGES}
    wall = statistics.fmean(run["wall"] for run in runs)
    peaks = {stage: max(run["peak_bytes"].get(stage, 0) for run in runs) for stage in STAGES}
    return {
        "batch": batch,
        "stages_s": stages,
        "other_s": max(wall - sum(stages.values()), 0.0),
        "total_s": wall,
        "images_per_s": batch / wall,
        "new_tokens": runs[-1]["new_tokens"],
        "peak_mib": {stage: value / MIB for stage, value in peaks.items() if value} or None,
        "runs": runs,
    }


def print_table(summary: dict[str, Any]) -> None:
    """Stage, mean seconds, share of total (and peak GPU memory on CUDA) for one batch size."""
    peaks = summary["peak_mib"] or {}
    print(f"\nbatch {summary['batch']}")
    print(f"  {'stage':<11} {'mean s':>10} {'share':>7}" + (f" {'peak MiB':>10}" if peaks else ""))
    rows = [*summary["stages_s"].items(), ("other", summary["other_s"]), ("total", summary["total_s"])]
    for stage, seconds in rows:
        line = f"  {stage:<11} {seconds:>10.4f} {100 * seconds / summary['total_s']:>6.1f}%"
        if peaks:
            peak = peaks.get(stage, max(peaks.values()) if stage == "total" else None)
            line += f" {peak:>10.0f}" if peak is not None else ""
        print(line)
    print(f"  images/s: {summary['images_per_s']:.3f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; size and steps default by mode."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real-shapes", action="store_true", help="LLaVA-7B + SD 1.5 shapes, random weights")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "xmgie"), help="tiny preset cache")
    parser.add_argument(
        "--device",
        help="default: cuda when present; else cpu, or meta with --real-shapes (the memory table only)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp16 on CUDA, fp32 elsewhere")
    parser.add_argument("--size", type=int, help="square working size (default 256, or 512 with --real-shapes)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 20, or 50 with --real-shapes)")
    parser.add_argument("--batch", type=int, default=1, help="images per call; >1 also measures batch 1")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs after one warm-up")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    smoke = parser.add_argument_group("smoke-testing the --real-shapes code path only (figures then mean nothing)")
    smoke.add_argument("--llm-layers", type=int, default=32)
    smoke.add_argument("--vision-layers", type=int, default=24)
    smoke.add_argument("--unet-scale", choices=("full", "small"), default="full")
    args = parser.parse_args(argv)
    fallback = "meta" if args.real_shapes else "cpu"
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else fallback))
    half = args.device.type in ("cuda", "meta")
    args.dtype = DTYPES[args.dtype] if args.dtype else torch.float16 if half else torch.float32
    args.size = args.size or (512 if args.real_shapes else 256)
    args.steps = args.steps or (50 if args.real_shapes else 20)
    return args


def main(argv: list[str] | None = None) -> None:
    """Build or load the pipeline, warm up, run interleaved repeats, print (and optionally save) the figures."""
    args = parse_args(argv)
    if args.real_shapes:
        table = memory_table(args)
        print_memory_table(table)
        if args.device.type == "meta":
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"mode": "real_shapes_memory", **table}, default=str, indent=2) + "\n")
                print(f"wrote {args.json}")
            return
    args.image = source_image(args.size)
    start = time.perf_counter()
    if args.real_shapes:
        pipe = build_real_shapes(args.device, args.dtype, args.llm_layers, args.vision_layers, args.unet_scale)
        # Random weights may stop early by chance; forbid EOS so every run is the full-budget worst case.
        pipe.mllm.generation_config.min_new_tokens = args.max_new_tokens
    else:
        pipe = load_pipeline("tiny", cache_dir=args.cache_dir, device=args.device, dtype=args.dtype)
    build_s = time.perf_counter() - start
    params = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("mllm", "edit_head", "unet", "vae")
    }
    probe = Probe(pipe, args.device)
    weights_mib = torch.cuda.memory_allocated(args.device) / MIB if args.device.type == "cuda" else None
    mode = "real shapes (random weights)" if args.real_shapes else "tiny preset"
    print(
        f"{mode} on {args.device} ({str(args.dtype).removeprefix('torch.')}), {args.size}x{args.size}, "
        f"{args.steps} steps, max {args.max_new_tokens} new tokens, {args.repeats} repeats after 1 warm-up"
    )
    print(
        f"built/loaded in {build_s:.1f} s; parameters (M): "
        + ", ".join(f"{name} {count / 1e6:.1f}" for name, count in params.items())
        + (f"; {weights_mib:.0f} MiB on the GPU before the first run" if weights_mib is not None else "")
    )
    if args.real_shapes and (args.llm_layers, args.vision_layers, args.unet_scale) != (32, 24, "full"):
        print(
            f"SMOKE TEST: llm_layers={args.llm_layers} vision_layers={args.vision_layers} "
            f"unet_scale={args.unet_scale}; the figures below are not MGIE's"
        )

    batches = [1, args.batch] if args.batch > 1 else [1]
    runs: dict[int, list[dict[str, Any]]] = {batch: [] for batch in batches}
    for batch in batches:
        run_once(pipe, probe, args, batch)
    for repeat in range(args.repeats):
        for batch in batches if repeat % 2 == 0 else batches[::-1]:  # alternate the order against drift
            runs[batch].append(run_once(pipe, probe, args, batch))

    summaries = {batch: summarise(runs[batch], batch) for batch in batches}
    for summary in summaries.values():
        print_table(summary)
    new_tokens = summaries[1]["new_tokens"]
    note = " (EOS suppressed: the full-budget worst case)" if args.real_shapes else ""
    print(
        f"\nMLLM: {new_tokens} new tokens per call of max {args.max_new_tokens}{note}; "
        f"prompt {probe.prompt_tokens} tokens (byte-level tokenizer: longer than LLaMA's for the same text)"
    )
    ratios: dict[str, float] = {}
    for batch in batches:
        ratios[f"diffusion/total@batch{batch}"] = statistics.median(r["diffusion"] / r["wall"] for r in runs[batch])
        ratios[f"mllm/total@batch{batch}"] = statistics.median(r["mllm"] / r["wall"] for r in runs[batch])
    if args.batch > 1:
        paired = zip(runs[1], runs[args.batch], strict=True)
        ratios[f"throughput batch{args.batch}/batch1"] = statistics.median(
            (args.batch / big["wall"]) / (1 / one["wall"]) for one, big in paired
        )
    print("ratios (median over repeats, measured side by side in this run):")
    for name, value in ratios.items():
        print(f"  {name:<28} {value:.3f}")

    if args.json:
        figures = {
            "mode": "real_shapes" if args.real_shapes else "tiny",
            "device": str(args.device),
            "dtype": str(args.dtype).removeprefix("torch."),
            "size": args.size,
            "steps": args.steps,
            "repeats": args.repeats,
            "max_new_tokens": args.max_new_tokens,
            "prompt_tokens": probe.prompt_tokens,
            "smoke": {
                "llm_layers": args.llm_layers,
                "vision_layers": args.vision_layers,
                "unet_scale": args.unet_scale,
            }
            if args.real_shapes
            else None,
            "build_s": build_s,
            "parameters": params,
            "weights_mib": weights_mib,
            "ratios": ratios,
            "results": {str(batch): summary for batch, summary in summaries.items()},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
