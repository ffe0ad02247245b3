"""Cost of the extensions (PFB, CAM, IE, GB) on the diffusion stage, against diffusers' InstructPix2Pix.

Every configuration does the same work — VAE-encode the source, then denoise; no decode — on the same
UNet, VAE, scheduler configuration, steps, size, embeddings and seeds:

- ``ip2p``: diffusers' ``StableDiffusionInstructPix2PixPipeline`` with ``prompt_embeds`` given and
  ``output_type="latent"`` (its image encoding plus its denoising loop);
- ``ours_plain``: ``XMGIEPipeline.prepare_image_latents`` + ``denoise`` with no extension;
- ``pfb`` (noise reference, batched), ``pfb_sequential`` (the reference in its own UNet call),
  ``pfb_inversion`` (DDIM-inversion reference), ``cam`` (hard), ``ie`` (identity tokens at scale 0.5);
- ``gb``: ``ours_plain`` plus what GB alone adds: softening the mask at pixel size and compositing two
  image-size tensors;
- ``all``: PFB (batched) + CAM + IE on the softened mask, plus the GB composite.

The repeats are interleaved (each repeat runs every configuration, in an order that alternates) after
one warm-up round, and the ratios are medians of the per-repeat ratios, so drift on a shared machine
hits every configuration alike.

Default mode builds a mid-size UNet with SD 1.5's layout and random weights (UNet compute dominates)
and the tiny preset's VAE; ``--real-shapes`` builds SD 1.5's UNet and VAE at 512 px (fp16 on CUDA).

    python benchmarks/bench_extensions.py --device cpu
    python benchmarks/bench_extensions.py --real-shapes --device cuda --steps 50 --json extensions.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    EulerAncestralDiscreteScheduler,
    StableDiffusionInstructPix2PixPipeline,
    UNet2DConditionModel,
)

from xmgie.editing.blur import composite, soften_mask
from xmgie.editing.identity import IdentityAdapter
from xmgie.editing.options import DEFAULT_GUIDANCE_SCALE, DEFAULT_IMAGE_GUIDANCE_SCALE, CAMOptions, PFBOptions
from xmgie.editing.pipeline import XMGIEPipeline
from xmgie.loading.tiny import IP2P_SCHEDULER_CONFIG, build_tiny_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_edit import (  # noqa: E402
    DTYPES,
    SD15_UNET_CHANNELS,
    SD15_UNET_LAYOUT,
    SD15_VAE_CONFIG,
    materialise_on,
    source_image,
)

CONFIGS = ("ip2p", "ours_plain", "pfb", "pfb_sequential", "pfb_inversion", "cam", "ie", "gb", "all")
TARGET = 1.35
"""The ``all / ip2p`` ratio the extensions should stay under."""

IDENTITY_SCALE = 0.5
IMAGE_EMBED_DIM = 1024  # CLIP ViT-H/14, as IP-Adapter for SD 1.5
PROMPT_TOKENS = 77
CROSS_ATTENTION_DIM = 768
SEED = 0
MID_UNET_CHANNELS = (64, 128, 256, 256)


@dataclass(frozen=True)
class Extensions:
    """Which extensions one configuration of ours turns on."""

    pfb: PFBOptions | None = None
    pfb_sequential: bool = False
    cam: CAMOptions | None = None
    ie: bool = False
    gb: bool = False


OURS: dict[str, Extensions] = {
    "ours_plain": Extensions(),
    "pfb": Extensions(pfb=PFBOptions(reference="noise")),
    "pfb_sequential": Extensions(pfb=PFBOptions(reference="noise"), pfb_sequential=True),
    "pfb_inversion": Extensions(pfb=PFBOptions(reference="inversion")),
    "cam": Extensions(cam=CAMOptions(mode="hard")),
    "ie": Extensions(ie=True),
    "gb": Extensions(gb=True),
    "all": Extensions(pfb=PFBOptions(reference="noise"), cam=CAMOptions(mode="hard"), ie=True, gb=True),
}


@dataclass
class Workload:
    """Both pipelines and the inputs every configuration shares."""

    ours: XMGIEPipeline
    ip2p: StableDiffusionInstructPix2PixPipeline
    images: list[PIL.Image.Image]
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    hard_mask: torch.Tensor
    identity_embeds: torch.Tensor
    edited_pixels: torch.Tensor
    steps: int
    device: torch.device


def build_models(
    real_shapes: bool, size: int, device: torch.device, dtype: torch.dtype
) -> tuple[UNet2DConditionModel, AutoencoderKL, IdentityAdapter]:
    """UNet, VAE and identity adapter with seeded random weights, created on ``device`` in ``dtype``."""
    torch.manual_seed(SEED)
    with torch.no_grad(), materialise_on(device, dtype):
        unet = UNet2DConditionModel(
            sample_size=size // 8,
            block_out_channels=SD15_UNET_CHANNELS if real_shapes else MID_UNET_CHANNELS,
            layers_per_block=2,
            norm_num_groups=32,
            **SD15_UNET_LAYOUT,
        )
        if real_shapes:
            vae = AutoencoderKL(**SD15_VAE_CONFIG)
        adapter = IdentityAdapter.from_unet(unet, image_embed_dim=IMAGE_EMBED_DIM)
    if not real_shapes:
        vae = build_tiny_pipeline().vae.to(device=device, dtype=dtype)
    for module in (unet, vae, adapter):
        module.to(device).eval()
    return unet, vae, adapter


def build_workload(args: argparse.Namespace) -> Workload:
    """Both pipelines on the same UNet and VAE, and seeded inputs for ``args.batch`` items."""
    device, dtype = args.device, args.dtype
    unet, vae, adapter = build_models(args.real_shapes, args.size, device, dtype)
    tiny = build_tiny_pipeline()  # MLLM, tokenizer and edit head: required components, unused by denoise
    ours = XMGIEPipeline(
        tiny.mllm.to(device=device, dtype=dtype),
        tiny.tokenizer,
        tiny.feature_extractor,
        tiny.edit_head.to(device=device, dtype=dtype),
        unet,
        vae,
        EulerAncestralDiscreteScheduler(**IP2P_SCHEDULER_CONFIG),
        identity_adapter=adapter,
    )
    ip2p = StableDiffusionInstructPix2PixPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=EulerAncestralDiscreteScheduler(**IP2P_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for pipe in (ours, ip2p):
        pipe.set_progress_bar_config(disable=True)

    batch, size = args.batch, args.size
    inputs = torch.Generator().manual_seed(SEED + 1)
    embeds_shape = (batch, PROMPT_TOKENS, CROSS_ATTENTION_DIM)
    prompt_embeds = torch.randn(embeds_shape, generator=inputs).to(device=device, dtype=dtype)
    negative_prompt_embeds = torch.randn(embeds_shape, generator=inputs).to(device=device, dtype=dtype)
    identity_embeds = torch.randn((batch, IMAGE_EMBED_DIM), generator=inputs).to(device=device, dtype=dtype)
    edited_pixels = torch.rand((batch, 3, size, size), generator=inputs).to(device=device, dtype=dtype)
    hard_mask = torch.zeros((batch, 1, size, size), device=device)
    quarter = size // 4
    hard_mask[..., quarter : size - quarter, quarter : size - quarter] = 1.0  # a centred quarter of the image
    return Workload(
        ours=ours,
        ip2p=ip2p,
        images=[source_image(size)] * batch,
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
        hard_mask=hard_mask,
        identity_embeds=identity_embeds,
        edited_pixels=edited_pixels,
        steps=args.steps,
        device=device,
    )


def synchronise(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generators(work: Workload, seed: int) -> list[torch.Generator]:
    """One generator per item, seeded from the repeat so that every configuration draws the same noise."""
    return [torch.Generator(device=work.device).manual_seed(seed * 1000 + i) for i in range(len(work.images))]


@torch.no_grad()
def run_ip2p(work: Workload, seed: int) -> dict[str, float]:
    """diffusers' InstructPix2Pix: image encoding and the denoising loop, latents out."""
    synchronise(work.device)
    start = time.perf_counter()
    work.ip2p(
        image=work.images,
        prompt_embeds=work.prompt_embeds,
        negative_prompt_embeds=work.negative_prompt_embeds,
        num_inference_steps=work.steps,
        guidance_scale=DEFAULT_GUIDANCE_SCALE,
        image_guidance_scale=DEFAULT_IMAGE_GUIDANCE_SCALE,
        generator=generators(work, seed),
        output_type="latent",
    )
    synchronise(work.device)
    return {"total": time.perf_counter() - start, "gb": 0.0}


