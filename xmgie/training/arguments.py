"""Options of ``xmgie train`` and ``xmgie data synth``, and the commands that run them.

Kept apart from the training code so that building the command's parser imports no model library.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_training_commands(commands: argparse._SubParsersAction, default_cache_dir: Path) -> None:
    """Register ``train`` and ``data synth`` on the ``xmgie`` command."""
    train = commands.add_parser(
        "train", help="train a model directory with MGIE's objective on a paired folder (accelerate launch works)"
    )
    train.add_argument("--data", type=Path, help="folder with metadata.jsonl (source, target, ...)")
    train.add_argument(
        "--recipe",
        help="build and train a model from nothing by a recipe: a bundled name (mini) or a JSON file; "
        "writes OUTPUT/data, OUTPUT/init and OUTPUT/model (the other training options come from the recipe)",
    )
    train.add_argument("--output-dir", type=Path, required=True, help="the trained model directory (+ checkpoints/)")
    train.add_argument("--model", default="tiny", help="model directory to start from, or 'tiny' (default)")
    train.add_argument("--cache-dir", type=Path, default=default_cache_dir, help="where the tiny preset is written")
    train.add_argument(
        "--train",
        default="unet,edit_head,mllm",
        help="components to train, comma-separated: unet, edit_head, mllm (vision tower frozen), "
        "mllm_embeddings (token embeddings + LM head only), vision_tower (default: unet,edit_head,mllm)",
    )
    train.add_argument("--resolution", type=int, help="training size in pixels (default: the UNet's sample size)")
    train.add_argument("--batch-size", type=int, default=4, help="items per process per micro-batch")
    train.add_argument("--gradient-accumulation-steps", type=int, default=1)
    train.add_argument("--max-steps", type=int, default=1000, help="optimizer steps")
    train.add_argument("--learning-rate", type=float, default=1e-4)
    train.add_argument("--weight-decay", type=float, default=1e-2)
    train.add_argument("--lr-schedule", choices=["constant", "linear", "cosine"], default="constant")
    train.add_argument("--warmup-steps", type=int, default=0)
    train.add_argument("--max-grad-norm", type=float, default=1.0, help="0 switches clipping off")
    train.add_argument("--instruction-loss-weight", type=float, default=1.0)
    train.add_argument("--edit-loss-weight", type=float, default=1.0)
    train.add_argument(
        "--conditioning-dropout", type=float, default=0.05, help="rate of each of: no conditioning, no image, neither"
    )
    train.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="mixed precision")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--checkpoint-every", type=int, default=0, help="save a checkpoint every N steps (0: never)")
    train.add_argument("--resume", help="a checkpoint folder, or 'latest' (the newest under OUTPUT/checkpoints)")
    train.add_argument("--num-workers", type=int, default=0, help="data loading processes")
    train.add_argument(
        "--cache-latents",
        action="store_true",
        help="encode every item with the frozen VAE once before training, not at every step (faster; memory: "
        "three latents per item)",
    )
    train.add_argument(
        "--region-loss-share",
        type=float,
        default=0.0,
        help="weigh each item's edited region (its mask_file) to at least this share of its edit loss (0: plain mean "
        "squares)",
    )
    train.add_argument(
        "--masked-attention-share",
        type=float,
        default=0.0,
        help="share of the items whose cross-attention to the conditioning is masked to their region (mask_file) "
        "during training, as CAM masks it at inference with a user's mask (0: never)",
    )
    train.add_argument(
        "--snr-gamma",
        type=float,
        default=0.0,
        help="Min-SNR-γ weighting of the edit loss over timesteps (5 is the paper's; 0: plain mean squares)",
    )
    train.add_argument(
        "--edit-size-power",
        type=float,
        default=0.0,
        help="weigh each item's edit loss by the size of its edit (target latent against source latent) to this "
        "negative power, normalised over the batch, so subtle edits count as much as large ones (1: in proportion "
        "to the edit's size; 0: every item alike)",
    )
    train.add_argument(
        "--noisy-timestep-share",
        type=float,
        default=0.0,
        help="share of the items whose timestep is drawn from the noisier half of the schedule, where the edit is "
        "decided (0: every timestep equally often)",
    )
    train.add_argument(
        "--null-target",
        choices=["target", "source"],
        default="target",
        help="what items whose conditioning is dropped (source kept) learn: the edit's target (InstructPix2Pix) or "
        "the source (no edit: the automatic mask's edit-vs-null difference is then the edit)",
    )
    train.add_argument(
        "--repeat-rows",
        action="append",
        default=[],
        metavar="COLUMN=VALUE:TIMES",
        help="read each metadata row whose COLUMN is VALUE TIMES times per epoch (repeatable; e.g. scope=local:3)",
    )
    train.add_argument(
        "--ema-decay",
        type=float,
        default=0.0,
        help="write the exponential moving average of the trained weights with this decay, e.g. 0.999 "
        "(0: the last step's weights; checkpoints keep the step's own)",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    data = commands.add_parser("data", help="training data tools")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    synth = data_commands.add_parser(
        "synth", help="write a paired dataset of photo crops with exactly computed edits (train/ and test/)"
    )
    synth.add_argument("--output", type=Path, required=True, help="folder to write (must be new or empty)")
    synth.add_argument("--count", type=int, required=True, help="items in both splits together")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", type=int, default=128, help="side of the square images in pixels")
    synth.add_argument("--photos", type=Path, help="folder of photos to crop (default: the bundled examples)")
    synth.add_argument("--test-fraction", type=float, default=0.2, help="share of the items in test/")
    synth.add_argument("--test-photos", type=int, default=1, help="photos held out for test/")
    synth.add_argument(
        "--colour-jitter",
        type=float,
        default=0.0,
        help="share of the training items whose crop has its hues turned and saturation scaled before the edit "
        "(0: the photos' own colours)",
    )
    synth.add_argument(
        "--colour-jitter-hue",
        type=float,
        default=180.0,
        help="largest angle in degrees either way by which a jittered crop's hues turn (180: any hue; 0: only its "
        "saturation is scaled)",
    )


def run_train(args: argparse.Namespace) -> int:
    """``xmgie train``: one training run; prints where the model went."""
    from xmgie.training.trainer import TrainingConfig, train

    if args.recipe is not None:
        from xmgie.training.recipe import run_recipe

        model = run_recipe(args.recipe, args.output_dir, resume=args.resume, progress=not args.no_progress)
        print(f"trained by recipe {args.recipe}; model directory: {model}")
        return 0
    if args.data is None:
        from xmgie.editing.errors import EditInputError

        raise EditInputError("invalid_option", "xmgie train needs --data FOLDER (a paired folder) or --recipe NAME")
    config = TrainingConfig(
        data=str(args.data),
        output_dir=str(args.output_dir),
        model=args.model,
        cache_dir=str(args.cache_dir),
        train=tuple(name.strip() for name in args.train.split(",") if name.strip()),
        resolution=args.resolution,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm,
        instruction_loss_weight=args.instruction_loss_weight,
        edit_loss_weight=args.edit_loss_weight,
        conditioning_dropout=args.conditioning_dropout,
        precision=args.precision,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        num_workers=args.num_workers,
        cache_latents=args.cache_latents,
        region_loss_share=args.region_loss_share,
        masked_attention_share=args.masked_attention_share,
        snr_gamma=args.snr_gamma,
        edit_size_power=args.edit_size_power,
        noisy_timestep_share=args.noisy_timestep_share,
        null_target=args.null_target,
        ema_decay=args.ema_decay,
        repeat_rows=tuple(args.repeat_rows),
        progress=not args.no_progress,
    )
    result = train(config)
    last = result.history[-1] if result.history else {}
    losses = ", ".join(f"{name} {last[name]:.4f}" for name in ("instruction_loss", "edit_loss") if name in last)
    if result.is_main_process:
        print(f"trained {result.steps} steps ({losses}); model directory: {result.output_dir}")
    return 0


def run_data(args: argparse.Namespace) -> int:
    """``xmgie data synth``: write the synthetic paired dataset."""
    from xmgie.training.synth import BUNDLED_PHOTOS, write_synthetic_dataset

    counts = write_synthetic_dataset(
        args.output,
        args.count,
        seed=args.seed,
        size=args.size,
        photos=args.photos or BUNDLED_PHOTOS,
        test_fraction=args.test_fraction,
        test_photos=args.test_photos,
        colour_jitter=args.colour_jitter,
        colour_jitter_hue=args.colour_jitter_hue,
    )
    print(f"wrote {counts['train']} train and {counts['test']} test items under {args.output}")
    return 0
