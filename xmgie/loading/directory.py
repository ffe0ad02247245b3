"""Loading and describing model directories (the ``DiffusionPipeline.save_pretrained`` layout)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from xmgie.editing.pipeline import XMGIEPipeline
from xmgie.loading.tiny import ensure_tiny

TINY = "tiny"
COMPONENTS = ("mllm", "tokenizer", "feature_extractor", "edit_head", "unet", "vae", "scheduler")


class ModelDirectoryError(ValueError):
    """A model directory that is missing, incomplete or not in this project's format."""


def default_device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on GPUs that support it, float16 on other GPUs, float32 on the CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_model_dir(model: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """The directory of ``model``: a path, or the ``tiny`` preset (written under ``cache_dir`` on first use)."""
    if str(model) == TINY:
        return ensure_tiny(cache_dir)
    path = Path(model)
    if not path.is_dir():
        raise ModelDirectoryError(f"model directory {str(path)!r} does not exist (or pass 'tiny')")
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelDirectoryError(f"{str(path)!r} has no model_index.json: not a model directory")
    missing = [name for name in COMPONENTS if not (path / name).is_dir()]
    if missing:
        raise ModelDirectoryError(f"model directory {str(path)!r} lacks component folder(s): {', '.join(missing)}")
    return path


def load_pipeline(
    model: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> XMGIEPipeline:
    """Load a pipeline from a model directory or the ``tiny`` preset, offline, onto ``device`` in ``dtype``."""
    path = resolve_model_dir(model, cache_dir)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    pipe = XMGIEPipeline.from_pretrained(path, dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def model_info(model: str | os.PathLike, cache_dir: str | os.PathLike) -> dict[str, Any]:
    """A summary of a model directory: components, classes, parameter counts and the key shapes."""
    path = resolve_model_dir(model, cache_dir)
    index = json.loads((path / "model_index.json").read_text())
    pipe = XMGIEPipeline.from_pretrained(path, local_files_only=True)
    info: dict[str, Any] = {"path": str(path), "components": {}}
    for name in COMPONENTS:
        component = getattr(pipe, name)
        entry: dict[str, Any] = {"class": index[name][1]}
        if isinstance(component, torch.nn.Module):
            entry["parameters"] = sum(p.numel() for p in component.parameters())
        info["components"][name] = entry
    text = pipe.mllm.config.text_config
    info["mllm_hidden_size"] = text.hidden_size
    info["vocab_size"] = len(pipe.tokenizer)
    info["img_token_ids"] = pipe.tokenizer.convert_tokens_to_ids([f"[IMG{i}]" for i in range(8)])
    info["unet_in_channels"] = pipe.unet.config.in_channels
    info["cross_attention_dim"] = pipe.unet.config.cross_attention_dim
    info["scheduler"] = type(pipe.scheduler).__name__
    return info
