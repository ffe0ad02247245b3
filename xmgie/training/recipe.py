"""Training recipes: ``xmgie train --recipe NAME|FILE`` builds a model from nothing, reproducibly.

A recipe is a JSON file (the bundled ones live in ``xmgie/training/recipes/``) with four parts:

- ``architecture``: the builder of the untrained model (``mini``: :func:`xmgie.loading.mini.build_mini_pipeline`),
  and optionally ``architecture_options``, the builder's settings (``mini``:
  ``unet_heads`` and ``unet_width``, the UNet's attention heads and channels; ``tiny``: none);
- ``synth``: the arguments of :func:`xmgie.training.synth.write_synthetic_dataset` (the paired data);
- ``autoencoder``: an :class:`~xmgie.training.autoencoder.AutoencoderConfig` (omit it to keep the VAE as built);
- ``train``: the fields of :class:`~xmgie.training.trainer.TrainingConfig` for MGIE's objective, or a list of
  such objects: stages of the objective run in turn, each from the model the one before wrote, with the fields
  of the stage before changed by its own (:func:`train_stages`) — a curriculum, e.g. global edits first and then
  local ones with masked attention.

Output under ``OUTPUT/``: ``data/`` (``train/`` and ``test/``), ``init/`` (the built model with its trained
VAE), ``model/`` (the trained model directory, with its checkpoints and ``training_log.jsonl``; with several
stages the last one's, the earlier ones under ``stages/N/``), ``autoencoder_log.jsonl``, ``recipe.json`` (the
recipe as run) and ``timings.json`` (seconds per stage). A stage whose output is already there is not redone,
so a run stopped during MGIE's objective continues with ``--resume latest``.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from xmgie.editing.errors import EditInputError

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
RECIPE_PARTS = ("name", "description", "architecture", "architecture_options", "synth", "autoencoder", "train")


def _architectures() -> dict[str, Callable[..., Any]]:
    from xmgie.loading.mini import build_mini_pipeline
    from xmgie.loading.tiny import build_tiny_pipeline

    return {"mini": build_mini_pipeline, "tiny": build_tiny_pipeline}


def _no_options() -> None:
    """``tiny`` takes no architecture options."""


def _option_checks() -> dict[str, Callable[..., None]]:
    """Per architecture, the check of the settings a recipe may give its builder: its keyword parameters are the
    settings' names, and it raises ``ValueError`` on a bad value."""
    from xmgie.loading.mini import check_unet_options

    return {"mini": check_unet_options, "tiny": _no_options}


