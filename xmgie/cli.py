"""The ``xmgie`` command: one-off edits and model directory tools."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from pathlib import Path

DEFAULT_CACHE_DIR = Path(os.environ.get("XMGIE_CACHE_DIR", Path.home() / ".cache" / "xmgie"))
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def _add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=os.environ.get("XMGIE_MODEL", "mini"),
        help="model directory, 'mini' (trained on this project's edits, 64 px; default) or 'tiny' (random weights, "
        "for tests); env XMGIE_MODEL",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16/fp16 on CUDA, fp32 on CPU"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE_DIR,
        help="where the tiny preset is written on first use (env XMGIE_CACHE_DIR)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``xmgie`` command."""
    from xmgie.editing.options import (
        DEFAULT_GUIDANCE_SCALE,
        DEFAULT_IMAGE_GUIDANCE_SCALE,
        DEFAULT_MAX_SIDE,
        DEFAULT_STEPS,
    )
    from xmgie.eval_arguments import add_eval_arguments
    from xmgie.training.arguments import add_training_commands

    parser = argparse.ArgumentParser(prog="xmgie", description="MLLM-guided image editing.")
    commands = parser.add_subparsers(dest="command", required=True)

    edit = commands.add_parser("edit", help="edit one image by an instruction")
    edit.add_argument("image", type=Path)
    edit.add_argument("--instruction", required=True)
    edit.add_argument("--mask", type=Path, help="white = region to edit")
    edit.add_argument("--output", type=Path, required=True, help="output image path (.png, .jpg, .webp)")
    edit.add_argument("--seed", type=int, help="noise seed (default: drawn and printed)")
    edit.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    edit.add_argument(
        "--guidance-scale",
        type=float,
        help=f"text guidance (default: the model's; {DEFAULT_GUIDANCE_SCALE} for a model that sets none)",
    )
    edit.add_argument(
        "--image-guidance-scale",
        type=float,
        help=f"image guidance (default: the model's; {DEFAULT_IMAGE_GUIDANCE_SCALE} for a model that sets none)",
    )
    edit.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE, help="long side the model works at")
    edit.add_argument("--save-mask", type=Path, help="write the mask used (the user's or the automatic one) here")
    edit.add_argument(
        "--offload",
        choices=["none", "model", "mllm"],
        default=os.environ.get("XMGIE_OFFLOAD", "none"),
        help="weights on the CPU between stages: model (each component), mllm (the MLLM only); env XMGIE_OFFLOAD",
    )
    extensions = edit.add_argument_group("extensions")
    for name, what in (
        ("pfb", "progressive feature blending"),
        ("cam", "cross-attention masking"),
        ("ie", "identity embeddings"),
        ("gb", "Gaussian blurring and the final composite"),
        ("auto-mask", "the automatic mask when no --mask is given (same as --auto-mask-mode off)"),
        ("detail", "detail transfer from the source after decoding (models that set a detail radius, mini)"),
    ):
        extensions.add_argument(f"--no-{name}", action="store_true", help=f"switch off {what}")
    extensions.add_argument(
        "--auto-mask-mode",
        choices=["auto", "always", "off"],
        help="without --mask: auto = local to the estimated mask, or global when the edit is everywhere; "
        "always = always local to the estimated mask; off = global (default: the model's; auto for a model "
        "that sets none, off for mini)",
    )
    extensions.add_argument(
        "--auto-mask-level",
        type=float,
        help="the automatic mask's absolute threshold: a pixel is edited where the edit moves the noise prediction "
        "by more than this (noise units); 0 = DiffEdit's rule, relative to the map's mean (default: the model's; "
        "0 for a model that sets none, 0.03 for mini)",
    )
    extensions.add_argument("--pfb-fraction", type=float, default=0.5, help="leading fraction of latent blending")
    extensions.add_argument("--pfb-reference", choices=["noise", "inversion", "inversion_start"], default="noise")
    extensions.add_argument("--cam-mode", choices=["hard", "soft"], default="hard")
    extensions.add_argument("--ie-scale", type=float, default=0.3)
    extensions.add_argument("--ie-reference", choices=["source", "outside_mask", "image"], default="source")
    extensions.add_argument("--identity-image", type=Path, help="identity reference for --ie-reference image")
    extensions.add_argument("--ie-region", choices=["outside_mask", "inside_mask"], help="where IE acts")
    extensions.add_argument(
        "--sigma-max", type=float, help="GB: blur at the mask boundary (working px; default: the model's or 5)"
    )
    extensions.add_argument(
        "--sigma-s", type=float, help="GB: fall-off of the blur with distance (working px; default: the model's or 10)"
    )
    _add_runtime_arguments(edit)

    batch = commands.add_parser("batch", help="edit every item of a JSON Lines manifest as a local job")
    batch.add_argument("manifest", type=Path, help="one JSON object per line: image, instruction, mask, seed, options")
    batch.add_argument("--output-dir", type=Path, required=True, help="where outputs, results and the sheet go")
    batch.add_argument("--micro-batch", type=int, help="items edited per model call (default: settings, 1)")
    batch.add_argument("--steps", type=int, help="denoising steps of items whose options do not set them")
    batch.add_argument("--max-side", type=int, help="working long side of items whose options do not set it")
    _add_runtime_arguments(batch)
    _add_augment_command(commands)

    migrate = commands.add_parser("migrate", help="bring the job database to the newest schema")
    migrate.add_argument("--database-url", help="default: the settings' database URL (XMGIE_DATABASE_URL)")

    evaluate = commands.add_parser("eval", help="editing metrics (L1, L2, CLIP-I, CLIP-T, DINO) over folders")
    add_eval_arguments(evaluate)

    model = commands.add_parser("model", help="model directory tools")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    init_tiny = model_commands.add_parser("init-tiny", help="write the tiny preset (random weights) to DIR")
    init_tiny.add_argument("directory", type=Path)
    info = model_commands.add_parser("info", help="describe a model directory (or a preset: mini, tiny)")
    info.add_argument("model")
    info.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    info.add_argument(
        "--dtype", default="float16", choices=list(DTYPES), help="dtype of the reported weight bytes (default float16)"
    )
    convert = model_commands.add_parser("convert-mgie", help="convert the released MGIE files into a model directory")
    convert.add_argument("--llava", type=Path, required=True, help="LLaVA-7B v1 directory")
    convert.add_argument("--clip", type=Path, required=True, help="CLIP ViT-L/14 directory (the vision tower)")
    convert.add_argument("--mllm", type=Path, required=True, help="MGIE's mllm.pt")
    convert.add_argument("--unet", type=Path, required=True, help="MGIE's unet.pt")
    convert.add_argument("--ip2p", type=Path, required=True, help="timbrooks/instruct-pix2pix directory")
    convert.add_argument("--output", type=Path, required=True, help="model directory to write")
    convert.add_argument("--ip-adapter", type=Path, help="IP-Adapter SD 1.5 weights, for identity embeddings")
    convert.add_argument("--image-encoder", type=Path, help="IP-Adapter's image encoder directory")
    convert.add_argument("--dtype", default="float16", choices=list(DTYPES))
    _add_service_commands(commands)
    _add_worker_commands(commands)
    _add_client_commands(commands)
    add_training_commands(commands, DEFAULT_CACHE_DIR)
    return parser