@torch.no_grad()
def run_ours(work: Workload, extensions: Extensions, seed: int) -> dict[str, float]:
    """Ours: image encoding and ``denoise`` with ``extensions``; GB's mask softening and composite when on."""
    pipe = work.ours
    gb_seconds = 0.0
    synchronise(work.device)
    start = time.perf_counter()
    edit_masks = work.hard_mask if extensions.pfb is not None or extensions.cam is not None else None
    if extensions.gb:
        edit_masks = soften_mask(work.hard_mask)
        synchronise(work.device)
        gb_seconds += time.perf_counter() - start
    pixels = pipe.image_processor.preprocess(work.images)
    image_latents = pipe.prepare_image_latents(pixels)
    identity_tokens = pipe.identity_adapter.tokens(work.identity_embeds) if extensions.ie else None
    pipe.denoise(
        image_latents,
        work.prompt_embeds,
        work.negative_prompt_embeds,
        num_inference_steps=work.steps,
        guidance_scale=DEFAULT_GUIDANCE_SCALE,
        image_guidance_scale=DEFAULT_IMAGE_GUIDANCE_SCALE,
        generator=generators(work, seed),
        edit_masks=edit_masks,
        pfb=extensions.pfb,
        cam=extensions.cam,
        identity_tokens=identity_tokens,
        identity_scale=IDENTITY_SCALE if extensions.ie else 0.0,
        pfb_sequential=extensions.pfb_sequential,
    )
    if extensions.gb:
        synchronise(work.device)
        composite_start = time.perf_counter()
        source = pixels.to(device=work.device, dtype=work.edited_pixels.dtype)
        composite(work.edited_pixels, source, edit_masks)
        synchronise(work.device)
        gb_seconds += time.perf_counter() - composite_start
    synchronise(work.device)
    return {"total": time.perf_counter() - start, "gb": gb_seconds}


