"""The tiny preset: written once in the real format, loaded through the real path, deterministic."""

from __future__ import annotations

import json

import pytest
import torch

from xmgie.loading.directory import COMPONENTS, ModelDirectoryError, load_pipeline, model_info, resolve_model_dir
from xmgie.loading.tiny import build_tiny_pipeline, ensure_tiny


def test_preset_is_written_in_the_pipeline_format_with_safetensors(tiny_dir):
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "XMGIEPipeline"
    assert index["edit_head"] == ["xmgie.editing.edit_head", "EditMapper"]
    for name in COMPONENTS:
        assert (tiny_dir / name).is_dir(), name
    for name in ("mllm", "edit_head", "unet", "vae"):
        assert list((tiny_dir / name).glob("*.safetensors")), name
        assert not list((tiny_dir / name).glob("*.bin")), name
    assert (tiny_dir / "tokenizer" / "tokenizer.json").is_file()


def test_preset_is_created_once(tiny_dir, model_cache):
    stamp = (tiny_dir / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny(model_cache) == tiny_dir
    assert (tiny_dir / "model_index.json").stat().st_mtime_ns == stamp
    assert [p.name for p in model_cache.iterdir() if p.name.startswith(".")] == []


def test_loaded_preset_equals_the_seeded_build(tiny_pipe):
    built = build_tiny_pipeline()
    for name in ("mllm", "edit_head", "unet", "vae"):
        loaded_state = getattr(tiny_pipe, name).state_dict()
        for key, value in getattr(built, name).state_dict().items():
            assert torch.equal(loaded_state[key], value), f"{name}.{key}"
    assert built.tokenizer.convert_tokens_to_ids("[IMG0]") == tiny_pipe.tokenizer.convert_tokens_to_ids("[IMG0]")
    assert type(tiny_pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"


def test_loading_honours_dtype(tiny_dir, model_cache):
    pipe = load_pipeline(tiny_dir, cache_dir=model_cache, device="cpu", dtype=torch.bfloat16)
    assert pipe.unet.dtype == pipe.mllm.dtype == pipe.edit_head.dtype == torch.bfloat16


def test_model_info_describes_the_directory(tiny_dir, model_cache):
    info = model_info(tiny_dir, model_cache)
    assert info["unet_in_channels"] == 8
    assert info["img_token_ids"] == list(range(info["vocab_size"] - 8, info["vocab_size"]))
    assert info["components"]["edit_head"]["parameters"] > 0


def test_bad_model_directories_are_named(tmp_path, model_cache):
    with pytest.raises(ModelDirectoryError, match="does not exist"):
        resolve_model_dir(tmp_path / "nope", model_cache)
    with pytest.raises(ModelDirectoryError, match="no model_index.json"):
        resolve_model_dir(tmp_path, model_cache)
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelDirectoryError, match="mllm"):
        resolve_model_dir(tmp_path, model_cache)