def _add_augment_command(commands: argparse._SubParsersAction) -> None:
    """``xmgie augment``: incremental dataset augmentation of a folder on the embedded defaults."""
    augment = commands.add_parser(
        "augment", help="augment a folder of images with a list of instructions (incremental across calls)"
    )
    augment.add_argument("source_dir", type=Path, help="folder of images, searched recursively")
    augment.add_argument(
        "--instructions",
        type=Path,
        required=True,
        help="one instruction per line (# comments), or a .jsonl file of {instruction, options} objects",
    )
    augment.add_argument("--variants", type=int, default=1, help="outputs per image and instruction (own seeds)")
    augment.add_argument(
        "--output-dir", type=Path, required=True, help="the dataset: images/ and metadata.jsonl (state in .xmgie/)"
    )
    augment.add_argument("--micro-batch", type=int, help="items edited per model call (default: settings, 1)")
    augment.add_argument("--steps", type=int, help="denoising steps of instructions whose options do not set them")
    augment.add_argument("--max-side", type=int, help="working long side of instructions whose options do not set it")
    _add_runtime_arguments(augment)


def _add_service_commands(commands: argparse._SubParsersAction) -> None:
    """``xmgie api`` and ``xmgie admin ...``: the HTTP service and its administration."""
    api = commands.add_parser("api", help="run the HTTP API (run `xmgie migrate` first; it does not migrate)")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    admin = commands.add_parser("admin", help="administration of the job service")
    admin_commands = admin.add_subparsers(dest="admin_command", required=True)
    create_key = admin_commands.add_parser("create-key", help="issue an API key (the tenant is created if needed)")
    create_key.add_argument("--tenant", required=True, help="tenant name")


