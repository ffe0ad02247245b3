"""Offload modes and weight bytes from the outside: XMGIE_OFFLOAD, the worker's editor, `xmgie edit --offload`,
`xmgie model info --dtype`."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from tests.conftest import gradient_image
from xmgie.cli import main
from xmgie.editing.pipeline import XMGIEPipeline
from xmgie.jobs.editor import EditRequest, lazy_pipeline_editor
from xmgie.jobs.settings import Settings
from xmgie.loading.directory import load_pipeline, model_info


def test_offload_setting_is_read_from_the_environment_and_checked(monkeypatch):
    assert Settings().offload == "none"
    monkeypatch.setenv("XMGIE_OFFLOAD", "mllm")
    assert Settings().offload == "mllm"
    monkeypatch.setenv("XMGIE_OFFLOAD", "gpu")
    with pytest.raises(ValidationError, match="offload"):
        Settings()


def test_the_workers_editor_loads_with_the_settings_offload_mode(monkeypatch, tiny_dir, model_cache):
    calls = []

    def recording_load(model, **kwargs):
        calls.append(kwargs["offload"])
        return load_pipeline(model, **kwargs)

    monkeypatch.setattr("xmgie.loading.directory.load_pipeline", recording_load)
    editor = lazy_pipeline_editor(Settings(model=str(tiny_dir), model_cache_dir=model_cache, offload="model"))
    assert editor.offload == "model" and not editor.loaded
    (result,) = editor.edit(
        [EditRequest(image=gradient_image(32, 32), instruction="make it snow", options=_fast_options(), seed=3)]
    )
    assert calls == ["model"] and editor.loaded
    assert result.image.size == (32, 32)


def _fast_options():
    from xmgie.editing.options import EditOptions

    return EditOptions(num_inference_steps=1, max_new_tokens=9)


def test_offload_is_a_no_op_on_the_cpu_and_refuses_unknown_modes(tiny_dir, model_cache):
    for mode in ("model", "mllm"):
        pipe = load_pipeline(tiny_dir, cache_dir=model_cache, device="cpu", dtype=torch.float32, offload=mode)
        assert not getattr(pipe, "_all_hooks", None) and pipe._mllm_offload_device is None
        assert pipe._execution_device == torch.device("cpu")
    with pytest.raises(ValueError, match="offload must be one of none, model, mllm"):
        load_pipeline(tiny_dir, cache_dir=model_cache, device="cpu", offload="sequential")


@pytest.mark.parametrize(("mode", "method"), [("model", "enable_model_cpu_offload"), ("mllm", "enable_mllm_offload")])
def test_on_an_accelerator_the_weights_load_on_the_cpu_and_the_mode_places_them(
    monkeypatch, tiny_dir, model_cache, mode, method
):
    # No accelerator here: record the call instead of placing weights on it. The pipeline must not have been moved
    # to the device before (a card smaller than the model could not hold it).
    placed = []
    monkeypatch.setattr(XMGIEPipeline, method, lambda self, *args, **kwargs: placed.append((args, kwargs)))
    pipe = load_pipeline(tiny_dir, cache_dir=model_cache, device="cuda", dtype=torch.float16, offload=mode)
    assert len(placed) == 1 and torch.device("cuda") in [*placed[0][0], *placed[0][1].values()]
    assert {parameter.device.type for parameter in pipe.unet.parameters()} == {"cpu"}
    assert pipe.unet.dtype == torch.float16


def test_model_info_reports_the_bytes_of_each_component_in_the_dtype(tiny_dir, model_cache, tiny_pipe):
    half = model_info(tiny_dir, model_cache, dtype=torch.float16)
    single = model_info(tiny_dir, model_cache, dtype=torch.float32)
    assert half["dtype"] == "float16" and single["dtype"] == "float32"
    weighted = {"mllm", "edit_head", "unet", "vae", "image_encoder", "identity_adapter"}
    assert {name for name, entry in half["components"].items() if "bytes" in entry} == weighted
    for name in weighted:
        module = getattr(tiny_pipe, name)
        floats = sum(t.numel() for t in [*module.parameters(), *module.buffers()] if t.is_floating_point())
        others = sum(t.numel() * t.element_size() for t in module.buffers() if not t.is_floating_point())
        assert half["components"][name]["bytes"] == 2 * floats + others, name
        assert single["components"][name]["bytes"] == 4 * floats + others, name
    assert half["total_bytes"] == sum(half["components"][name]["bytes"] for name in weighted)


def test_cli_model_info_dtype_and_edit_offload(tmp_path, model_cache, capsys):
    assert main(["model", "info", "tiny", "--dtype", "bf16", "--cache-dir", str(model_cache)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dtype"] == "bfloat16"
    assert info["total_bytes"] == sum(entry.get("bytes", 0) for entry in info["components"].values()) > 0

    gradient_image(32, 32).save(tmp_path / "in.png")
    args = ["edit", str(tmp_path / "in.png"), "--instruction", "make it snow", "--steps", "1", "--seed", "1"]
    args += ["--device", "cpu", "--cache-dir", str(model_cache)]
    assert main([*args, "--output", str(tmp_path / "plain.png")]) == 0
    assert main([*args, "--output", str(tmp_path / "off.png"), "--offload", "model"]) == 0
    assert (tmp_path / "plain.png").read_bytes() == (tmp_path / "off.png").read_bytes()
    with pytest.raises(SystemExit) as refused:
        main([*args, "--output", str(tmp_path / "x.png"), "--offload", "disk"])
    assert refused.value.code == 2 and "--offload" in capsys.readouterr().err
