"""``xmgie.jobs.batch`` in-process with a recording editor: manifests, resume, missing files and the outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from xmgie.jobs.batch import ManifestError, batch_settings, read_manifest, run_batch
from xmgie.jobs.editor import EditRequest, EditResult

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class RecordingEditor:
    """Inverts each image and records how many items it edited."""

    def __init__(self) -> None:
        self.edited = 0

    def edit(self, requests: list[EditRequest]) -> list[EditResult]:
        self.edited += len(requests)
        return [
            EditResult(image=Image.eval(request.image, lambda value: 255 - value), mask=request.mask)
            for request in requests
        ]


def write_manifest(folder: Path, lines: list[object]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("chelsea.png", "chelsea_mask.png", "coffee.png"):
        shutil.copy(EXAMPLES / name, folder / name)
    path = folder / "manifest.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


ITEMS = [
    {"image": "chelsea.png", "instruction": "add a hat", "mask": "chelsea_mask.png", "seed": 1},
    {"image": "missing.png", "instruction": "anything", "seed": 2},
    {"image": "coffee.png", "instruction": "add steam", "seed": 3, "options": {"num_inference_steps": 4}},
]


def test_run_writes_outputs_results_and_sheet_and_resumes_without_redoing(tmp_path, monkeypatch):
    monkeypatch.delenv("XMGIE_DATABASE_URL", raising=False)
    monkeypatch.delenv("XMGIE_STORAGE_URL", raising=False)
    manifest = write_manifest(tmp_path / "in", ITEMS)
    out = tmp_path / "out"
    settings = batch_settings(out, micro_batch_size=2)
    editor = RecordingEditor()

    report = run_batch(manifest, out, settings=settings, editor=editor, steps=2, max_side=64, quiet=True)

    assert editor.edited == 2 and report.edited == 2 and not report.resumed
    assert report.counts["succeeded"] == 2 and report.counts["failed"] == 1
    assert (out / ".xmgie" / "jobs.db").is_file()
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [result["status"] for result in results] == ["succeeded", "failed", "succeeded"]
    assert results[1]["error_code"] == "image_not_found" and "missing.png" in results[1]["error_message"]
    assert Image.open(out / "0_chelsea.png").size == Image.open(EXAMPLES / "chelsea.png").size
    assert (out / "0_chelsea_mask.png").is_file() and not (out / "2_coffee_mask.png").exists()
    assert Image.open(out / "contact_sheet.png").height > 3 * 256

    mtimes = {path.name: path.stat().st_mtime_ns for path in out.glob("[0-9]*_*.png")}
    again = run_batch(manifest, out, settings=settings, editor=editor, steps=2, max_side=64, quiet=True)

    assert again.resumed and again.job_id == report.job_id
    assert editor.edited == 2 and again.edited == 0
    assert [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()] == results
    assert {path.name: path.stat().st_mtime_ns for path in out.glob("[0-9]*_*.png")} == mtimes


def test_overrides_fill_only_missing_options(tmp_path):
    entries = read_manifest(write_manifest(tmp_path, ITEMS), steps=2, max_side=64)
    assert entries[0].options == {"num_inference_steps": 2, "max_side": 64}
    assert entries[2].options == {"num_inference_steps": 4, "max_side": 64}
    assert entries[0].mask_path == tmp_path / "chelsea_mask.png"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{not json", "invalid JSON"),
        ({"image": "chelsea.png"}, "missing required key(s): instruction"),
        ({"image": "chelsea.png", "instruction": "x", "colour": 1}, "unknown key(s): colour"),
        ({"image": "chelsea.png", "instruction": "x", "options": {"num_inference_steps": 0}}, "num_inference_steps"),
        ({"image": "chelsea.png", "instruction": "x", "seed": -1}, "seed"),
    ],
)
def test_bad_lines_are_named_and_nothing_runs(tmp_path, line, expected):
    manifest = write_manifest(tmp_path / "in", [ITEMS[0], "", line])
    with pytest.raises(ManifestError) as raised:
        read_manifest(manifest)
    assert raised.value.problems[0][0] == 3
    assert expected in raised.value.problems[0][1]
    with pytest.raises(ManifestError):
        run_batch(manifest, tmp_path / "out", settings=batch_settings(tmp_path / "out"), editor=RecordingEditor())
    assert not (tmp_path / "out").exists()