def _add_worker_commands(commands: argparse._SubParsersAction) -> None:
    """``xmgie worker`` and ``xmgie beat``: the Celery processes of the job service (need ``XMGIE_BROKER_URL``)."""
    worker = commands.add_parser("worker", help="run a Celery worker (edits on queue gpu, bookkeeping on default)")
    worker.add_argument("--queues", default="gpu,default", help="comma-separated queues to consume")
    worker.add_argument("--concurrency", type=int, default=1, help="worker processes (one model each)")
    worker.add_argument("--pool", choices=["solo", "prefork"], default="solo")
    worker.add_argument("--loglevel", default="INFO")
    # Hidden: the no-op editor (same as XMGIE_EDITOR=noop) for queue benchmarks and tests, never for real jobs.
    worker.add_argument("--editor", choices=["pipeline", "noop"], help=argparse.SUPPRESS)
    beat = commands.add_parser("beat", help="run Celery beat: the reconciler every minute")
    beat.add_argument("--schedule-file", type=Path, help="beat's state file (default: <data_dir>/celerybeat-schedule)")
    beat.add_argument("--loglevel", default="INFO")


def _add_client_commands(commands: argparse._SubParsersAction) -> None:
    """``xmgie submit`` and ``xmgie status``: the client of a running job service (see ``xmgie.client``)."""
    from xmgie.client import add_client_arguments

    submit = commands.add_parser("submit", help="submit a manifest's job to the API; prints the job id")
    submit.add_argument("manifest", type=Path, help="one JSON object per line, as for `xmgie batch`")
    submit.add_argument("--output-dir", type=Path, help="with --wait: download the results and results.jsonl here")
    submit.add_argument("--steps", type=int, help="denoising steps of items whose options do not set them")
    submit.add_argument("--max-side", type=int, help="working long side of items whose options do not set it")
    submit.add_argument(
        "--idempotency-key", help="default: derived from the manifest, its input files and --steps/--max-side"
    )
    submit.add_argument("--webhook-url", help="URL the API calls when the job finishes")
    add_client_arguments(submit)
    status = commands.add_parser("status", help="print a job's status, counts and progress")
    status.add_argument("job_id")
    add_client_arguments(status)


def run_submit(args: argparse.Namespace) -> int:
    """``xmgie submit``: upload a manifest's inputs and submit its job (see ``xmgie.client``)."""
    from xmgie.client import run_submit_command

    return run_submit_command(args)


def run_status(args: argparse.Namespace) -> int:
    """``xmgie status``: a job's status, counts and progress (see ``xmgie.client``)."""
    from xmgie.client import run_status_command

    return run_status_command(args)


def _require_broker() -> None:
    from xmgie.jobs.settings import get_settings

    if not get_settings().broker_url:
        raise ValueError("no broker configured: set XMGIE_BROKER_URL (e.g. redis://127.0.0.1:6379/0)")


def run_worker(args: argparse.Namespace) -> int:
    """``xmgie worker``: a Celery worker of ``workers.celery_app``; the model loads on each process' first edit."""
    _require_broker()
    if args.editor:
        os.environ["XMGIE_EDITOR"] = args.editor
    from workers.celery_app import celery_app

    celery_app.worker_main(
        [
            "worker",
            f"--queues={args.queues}",
            f"--concurrency={args.concurrency}",
            f"--pool={args.pool}",
            f"--loglevel={args.loglevel}",
        ]
    )
    return 0


def run_beat(args: argparse.Namespace) -> int:
    """``xmgie beat``: Celery beat with the schedule of ``workers.beat``."""
    _require_broker()
    from workers.celery_app import celery_app
    from xmgie.jobs.settings import get_settings

    schedule = args.schedule_file or get_settings().data_dir / "celerybeat-schedule"
    schedule.parent.mkdir(parents=True, exist_ok=True)
    celery_app.Beat(schedule=str(schedule), loglevel=args.loglevel).run()
    return 0


