"""Loading and describing model directories (the ``DiffusionPipeline.save_pretrained`` layout)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from xmgie.editing.pipeline import XMGIEPipeline
from xmgie.loading.mini import MINI, MINI_DIR
from xmgie.loading.tiny import ensure_tiny

logger = logging.getLogger(__name__)

TINY = "tiny"
OFFLOAD_MODES = ("none", "model", "mllm")
"""``none``: every component on the device; ``model``: diffusers' model CPU offload (each component visits the
device for its stage); ``mllm``: the MLLM visits the device for the instruction stage, the rest stays there."""
COMPONENTS = ("mllm", "tokenizer", "feature_extractor", "edit_head", "unet", "vae", "scheduler")
OPTIONAL_COMPONENTS = ("image_encoder", "identity_adapter")


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
    """The directory of ``model``: a path, the ``mini`` preset (trained weights in the package, where installed)
    or the ``tiny`` preset (written under ``cache_dir`` on first use)."""
    if str(model) == TINY:
        return ensure_tiny(cache_dir)
    if str(model) == MINI:
        if not (MINI_DIR / "model_index.json").is_file():
            raise ModelDirectoryError(
                f"the mini preset is missing from this installation ({MINI_DIR}); train it with "
                "`xmgie train --recipe mini --output-dir DIR` and pass --model DIR/model"
            )
        model = MINI_DIR
    path = Path(model)
    if not path.is_dir():
        raise ModelDirectoryError(f"model directory {str(path)!r} does not exist (or pass 'mini' or 'tiny')")
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
    offload: str = "none",
) -> XMGIEPipeline:
    """Load a pipeline from a model directory or a preset (``mini``, ``tiny``), offline, onto ``device`` in ``dtype``.

    ``offload`` (one of :data:`OFFLOAD_MODES`) keeps weights on the CPU while their stage is not running; the
    weights load on the CPU and only what the mode keeps resident moves to ``device``, so a card smaller than the
    whole model can load it. On the CPU every mode is the same (nothing to offload to).
    """
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {offload!r}")
    path = resolve_model_dir(model, cache_dir)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    pipe = XMGIEPipeline.from_pretrained(path, dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if offload == "none" or device.type == "cpu":
        if offload != "none":
            logger.info("offload=%s has no effect on the CPU: the whole model is already there", offload)
        return pipe.to(device)
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_mllm_offload(device)
    return pipe


def module_bytes(module: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of ``module``'s parameters and buffers with floating-point tensors in ``dtype`` (default: as they are).

    Integer and boolean buffers keep their own width, as ``module.to(dtype)`` leaves them; tensors shared between
    submodules (tied embeddings) count once. Works on the meta device: only shapes are read.
    """
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        width = dtype.itemsize if dtype is not None and tensor.is_floating_point() else tensor.element_size()
        total += tensor.numel() * width
    return total


def component_bytes(pipe: XMGIEPipeline, dtype: torch.dtype | None = None) -> dict[str, int]:
    """Weight bytes of each of ``pipe``'s model components (those with weights) in ``dtype``."""
    return {
        name: module_bytes(component, dtype)
        for name, component in pipe.components.items()
        if isinstance(component, torch.nn.Module)
    }


def model_info(
    model: str | os.PathLike, cache_dir: str | os.PathLike, dtype: torch.dtype = torch.float16
) -> dict[str, Any]:
    """A summary of a model directory: components, classes, parameter counts, the bytes each component's weights
    need in ``dtype`` and their total, and the key shapes."""
    path = resolve_model_dir(model, cache_dir)
    index = json.loads((path / "model_index.json").read_text())
    pipe = XMGIEPipeline.from_pretrained(path, dtype=dtype, local_files_only=True)
    info: dict[str, Any] = {"path": str(path), "dtype": str(dtype).removeprefix("torch."), "components": {}}
    sizes = component_bytes(pipe, dtype)
    for name in COMPONENTS + OPTIONAL_COMPONENTS:
        component = getattr(pipe, name, None)
        if component is None:
            continue
        entry: dict[str, Any] = {"class": index[name][1]}
        if isinstance(component, torch.nn.Module):
            entry["parameters"] = sum(p.numel() for p in component.parameters())
            entry["bytes"] = sizes[name]
        info["components"][name] = entry
    info["total_bytes"] = sum(sizes.values())
    text = pipe.mllm.config.text_config
    info["mllm_hidden_size"] = text.hidden_size
    info["vocab_size"] = len(pipe.tokenizer)
    info["img_token_ids"] = pipe.tokenizer.convert_tokens_to_ids([f"[IMG{i}]" for i in range(8)])
    info["unet_in_channels"] = pipe.unet.config.in_channels
    info["cross_attention_dim"] = pipe.unet.config.cross_attention_dim
    info["scheduler"] = type(pipe.scheduler).__name__
    return info