def run_config(work: Workload, name: str, seed: int) -> dict[str, float]:
    """Seconds (total, and the part spent on GB's softening and composite) for one configuration."""
    return run_ip2p(work, seed) if name == "ip2p" else run_ours(work, OURS[name], seed)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; size defaults by mode, dtype by device."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real-shapes", action="store_true", help="SD 1.5 UNet and VAE at their real sizes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp16 on CUDA, fp32 elsewhere")
    parser.add_argument("--size", type=int, help="square image size (default 256, or 512 with --real-shapes)")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps")
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds after one warm-up round")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    args.dtype = DTYPES[args.dtype] if args.dtype else torch.float16 if args.device.type == "cuda" else torch.float32
    args.size = args.size or (512 if args.real_shapes else 256)
    if args.size % 8:
        parser.error("--size must be a multiple of 8")
    return args


def main(argv: list[str] | None = None) -> None:
    """Build, warm up, run interleaved repeats of every configuration, print (and optionally save) the figures."""
    args = parse_args(argv)
    start = time.perf_counter()
    work = build_workload(args)
    build_s = time.perf_counter() - start
    params = {name: sum(p.numel() for p in getattr(work.ours, name).parameters()) for name in ("unet", "vae")}
    mode = "real shapes (SD 1.5 UNet + VAE)" if args.real_shapes else "mid-size SD 1.5-layout UNet + tiny VAE"
    print(
        f"{mode}, random weights, on {args.device} ({str(args.dtype).removeprefix('torch.')}), "
        f"{args.size}x{args.size}, batch {args.batch}, {args.steps} steps, {args.repeats} repeats after 1 warm-up"
    )
    print(
        f"built in {build_s:.1f} s; parameters (M): "
        + ", ".join(f"{name} {count / 1e6:.1f}" for name, count in params.items())
    )

    for name in CONFIGS:
        run_config(work, name, seed=0)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in CONFIGS}
    for repeat in range(args.repeats):
        order = CONFIGS if repeat % 2 == 0 else CONFIGS[::-1]  # alternate the order against drift
        for name in order:
            runs[name].append(run_config(work, name, seed=repeat + 1))

    def ratio(numerator: str, denominator: str) -> float:
        """Median over repeats of the per-repeat ratio of two configurations' seconds."""
        pairs = zip(runs[numerator], runs[denominator], strict=True)
        return statistics.median(top["total"] / bottom["total"] for top, bottom in pairs)

    medians = {name: statistics.median(run["total"] for run in runs[name]) for name in CONFIGS}
    to_ip2p = {name: ratio(name, "ip2p") for name in CONFIGS}
    to_plain = {name: ratio(name, "ours_plain") for name in CONFIGS}
    gb_medians = {name: statistics.median(run["gb"] for run in runs[name]) for name in ("gb", "all")}
    print("\nencode + denoise, median seconds; ratios are medians of per-repeat ratios (same run)")
    print(f"  {'config':<15} {'median s':>9} {'/ ip2p':>7} {'/ ours_plain':>12}")
    for name in CONFIGS:
        print(f"  {name:<15} {medians[name]:>9.3f} {to_ip2p[name]:>7.2f} {to_plain[name]:>12.2f}")
    print(f"GB alone (soften_mask + composite at {args.size} px): {gb_medians['gb']:.4f} s")
    sequential_gain = ratio("pfb_sequential", "pfb")
    print(f"pfb_sequential / pfb = {sequential_gain:.2f}")
    print(f"all / ip2p = {to_ip2p['all']:.2f} (target ≤ {TARGET:.2f})")

    if args.json:
        figures: dict[str, Any] = {
            "mode": "real_shapes" if args.real_shapes else "mid_unet",
            "device": str(args.device),
            "dtype": str(args.dtype).removeprefix("torch."),
            "size": args.size,
            "steps": args.steps,
            "batch": args.batch,
            "repeats": args.repeats,
            "build_s": build_s,
            "parameters": params,
            "median_s": medians,
            "ratio_to_ip2p": to_ip2p,
            "ratio_to_ours_plain": to_plain,
            "gb_median_s": gb_medians,
            "pfb_sequential_over_pfb": sequential_gain,
            "all_over_ip2p": to_ip2p["all"],
            "target": TARGET,
            "runs": runs,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
