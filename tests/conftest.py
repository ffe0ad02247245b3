"""Shared fixtures: the tiny preset is written once per test session and loaded from disk."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# Commands and services default to the trained mini preset; tests that do not name a model use the fast tiny one
# (tests/loading/test_mini.py covers mini itself).
os.environ.setdefault("XMGIE_MODEL", "tiny")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory):
    """A cache folder private to this test session."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def tiny_dir(model_cache):
    """The tiny preset's directory, written through the same path users get on first use."""
    from xmgie.loading.tiny import ensure_tiny

    return ensure_tiny(model_cache)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_dir, model_cache):
    """The tiny pipeline loaded from disk on the CPU in float32."""
    import torch

    from xmgie.loading.directory import load_pipeline

    return load_pipeline(tiny_dir, cache_dir=model_cache, device="cpu", dtype=torch.float32)


def gradient_image(width: int = 64, height: int = 64, phase: float = 0.0) -> Image.Image:
    """A smooth synthetic RGB picture with structure in every channel."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 0.5 + 0.5 * np.sin(x / max(width, 1) * 6.0 + phase)
    g = 0.5 + 0.5 * np.cos(y / max(height, 1) * 5.0 - phase)
    b = (x + y) / (width + height)
    return Image.fromarray((np.stack([r, g, b], axis=-1) * 255).round().astype(np.uint8), "RGB")


def synthetic_release(unet, image_embed_dim: int = 20, num_tokens: int = 4) -> dict:
    """Random weights in ``ip-adapter_sd15.bin``'s nested layout, numbered over all attention processors."""
    generator = torch.Generator().manual_seed(1)
    cross = unet.config.cross_attention_dim
    image_proj = {
        "proj.weight": torch.randn(num_tokens * cross, image_embed_dim, generator=generator),
        "proj.bias": torch.randn(num_tokens * cross, generator=generator),
        "norm.weight": torch.randn(cross, generator=generator),
        "norm.bias": torch.randn(cross, generator=generator),
    }
    ip_adapter = {}
    for index, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
            ip_adapter[f"{index}.to_k_ip.weight"] = torch.randn(hidden, cross, generator=generator)
            ip_adapter[f"{index}.to_v_ip.weight"] = torch.randn(hidden, cross, generator=generator)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}
