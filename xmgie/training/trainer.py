"""``xmgie train``: MGIE's objective on a model directory, on 🤗 Accelerate.

The same code runs as one process (``xmgie train``, CPU or one GPU) and under ``accelerate launch``
on several GPUs or machines: the objective is one module wrapped by ``Accelerator.prepare``, each
process reads its own share of every step's samples, and the main process writes checkpoints.

Output: ``OUTPUT/`` is the trained model directory (loadable by ``xmgie edit --model OUTPUT``),
``OUTPUT/checkpoints/step-NNNNNN/`` are model directories saved during the run, each with a
``training_state.pt`` (optimizer, learning-rate schedule, step, the moving average with ``ema_decay``) that
``--resume`` continues from, and ``OUTPUT/training_log.jsonl`` has one row of losses per optimizer step. With
``ema_decay`` the checkpoints hold the step's own parameters and ``OUTPUT/`` their moving average.

Every random draw of a step (timesteps, noise, conditioning dropout, sample order) comes from a
generator seeded by (seed, step, process), so a resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from xmgie.editing.errors import EditInputError
from xmgie.training.data import EditPair, PairedEditDataset, collate_pairs, read_pairs
from xmgie.training.ema import ParameterAverage
from xmgie.training.objective import (
    NULL_TARGETS,
    MGIEObjective,
    PairLatents,
    StepNoise,
    build_teacher_forcing_batch,
    num_image_tokens,
    unreachable_answer_lines,
)

TRAINABLE_COMPONENTS = ("unet", "edit_head", "mllm", "mllm_embeddings", "vision_tower")
"""What ``--train`` accepts: ``mllm`` is the language model with its projector and LM head (the vision
tower stays frozen unless ``vision_tower`` is named too); ``mllm_embeddings`` only the token embeddings
and the LM head (what MGIE trains of its 7B LLM)."""
DEFAULT_TRAIN = ("unet", "edit_head", "mllm")
PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
LR_SCHEDULES = ("constant", "linear", "cosine")
CHECKPOINTS_DIR = "checkpoints"
TRAINING_STATE_FILE = "training_state.pt"
TRAINING_LOG_FILE = "training_log.jsonl"


@dataclass
class TrainingConfig:
    """Everything a run depends on; ``xmgie train`` fills it from its options."""

    data: str
    output_dir: str
    model: str = "tiny"
    cache_dir: str = str(Path.home() / ".cache" / "xmgie")
    train: tuple[str, ...] = DEFAULT_TRAIN
    resolution: int | None = None
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    instruction_loss_weight: float = 1.0
    edit_loss_weight: float = 1.0
    conditioning_dropout: float = 0.05
    precision: str = "fp32"
    seed: int = 0
    checkpoint_every: int = 0
    resume: str | None = None
    num_workers: int = 0
    cache_latents: bool = False
    """Encode every item with the (frozen) VAE once before the first step instead of at every step: faster
    where the encoder is a large share of a step, at the memory of three latents per item."""
    region_loss_share: float = 0.0
    """The least share of each item's edit loss its region (``mask_file``) carries (0: plain mean squares over
    the image); see :func:`xmgie.training.objective.region_loss_weights`."""
    masked_attention_share: float = 0.0
    """The share of items (drawn per step) whose cross-attention to the conditioning is masked to their region
    (``mask_file``) as CAM masks it at inference with a user's mask; see
    :meth:`xmgie.training.objective.MGIEObjective.forward`."""
    snr_gamma: float = 0.0
    """Min-SNR-γ weighting of the edit loss over timesteps (0: plain mean squares); see
    :func:`xmgie.training.objective.min_snr_weights`."""
    edit_size_power: float = 0.0
    """Weigh each item's edit loss by its edit's size to this negative power, so subtle edits are not outweighed by
    large ones (0: every item alike); see :func:`xmgie.training.objective.edit_size_weights`."""
    noisy_timestep_share: float = 0.0
    """The share of items (drawn per step) whose timestep is drawn from the noisier half of the schedule, where
    the edit is decided (0: every timestep equally often); see :func:`xmgie.training.objective.noisy_timesteps`."""
    null_target: str = "target"
    """What items with the conditioning dropped (source kept) denoise: ``target`` (InstructPix2Pix) or ``source``
    (the null branch learns "no edit"); see :data:`xmgie.training.objective.NULL_TARGETS`."""
    repeat_rows: tuple[str, ...] = ()
    """``COLUMN=VALUE:TIMES`` rules: a metadata row whose ``COLUMN`` is ``VALUE`` is read ``TIMES`` times per epoch
    (a row several rules match, by the largest); see :func:`row_repeats`."""
    ema_decay: float = 0.0
    """Hand out the exponential moving average of the trained parameters with this decay (0: the parameters of
    the last step); see :class:`xmgie.training.ema.ParameterAverage`."""
    progress: bool = True

    def check(self) -> None:
        """Refuse option values that cannot train, naming the option."""
        unknown = [name for name in self.train if name not in TRAINABLE_COMPONENTS]
        if unknown or not self.train:
            raise EditInputError(
                "invalid_option",
                f"--train: unknown component(s) {unknown}; choose from {', '.join(TRAINABLE_COMPONENTS)}",
            )
        for name in ("batch_size", "gradient_accumulation_steps", "max_steps"):
            if getattr(self, name) < 1:
                raise EditInputError("invalid_option", f"--{name.replace('_', '-')} must be at least 1")
        if self.learning_rate <= 0:
            raise EditInputError("invalid_option", "--learning-rate must be positive")
        if self.precision not in PRECISIONS:
            raise EditInputError("invalid_option", f"--precision must be one of {', '.join(PRECISIONS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise EditInputError("invalid_option", f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}")
        if self.warmup_steps < 0 or self.checkpoint_every < 0:
            raise EditInputError("invalid_option", "--warmup-steps and --checkpoint-every cannot be negative")
        if not 0 <= self.conditioning_dropout <= 1 / 3:
            raise EditInputError("invalid_option", "--conditioning-dropout must be between 0 and 1/3")
        if not 0 <= self.region_loss_share < 1:
            raise EditInputError("invalid_option", "--region-loss-share must be at least 0 and below 1")
        if not 0 <= self.masked_attention_share <= 1:
            raise EditInputError("invalid_option", "--masked-attention-share must be between 0 and 1")
        if self.null_target not in NULL_TARGETS:
            raise EditInputError("invalid_option", f"--null-target must be one of {', '.join(NULL_TARGETS)}")
        if not 0 <= self.noisy_timestep_share < 1:
            raise EditInputError("invalid_option", "--noisy-timestep-share must be at least 0 and below 1")
        if self.snr_gamma < 0:
            raise EditInputError("invalid_option", "--snr-gamma cannot be negative")
        if not 0 <= self.edit_size_power <= 2:
            raise EditInputError("invalid_option", "--edit-size-power must be between 0 and 2")
        parse_repeat_rules(self.repeat_rows)
        if not 0 <= self.ema_decay < 1:
            raise EditInputError("invalid_option", "--ema-decay must be at least 0 and below 1")
        if self.resolution is not None and self.resolution < 8:
            raise EditInputError("invalid_option", "--resolution must be at least 8")


@dataclass
class TrainingResult:
    """Where the model went and the losses of each optimizer step."""

    output_dir: Path
    steps: int
    history: list[dict[str, float]]
    is_main_process: bool = True


def step_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed for a generator that belongs to (seed, parts) only."""
    return int(np.random.SeedSequence([seed, *parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


def parse_repeat_rules(rules) -> list[tuple[str, str, int]]:
    """``COLUMN=VALUE:TIMES`` strings as (column, value, times); anything else is refused, naming the rule."""
    parsed = []
    for rule in rules:
        column, _, rest = str(rule).partition("=")
        value, _, times = rest.rpartition(":")
        if not column or not value or not times.isdigit() or int(times) < 1:
            raise EditInputError(
                "invalid_option", f"--repeat-rows: {rule!r} is not COLUMN=VALUE:TIMES with TIMES a whole number ≥ 1"
            )
        parsed.append((column, value, int(times)))
    return parsed


def row_repeats(pairs: list[EditPair], rules) -> list[int]:
    """How many times each pair is read per epoch under ``rules`` (``COLUMN=VALUE:TIMES``; 1 where none matches).

    The columns are the metadata's own (``kind``, ``scope`` in ``xmgie data synth``'s). A rule no row matches is
    refused: it is a misspelt column or value, and the run it was meant to shape would silently be another.
    """
    counts = [1] * len(pairs)
    for column, value, times in parse_repeat_rules(rules):
        matches = [i for i, pair in enumerate(pairs) if str(pair.extra.get(column)) == value]
        if not matches:
            raise EditInputError("invalid_option", f"--repeat-rows: no metadata row has {column} = {value!r}")
        for i in matches:
            counts[i] = max(counts[i], times)
    return counts


class StepSampler(Sampler[int]):
    """Endless sample indices for one process, from sample ``start`` of its share on.

    An epoch reads item ``i`` ``repeats[i]`` times (once each without ``repeats``); the stream is a new
    permutation of the epoch per epoch, drawn from (seed, epoch); process ``p`` of ``P`` takes the batches
    ``p, p + P, p + 2P, …`` of it, so the processes never read the same sample in a step and a run restarted at
    any step reads what the uninterrupted run would have.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        process: int,
        processes: int,
        start_batch: int = 0,
        repeats: list[int] | None = None,
    ):
        self.items = np.repeat(np.arange(size), repeats if repeats is not None else 1)
        self.batch_size, self.seed = batch_size, seed
        self.process, self.processes, self.start_batch = process, processes, start_batch

    def __iter__(self) -> Iterator[int]:
        batch = self.start_batch
        epoch, order = -1, None
        length = len(self.items)
        while True:
            first = (batch * self.processes + self.process) * self.batch_size
            for position in range(first, first + self.batch_size):
                if position // length != epoch:
                    epoch = position // length
                    order = self.items[np.random.default_rng([self.seed, 3, epoch]).permutation(length)]
                yield int(order[position % length])
            batch += 1


def set_trainable(pipe, train: tuple[str, ...]) -> list[torch.nn.Parameter]:
    """Freeze every component, unfreeze those named in ``train``; return the parameters to optimise."""
    for name in ("mllm", "edit_head", "unet", "vae", "image_encoder", "identity_adapter"):
        component = getattr(pipe, name, None)
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
    if "unet" in train:
        pipe.unet.requires_grad_(True)
    if "edit_head" in train:
        pipe.edit_head.requires_grad_(True)
    if "mllm" in train:
        pipe.mllm.requires_grad_(True)
        pipe.mllm.model.vision_tower.requires_grad_("vision_tower" in train)
    if "mllm_embeddings" in train:
        pipe.mllm.get_input_embeddings().requires_grad_(True)
        pipe.mllm.get_output_embeddings().requires_grad_(True)
    if "vision_tower" in train:
        pipe.mllm.model.vision_tower.requires_grad_(True)
    # Frozen components run in eval mode (no dropout); trained ones in train mode.
    for name in ("mllm", "edit_head", "unet", "vae"):
        component = getattr(pipe, name)
        component.train(any(p.requires_grad for p in component.parameters()))
    return [p for name in ("mllm", "edit_head", "unet") for p in getattr(pipe, name).parameters() if p.requires_grad]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest ``step-*`` checkpoint under ``output_dir/checkpoints``, if any."""
    folder = Path(output_dir) / CHECKPOINTS_DIR
    found = sorted(folder.glob("step-*")) if folder.is_dir() else []
    found = [path for path in found if (path / TRAINING_STATE_FILE).is_file()]
    return found[-1] if found else None


def resolve_resume(config: TrainingConfig) -> Path | None:
    """The checkpoint ``--resume`` names (a folder, or ``latest``), checked."""
    if config.resume is None:
        return None
    path = latest_checkpoint(config.output_dir) if config.resume == "latest" else Path(config.resume)
    if path is None:
        raise EditInputError("checkpoint_not_found", f"no checkpoint under {config.output_dir}/{CHECKPOINTS_DIR}")
    if not (path / TRAINING_STATE_FILE).is_file() or not (path / "model_index.json").is_file():
        raise EditInputError("checkpoint_not_found", f"{str(path)!r} is not a training checkpoint")
    return path


def _save_model(pipe, folder: Path) -> Path:
    """Write the pipeline as a model directory in a staging folder beside ``folder``; return the staging folder."""
    staging = folder.with_name(f".{folder.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    return staging


def train(config: TrainingConfig, on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainingResult:
    """Train the model of ``config`` on its paired folder; see the module docstring for the outputs."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    from xmgie.loading.directory import load_pipeline

    # 1. Check options and data before anything heavy
    config.check()
    resume_from = resolve_resume(config)
    pairs = read_pairs(config.data)
    accelerator = Accelerator(
        mixed_precision=PRECISIONS[config.precision],
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=not torch.cuda.is_available(),
    )
    output_dir = Path(config.output_dir)

    # 2. The model (from the checkpoint when resuming), with its trainable components
    model_source = resume_from if resume_from is not None else config.model
    pipe = load_pipeline(model_source, cache_dir=config.cache_dir, device=accelerator.device, dtype=torch.float32)
    vae_factor = pipe.vae_scale_factor
    resolution = config.resolution or pipe.unet.config.sample_size * vae_factor
    if resolution % vae_factor:
        raise EditInputError("invalid_option", f"--resolution must be a multiple of the VAE factor {vae_factor}")
    dataset = PairedEditDataset(config.data, resolution, pairs)
    parameters = set_trainable(pipe, config.train)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    objective = MGIEObjective(pipe.mllm, pipe.edit_head, pipe.unet, pipe.vae, noise_scheduler)

    # 3. Optimiser and learning-rate schedule (the schedule counts every process's step, as accelerate steps it)
    optimizer = torch.optim.AdamW(
        parameters,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
    )
    lr_scheduler = get_scheduler(
        "constant_with_warmup" if config.lr_schedule == "constant" else config.lr_schedule,
        optimizer,
        num_warmup_steps=config.warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_steps * accelerator.num_processes,
    )
    objective, optimizer, lr_scheduler = accelerator.prepare(objective, optimizer, lr_scheduler)
    average = ParameterAverage(parameters, config.ema_decay) if config.ema_decay > 0 else None

    start_step = 0
    history: list[dict[str, float]] = []
    if resume_from is not None:
        state = torch.load(resume_from / TRAINING_STATE_FILE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        start_step = int(state["step"])
        if average is not None and state.get("ema") is not None:
            average.load_state_dict(state["ema"])
        history = [dict(row) for row in state["history"]]

    # 4. Data: each process's share of every step, from where the run stands
    micro_batches_done = start_step * config.gradient_accumulation_steps
    sampler = StepSampler(
        len(dataset),
        config.batch_size,
        config.seed,
        accelerator.process_index,
        accelerator.num_processes,
        start_batch=micro_batches_done,
        repeats=row_repeats(pairs, config.repeat_rows),
    )
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        collate_fn=collate_pairs,
        num_workers=config.num_workers,
    )
    latent_cache = PairLatents.of_dataset(pipe.vae, dataset, accelerator.device) if config.cache_latents else None
    latent_shape = (pipe.vae.config.latent_channels, resolution // vae_factor, resolution // vae_factor)
    image_tokens = num_image_tokens(pipe.mllm)
    unreachable = unreachable_answer_lines(pipe.tokenizer, pairs, image_tokens)
    if unreachable and accelerator.is_main_process:
        print(
            f"warning: {len(unreachable)} of {len(pairs)} rows have an expressive instruction that repeats three "
            f"tokens in a row of their prompt or of itself, which generation (no_repeat_ngram_size=3) never "
            f"produces; those items will not edit as trained (metadata lines {unreachable[:10]})",
            file=sys.stderr,
        )

    # 5. Training loop; the log restarts from the checkpoint's history, so a resumed run lists each step once
    output_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        rows = "".join(json.dumps(row) + "\n" for row in history)
        (output_dir / TRAINING_LOG_FILE).write_text(rows, encoding="utf-8")
    bar = _progress_bar(config, accelerator, start_step)
    micro_step = micro_batches_done
    step = start_step
    sums = {"instruction_loss": 0.0, "edit_loss": 0.0, "conditioning_spread": 0.0}
    batches = iter(loader)
    while step < config.max_steps:
        batch = next(batches)
        generator = torch.Generator().manual_seed(step_seed(config.seed, micro_step, accelerator.process_index))
        noise = StepNoise.draw(
            generator,
            len(batch["index"]),
            latent_shape,
            noise_scheduler.config.num_train_timesteps,
            config.conditioning_dropout,
            config.masked_attention_share,
            config.noisy_timestep_share,
        )
        mllm_inputs = build_teacher_forcing_batch(
            pipe.tokenizer,
            pipe.feature_extractor,
            image_tokens,
            batch["source_image"],
            batch["instruction"],
            batch["expressive_instruction"],
        )
        mllm_inputs = type(mllm_inputs)(**{k: v.to(accelerator.device) for k, v in vars(mllm_inputs).items()})
        with accelerator.accumulate(objective), accelerator.autocast():
            losses = objective(
                mllm_inputs,
                batch["source_pixels"].to(accelerator.device),
                batch["target_pixels"].to(accelerator.device),
                noise,
                latent_cache.rows(batch["index"]) if latent_cache is not None else None,
                region_masks=batch["mask"],
                region_loss_share=config.region_loss_share,
                snr_gamma=config.snr_gamma,
                edit_size_power=config.edit_size_power,
                null_target=config.null_target,
            )
            loss = (
                config.instruction_loss_weight * losses["instruction_loss"]
                + config.edit_loss_weight * losses["edit_loss"]
            )
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        micro_step += 1
        for name in sums:
            sums[name] += accelerator.gather(losses[name].detach()[None]).mean().item()
        if not accelerator.sync_gradients:
            continue
        step += 1
        if average is not None:
            average.update(step)
        row = {name: value / config.gradient_accumulation_steps for name, value in sums.items()}
        row = {"step": step, **row, "lr": lr_scheduler.get_last_lr()[0]}
        sums = dict.fromkeys(sums, 0.0)
        history.append(row)
        if accelerator.is_main_process:
            with (output_dir / TRAINING_LOG_FILE).open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                instruction=f"{row['instruction_loss']:.4f}",
                edit=f"{row['edit_loss']:.4f}",
                spread=f"{row['conditioning_spread']:.3f}",
            )
        if on_step is not None:
            on_step(step, row)
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.max_steps:
            save_checkpoint(accelerator, pipe, optimizer, lr_scheduler, step, history, config, output_dir, average)
    if bar is not None:
        bar.close()

    # 6. The trained model directory
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with average.applied() if average is not None else nullcontext():
            _write_model(pipe, output_dir)
        (output_dir / "training_config.json").write_text(json.dumps(asdict(config), indent=2, default=str) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainingResult(output_dir, step, history, accelerator.is_main_process)


def _write_model(pipe, folder: Path) -> None:
    """Write the pipeline's components into ``folder`` (replacing earlier ones), keeping other files there."""
    staging = _save_model(pipe, folder / "model")
    for entry in staging.iterdir():
        destination = folder / entry.name
        if destination.is_dir():
            shutil.rmtree(destination)
        elif destination.exists():
            destination.unlink()
        entry.rename(destination)
    staging.rmdir()


def save_checkpoint(
    accelerator, pipe, optimizer, lr_scheduler, step, history, config, output_dir: Path, average=None
) -> Path:
    """A model directory with the training state under ``output_dir/checkpoints/step-NNNNNN``.

    The directory holds the step's own parameters (a resumed run continues from them); with ``ema_decay`` the
    moving average is in the training state, and only the finished run's directory holds the average.
    """
    folder = output_dir / CHECKPOINTS_DIR / f"step-{step:06d}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = _save_model(pipe, folder)
        state = {
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "step": step,
            "history": history,
            "ema": average.state_dict() if average is not None else None,
        }
        torch.save(state, staging / TRAINING_STATE_FILE)
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    accelerator.wait_for_everyone()
    return folder


def _progress_bar(config: TrainingConfig, accelerator, start_step: int):
    if not config.progress or not accelerator.is_main_process:
        return None
    from tqdm import tqdm

    return tqdm(
        total=config.max_steps, initial=start_step, desc="training", unit="step", file=sys.stderr, dynamic_ncols=True
    )
