"""Per-stage timing of one MGIE edit: the ``tiny`` preset, or real-size models with random weights.

Default mode loads the ``tiny`` preset and edits ``examples/chelsea.png``; ``--real-shapes`` builds
SD 1.5 InstructPix2Pix (UNet, VAE) and LLaVA-7B (CLIP ViT-L/14 vision tower) at their real sizes with
random weights, directly on the device, so the timings and memory are those of the released model
without downloading anything.

    python benchmarks/bench_edit.py --device cpu --steps 4 --size 128 --repeats 2
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from xmgie.editing.edit_head import EditMapper
from xmgie.editing.mllm import IMAGE_PATCH_TOKEN, MAX_NEW_TOKENS
from xmgie.editing.pipeline import XMGIEPipeline
from xmgie.loading.directory import load_pipeline
from xmgie.loading.tiny import IP2P_SCHEDULER_CONFIG, build_byte_tokenizer

STAGES = ("mllm", "edit_head", "vae_encode", "diffusion", "vae_decode")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "chelsea.png"
INSTRUCTION = "make the cat wear a red hat"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MIB = 2**20
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
    for module in (mllm, edit_head, unet, vae):
        module.to(device).eval()
    feature_extractor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    scheduler = EulerAncestralDiscreteScheduler(**IP2P_SCHEDULER_CONFIG)
    pipe = XMGIEPipeline(mllm, tokenizer, feature_extractor, edit_head, unet, vae, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
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
    args.device = torch.device(args.device)
    args.dtype = DTYPES[args.dtype] if args.dtype else torch.float16 if args.device.type == "cuda" else torch.float32
    args.size = args.size or (512 if args.real_shapes else 256)
    args.steps = args.steps or (50 if args.real_shapes else 20)
    return args


def main(argv: list[str] | None = None) -> None:
    """Build or load the pipeline, warm up, run interleaved repeats, print (and optionally save) the figures."""
    args = parse_args(argv)
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