def load_recipe(recipe: str | os.PathLike) -> dict[str, Any]:
    """The recipe named ``recipe`` (a bundled one) or stored in the JSON file ``recipe``, checked."""
    path = Path(recipe)
    if not path.is_file():
        path = RECIPES_DIR / f"{recipe}.json"
    if not path.is_file():
        bundled = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.json")))
        raise EditInputError("recipe_not_found", f"no recipe {str(recipe)!r} (bundled: {bundled}; or a JSON file)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise EditInputError("invalid_recipe", f"{path}: not JSON ({error})") from None
    if not isinstance(data, dict):
        raise EditInputError("invalid_recipe", f"{path}: a recipe is a JSON object")
    unknown = sorted(set(data) - set(RECIPE_PARTS))
    if unknown:
        raise EditInputError("invalid_recipe", f"{path}: unknown part(s) {unknown}; a recipe has {RECIPE_PARTS}")
    if data.get("architecture") not in _architectures():
        raise EditInputError("invalid_recipe", f"{path}: architecture must be one of {sorted(_architectures())}")
    options = data.get("architecture_options", {})
    if not isinstance(options, dict):
        raise EditInputError("invalid_recipe", f"{path}: architecture_options is a JSON object")
    check = _option_checks()[data["architecture"]]
    names = list(inspect.signature(check).parameters)
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise EditInputError(
            "invalid_recipe",
            f"{path}: architecture_options: {data['architecture']} has no option(s) {unknown} "
            f"(it has {names or 'none'})",
        )
    try:
        check(**options)
    except ValueError as error:
        raise EditInputError("invalid_recipe", f"{path}: architecture_options: {error}") from None
    from xmgie.training.autoencoder import AutoencoderConfig
    from xmgie.training.trainer import TrainingConfig

    train = data.get("train")
    train = {} if train is None else train
    if isinstance(train, list) and (not train or not all(isinstance(stage, dict) for stage in train)):
        raise EditInputError("invalid_recipe", f"{path}: train: a list of stages holds one or more JSON objects")
    stages = train if isinstance(train, list) else [train]
    for part, cls, fixed, values in (
        ("autoencoder", AutoencoderConfig, set(), [data.get("autoencoder") or {}]),
        ("train", TrainingConfig, {"data", "output_dir", "model", "cache_dir", "resume"}, stages),
    ):
        allowed = {f.name for f in fields(cls)} - fixed
        for value in values:
            bad = sorted(set(value) - allowed)
            if bad:
                raise EditInputError("invalid_recipe", f"{path}: {part}: unknown or fixed field(s) {bad}")
    if "synth" not in data or "count" not in data["synth"]:
        raise EditInputError("invalid_recipe", f"{path}: synth.count is required")
    return data


def train_stages(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The objective's stages of a checked recipe, each with every field it runs with: a stage's own fields
    over those of the stage before (one stage when ``train`` is an object)."""
    train = spec.get("train") or {}
    stages: list[dict[str, Any]] = []
    for stage in train if isinstance(train, list) else [train]:
        stages.append({**(stages[-1] if stages else {}), **stage})
    return stages


def run_recipe(
    recipe: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    resume: str | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> Path:
    """Run every stage of ``recipe`` into ``output_dir``; return the trained model directory."""
    import torch

    from xmgie.training.autoencoder import AutoencoderConfig, train_autoencoder
    from xmgie.training.synth import write_synthetic_dataset
    from xmgie.training.trainer import TrainingConfig, train

    spec = load_recipe(recipe)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "recipe.json").write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    timings_path = output / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}

    def record(stage: str, started: float) -> None:
        timings[stage] = round(time.perf_counter() - started, 1)
        timings_path.write_text(json.dumps(timings, indent=2) + "\n", encoding="utf-8")

    # 1. Paired data
    data = output / "data"
    if not (data / "synth.json").is_file():
        started = time.perf_counter()
        shutil.rmtree(data, ignore_errors=True)
        write_synthetic_dataset(data, **spec["synth"])
        record("synth", started)

    # 2. The untrained model with its autoencoder stage
    init = output / "init"
    if not (init / "model_index.json").is_file():
        started = time.perf_counter()
        pipe = _architectures()[spec["architecture"]](**spec.get("architecture_options", {}))
        if spec.get("autoencoder"):
            config = AutoencoderConfig(**spec["autoencoder"], progress=progress)
            resolution = (
                train_stages(spec)[0].get("resolution") or pipe.unet.config.sample_size * pipe.vae_scale_factor
            )
            with torch.random.fork_rng(devices=[]):
                train_autoencoder(pipe.vae, data / "train", resolution, config, log=output / "autoencoder_log.jsonl")
        staging = output / ".init.staging"
        shutil.rmtree(staging, ignore_errors=True)
        pipe.save_pretrained(staging, safe_serialization=True)
        staging.rename(init)
        record("autoencoder", started)

    # 3. MGIE's objective, stage by stage; a finished earlier stage (its model directory written) is not redone
    stages = train_stages(spec)
    model = output / "model"
    source = init
    for number, stage in enumerate(stages, start=1):
        last = number == len(stages)
        stage_dir = model if last else output / "stages" / str(number)
        name = "train" if len(stages) == 1 else f"train_stage_{number}"
        if not last and (stage_dir / "model_index.json").is_file():
            source = stage_dir
            continue
        started = time.perf_counter()
        config = TrainingConfig(
            **stage,
            data=str(data / "train"),
            output_dir=str(stage_dir),
            model=str(source),
            # A resumed run continues the stage it stopped in; a later stage it had not reached starts afresh.
            resume=resume,
            progress=progress,
        )
        train(config, on_step=on_step)
        record(name if resume is None else f"{name}_resumed_{int(time.time())}", started)
        source = stage_dir
        resume = None
    return model