def run_api(args: argparse.Namespace) -> int:
    """``xmgie api``: serve ``api.main:create_app`` with uvicorn; the database schema must already be migrated."""
    import uvicorn

    uvicorn.run("api.main:create_app", factory=True, host=args.host, port=args.port)
    return 0


def run_admin(args: argparse.Namespace) -> int:
    """``xmgie admin create-key``: print a new API key of the tenant; it is shown this once only."""
    from xmgie.jobs.auth import create_api_key
    from xmgie.jobs.db import get_engine, session_scope
    from xmgie.jobs.settings import get_settings

    with session_scope(get_engine(get_settings().database_url)) as session:
        key = create_api_key(session=session, tenant_name=args.tenant)
    print(key)
    return 0


def _torch_dtype(name: str):
    import torch

    return None if name == "auto" else getattr(torch, DTYPES[name])


def _load(args: argparse.Namespace):
    from xmgie.loading.directory import load_pipeline

    device = None if args.device == "auto" else args.device
    return load_pipeline(
        args.model,
        cache_dir=args.cache_dir,
        device=device,
        dtype=_torch_dtype(args.dtype),
        offload=getattr(args, "offload", "none"),
    )


def run_edit(args: argparse.Namespace) -> int:
    """``xmgie edit``: one edit, printing the expressive instruction and the stage timings."""
    from xmgie.editing.images import check_instruction, load_image, load_mask
    from xmgie.editing.options import EditOptions

    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    options = EditOptions(
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        image_guidance_scale=args.image_guidance_scale,
        seed=seed,
        max_side=args.max_side,
        detail=not args.no_detail,
        pfb={"enabled": not args.no_pfb, "latent_blend_fraction": args.pfb_fraction, "reference": args.pfb_reference},
        cam={"enabled": not args.no_cam, "mode": args.cam_mode},
        ie={
            "enabled": not args.no_ie,
            "scale": args.ie_scale,
            "reference": args.ie_reference,
            "region": args.ie_region,
        },
        gb={"enabled": not args.no_gb, "sigma_max": args.sigma_max, "sigma_s": args.sigma_s},
        auto_mask={"mode": "off" if args.no_auto_mask else args.auto_mask_mode, "level": args.auto_mask_level},
    )
    image = load_image(args.image)
    mask = load_mask(args.mask, image.size) if args.mask else None
    identity_image = load_image(args.identity_image) if args.identity_image else None
    instruction = check_instruction(args.instruction)
    if args.output.suffix.lower() not in {".png", ".jpg", ".jpeg", ".webp"}:
        raise ValueError(f"--output must end in .png, .jpg, .jpeg or .webp, got {args.output.name!r}")

    started = time.perf_counter()
    pipe = _load(args)
    load_seconds = time.perf_counter() - started
    out = pipe(
        image,
        instruction,
        mask=mask,
        num_inference_steps=options.num_inference_steps,
        guidance_scale=options.guidance_scale,
        image_guidance_scale=options.image_guidance_scale,
        max_side=options.max_side,
        pfb=options.pfb,
        cam=options.cam,
        ie=options.ie,
        gb=options.gb,
        auto_mask=options.auto_mask,
        detail=options.detail,
        identity_image=identity_image,
        generator=pipe.seeded_generators([seed]),
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    out.images[0].save(args.output)
    print(f"expressive instruction: {out.expressive_instructions[0]}")
    print(f"seed: {seed}")
    print(f"edit scope: {out.edit_scopes[0]} ({out.mask_fractions[0]:.1%} of the image)")
    print(f"wrote {args.output} ({out.images[0].size[0]}×{out.images[0].size[1]})")
    print(
        "timings (s): "
        + ", ".join(
            [f"load {load_seconds:.2f}"] + [f"{stage} {seconds:.2f}" for stage, seconds in out.timings.items()]
        )
    )
    if args.save_mask:
        if out.masks[0] is None:
            print("no mask was used: the edit is global")
        else:
            args.save_mask.parent.mkdir(parents=True, exist_ok=True)
            out.masks[0].save(args.save_mask)
            print(f"wrote mask {args.save_mask}" + ("" if mask is not None else " (automatic)"))
    if out.identity_scores[0] is not None:
        print(f"identity score: {out.identity_scores[0]:.4f}")
    if out.preservation[0] is not None:
        kept = out.preservation[0]
        print(f"preservation outside the mask: PSNR {kept['psnr']:.2f} dB, L1 {kept['l1']:.4f}")
    return 0


def run_model(args: argparse.Namespace) -> int:
    """``xmgie model ...``: write the tiny preset, describe a directory, or convert MGIE's release."""
    if args.model_command == "init-tiny":
        from xmgie.loading.tiny import build_tiny_pipeline

        build_tiny_pipeline().save_pretrained(args.directory, safe_serialization=True)
        print(f"wrote the tiny preset (random weights) to {args.directory}")
    elif args.model_command == "info":
        from xmgie.loading.directory import model_info

        print(json.dumps(model_info(args.model, args.cache_dir, dtype=_torch_dtype(args.dtype)), indent=2))
    else:
        from xmgie.loading.convert_mgie import convert_mgie

        path = convert_mgie(
            llava_dir=args.llava,
            clip_dir=args.clip,
            mllm_ckpt=args.mllm,
            unet_ckpt=args.unet,
            ip2p_dir=args.ip2p,
            output_dir=args.output,
            dtype=_torch_dtype(args.dtype),
            ip_adapter=args.ip_adapter,
            image_encoder_dir=args.image_encoder,
        )
        print(f"wrote {path}")
    return 0


def run_batch(args: argparse.Namespace) -> int:
    """``xmgie batch``: a bulk job from a manifest on the embedded defaults (see ``xmgie.jobs.batch``)."""
    from xmgie.jobs.batch import run_batch_command

    return run_batch_command(
        args.manifest,
        args.output_dir,
        model=args.model,
        device=args.device,
        dtype=DTYPES.get(args.dtype, args.dtype),
        cache_dir=args.cache_dir,
        micro_batch=args.micro_batch,
        steps=args.steps,
        max_side=args.max_side,
    )


def run_augment(args: argparse.Namespace) -> int:
    """``xmgie augment``: one incremental dataset augmentation run (see ``xmgie.jobs.augment``)."""
    from xmgie.jobs.augment import run_augment_command

    return run_augment_command(
        args.source_dir,
        args.output_dir,
        instructions=args.instructions,
        variants=args.variants,
        model=args.model,
        device=args.device,
        dtype=DTYPES.get(args.dtype, args.dtype),
        cache_dir=args.cache_dir,
        micro_batch=args.micro_batch,
        steps=args.steps,
        max_side=args.max_side,
    )


def run_migrate(args: argparse.Namespace) -> int:
    """``xmgie migrate``: apply the Alembic migrations to the database."""
    from xmgie.jobs.migrate import upgrade_database
    from xmgie.jobs.settings import get_settings

    url = args.database_url or get_settings().database_url
    upgrade_database(url)
    print(f"database {url} is at the newest schema")
    return 0


MODEL_COMMANDS = frozenset({"edit", "batch", "augment", "model", "eval", "train", "data"})
"""Commands that load a model in this process; the others (API, workers, client) never import the model
libraries up front, so they start in a couple of seconds."""


def _quiet_libraries(command: str) -> None:
    """Keep the command's output to its own lines: no loading bars or library warnings."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    if command in MODEL_COMMANDS:
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``xmgie`` command; input errors exit with status 2 and a one-line message."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    _quiet_libraries(args.command)
    from xmgie.editing.errors import EditInputError

    try:
        if args.command == "edit":
            return run_edit(args)
        if args.command == "api":
            return run_api(args)
        if args.command == "admin":
            return run_admin(args)
        if args.command == "worker":
            return run_worker(args)
        if args.command == "beat":
            return run_beat(args)
        if args.command == "batch":
            return run_batch(args)
        if args.command == "augment":
            return run_augment(args)
        if args.command == "submit":
            return run_submit(args)
        if args.command == "status":
            return run_status(args)
        if args.command == "migrate":
            return run_migrate(args)
        if args.command == "eval":
            from xmgie.metrics import run_eval

            return run_eval(args)
        if args.command in ("train", "data"):
            from xmgie.training.arguments import run_data, run_train

            return run_train(args) if args.command == "train" else run_data(args)
        return run_model(args)
    except EditInputError as error:
        print(f"error: {error.code}: {error.message}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as error:  # ValueError includes ModelDirectoryError
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
