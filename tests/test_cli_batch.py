"""``xmgie batch`` and ``xmgie migrate`` run as a user runs them, on the bundled example images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import inspect

from xmgie.cli import main
from xmgie.jobs.db import make_engine

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FAST = {"num_inference_steps": 2, "max_side": 64, "max_new_tokens": 16, "auto_mask": {"draws": 1}}


def xmgie(*args: str, cache_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xmgie.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={"XMGIE_CACHE_DIR": str(cache_dir), "XMGIE_MODEL": "tiny", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )


def write_manifest(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory: pytest.TempPathFactory, tiny_dir, model_cache):
    """One run of a manifest of two example images and a missing one, then a second run of the same manifest."""
    folder = tmp_path_factory.mktemp("batch")
    lines = [
        {"image": str(EXAMPLES / "chelsea.png"), "instruction": "a hat", "mask": str(EXAMPLES / "chelsea_mask.png")},
        {"image": str(EXAMPLES / "no_such_file.png"), "instruction": "anything", "seed": 5},
        {"image": str(EXAMPLES / "coffee.png"), "instruction": "add steam above the cup", "seed": 3},
    ]
    manifest = write_manifest(folder / "manifest.jsonl", [json.dumps({**line, "options": FAST}) for line in lines])
    out = folder / "out"
    first = xmgie("batch", str(manifest), "--output-dir", str(out), "--model", "tiny", cache_dir=model_cache)
    outputs = sorted(out.glob("[0-9]*_*.png"))
    mtimes = {path: path.stat().st_mtime_ns for path in outputs}
    results = (out / "results.jsonl").read_text() if first.returncode in (0, 1) else ""
    second = xmgie("batch", str(manifest), "--output-dir", str(out), "--model", "tiny", cache_dir=model_cache)
    return {"out": out, "first": first, "second": second, "mtimes": mtimes, "results": results}


def test_batch_writes_outputs_results_and_a_contact_sheet(batch_run):
    first, out = batch_run["first"], batch_run["out"]
    assert first.returncode == 1, first.stderr  # one item failed
    assert "2 succeeded, 1 failed, 0 canceled of 3" in first.stdout
    assert "edited 2 item(s)" in first.stdout
    assert Image.open(out / "0_chelsea.png").size == Image.open(EXAMPLES / "chelsea.png").size
    assert Image.open(out / "2_coffee.png").size == Image.open(EXAMPLES / "coffee.png").size
    assert Image.open(out / "0_chelsea_mask.png").size == Image.open(EXAMPLES / "chelsea.png").size
    results = [json.loads(line) for line in batch_run["results"].splitlines()]
    assert [result["index"] for result in results] == [0, 1, 2]
    assert [result["status"] for result in results] == ["succeeded", "failed", "succeeded"]
    assert results[1]["error_code"] == "image_not_found"
    assert all(result["expressive_instruction"] for result in (results[0], results[2]))
    assert results[0]["preservation"] is not None
    # The user's mask makes the edit local; its fraction is the mask's area.
    user_mask = np.asarray(Image.open(EXAMPLES / "chelsea_mask.png").convert("L")) > 127
    assert results[0]["edit_scope"] == "local"
    assert results[0]["mask_fraction"] == pytest.approx(user_mask.mean(), abs=0.01)
    assert results[2]["edit_scope"] in {"local", "global"} and 0.0 < results[2]["mask_fraction"] <= 1.0
    assert results[1]["edit_scope"] is None
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.height >= 3 * 256


def test_a_second_run_of_the_same_manifest_redoes_nothing(batch_run):
    second, out = batch_run["second"], batch_run["out"]
    assert second.returncode == 1, second.stderr
    assert "(resumed): edited 0 item(s)" in second.stdout
    assert (out / "results.jsonl").read_text() == batch_run["results"]
    assert {path: path.stat().st_mtime_ns for path in batch_run["mtimes"]} == batch_run["mtimes"]


def test_a_bad_manifest_line_exits_2_naming_it(tmp_path, capsys):
    good = json.dumps({"image": str(EXAMPLES / "coffee.png"), "instruction": "x"})
    manifest = write_manifest(tmp_path / "bad.jsonl", [good, '{"image": "coffee.png", "instruction": ', good])
    assert main(["batch", str(manifest), "--output-dir", str(tmp_path / "out")]) == 2
    assert f"{manifest}:2: invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_migrate_creates_the_schema(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'db' / 'jobs.db'}"
    assert main(["migrate", "--database-url", url]) == 0
    engine = make_engine(url)
    try:
        assert {"jobs", "items", "tenants"} <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert "newest schema" in capsys.readouterr().out
