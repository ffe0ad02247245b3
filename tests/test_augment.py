"""``xmgie augment``: an incremental augmentation run on the embedded defaults, loaded back with ``datasets``.

One test runs the command with the tiny model; the others run ``run_augment`` with the no-op editor, since they
are about what is planned, stored and published, not about the edits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.conftest import gradient_image
from xmgie.cli import main
from xmgie.jobs import runs
from xmgie.jobs.augment import (
    EXIT_SOME_FAILED,
    NEVER_SECONDS,
    SCHEDULE_NAME,
    InstructionsError,
    read_instructions,
    run_augment,
)
from xmgie.jobs.batch import batch_settings
from xmgie.jobs.db import make_engine, make_session_factory
from xmgie.jobs.editor import NoOpEditor
from xmgie.jobs.models import Schedule
from xmgie.jobs.schedules import derived_seed

FAST = {"max_new_tokens": 16, "auto_mask": {"draws": 1}}


@pytest.fixture(autouse=True)
def embedded_defaults(monkeypatch):
    """The state goes under the output folder, whatever the environment says."""
    monkeypatch.delenv("XMGIE_DATABASE_URL", raising=False)
    monkeypatch.delenv("XMGIE_STORAGE_URL", raising=False)


def add_images(folder: Path, names: list[str]) -> None:
    for number, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        gradient_image(48, 40, phase=float(len(name) + number)).save(path)


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]


def load(out: Path, cache: Path):
    from datasets import load_dataset

    return load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(cache))


def schedule_of(out: Path) -> Schedule:
    engine = make_engine(f"sqlite:///{out / '.xmgie' / 'jobs.db'}")
    try:
        with make_session_factory(engine)() as session:
            return session.execute(select(Schedule).where(Schedule.name == SCHEDULE_NAME)).scalar_one()
    finally:
        engine.dispose()


def augment(source: Path, instructions: Path, out: Path, editor: NoOpEditor, variants: int = 2):
    return run_augment(
        source,
        instructions,
        out,
        settings=batch_settings(out, micro_batch_size=4),
        variants=variants,
        editor=editor,
        steps=2,
        max_side=64,
        quiet=True,
    )


def test_the_command_with_the_tiny_model_writes_a_dataset_that_datasets_loads(tmp_path, tiny_dir, model_cache, capsys):
    source, out = tmp_path / "source", tmp_path / "out"
    add_images(source, ["cat.png", "nested/dog.png"])
    (source / "broken.png").write_bytes(b"this is not an image")
    instructions = tmp_path / "instructions.jsonl"
    instructions.write_text(json.dumps({"instruction": "make it snowy", "options": FAST}) + "\n")

    code = main(
        [
            "augment",
            str(source),
            "--instructions",
            str(instructions),
            "--variants",
            "1",
            "--output-dir",
            str(out),
            "--steps",
            "2",
            "--max-side",
            "64",
            "--model",
            "tiny",
            "--device",
            "cpu",
            "--cache-dir",
            str(model_cache),
        ]
    )

    printed = capsys.readouterr().out
    assert code == EXIT_SOME_FAILED, printed
    assert "3 image(s)" in printed
    assert "2 new output(s) made, 1 failed, 0 skipped" in printed
    assert "broken.png" in printed and "not_an_image" in printed
    assert f"2 row(s) in {out / 'metadata.jsonl'}" in printed

    rows = rows_of(out)
    assert sorted(row["source_key"].rsplit("/source/", 1)[1] for row in rows) == ["cat.png", "nested/dog.png"]
    assert all((out / row["file_name"]).is_file() for row in rows)
    # The hidden state folder holds PNGs too (sources, job outputs, the dataset's copy): the loader must skip it.
    assert list((out / ".xmgie").rglob("*.png"))
    dataset = load(out, tmp_path / "hf-cache")
    assert dataset.num_rows == 2
    assert {"image", "source_key", "instruction", "expressive_instruction", "seed", "identity_score"} <= set(
        dataset.column_names
    )
    assert set(dataset["instruction"]) == {"make it snowy"}
    assert all(text for text in dataset["expressive_instruction"])
    assert all(isinstance(score, float) for score in dataset["identity_score"])
    assert set(dataset["edit_scope"]) <= {"local", "global"} and len(dataset["edit_scope"]) == 2
    assert all(0.0 < fraction <= 1.0 for fraction in dataset["mask_fraction"])
    assert all(
        (scope == "global") == (fraction == 1.0)
        for scope, fraction in zip(dataset["edit_scope"], dataset["mask_fraction"], strict=True)
    )
    keys = [key.rsplit("/", 1)[1] for key in dataset["source_key"]]
    sizes = {key: image.size for key, image in zip(keys, dataset["image"], strict=True)}
    assert sizes == {"cat.png": (48, 40), "dog.png": (48, 40)}


def test_runs_are_incremental_and_seeds_stable_across_calls(tmp_path):
    source, out = tmp_path / "source", tmp_path / "out"
    add_images(source, ["a.png", "sub/b.jpg"])
    (source / "notes.txt").write_text("not an image")
    add_images(source / ".hidden", ["c.png"])
    instructions = tmp_path / "instructions.txt"
    instructions.write_text("# what to do\nmake it snowy\n\nturn day into night\n")
    editor = NoOpEditor()

    first = augment(source, instructions, out, editor)
    assert (first.source_images, first.made, first.failed, first.skipped) == (2, 2 * 2 * 2, [], 0)
    assert first.schedule_state == "created" and first.dataset_rows == 8
    first_rows = rows_of(out)
    schedule = schedule_of(out)
    assert (schedule.enabled, schedule.interval_seconds, schedule.cron) == (False, NEVER_SECONDS, None)
    for row in first_rows:
        assert row["seed"] == derived_seed(schedule.id, row["source_key"], row["instruction"], row["variant"])
    assert len({row["seed"] for row in first_rows}) == 8

    # Unchanged: nothing is planned or edited, and the folder is left as it is.
    files = {path: path.stat().st_mtime_ns for path in out.rglob("*") if ".xmgie" not in path.parts}
    calls = editor.calls
    unchanged = augment(source, instructions, out, editor)
    assert (unchanged.made, unchanged.skipped, unchanged.stored_sources, unchanged.schedule_state) == (0, 8, 0, "same")
    assert editor.calls == calls and rows_of(out) == first_rows
    assert {path: path.stat().st_mtime_ns for path in files} == files

    # Two new images: exactly their outputs are made; the earlier rows stay as they were.
    add_images(source, ["c.png", "sub/deeper/d.webp"])
    grown = augment(source, instructions, out, editor)
    assert (grown.source_images, grown.stored_sources, grown.made, grown.skipped) == (4, 2, 2 * 2 * 2, 8)
    grown_rows = rows_of(out)
    assert len(grown_rows) == 16 and all(row in grown_rows for row in first_rows)
    assert {row["source_key"].rsplit("/", 1)[1] for row in grown_rows if row not in first_rows} == {"c.png", "d.webp"}

    # Changed instructions: every image is augmented again; earlier outputs keep their rows.
    instructions.write_text("make it snowy\nadd fog\n")
    changed = augment(source, instructions, out, editor)
    assert (changed.schedule_state, changed.made, changed.skipped) == ("changed", 4 * 2 * 2, 0)
    final_rows = rows_of(out)
    assert len(final_rows) == 32 and all(row in final_rows for row in grown_rows)
    seeds: dict[tuple, set[int]] = {}
    for row in final_rows:
        assert row["seed"] == derived_seed(schedule.id, row["source_key"], row["instruction"], row["variant"])
        seeds.setdefault((row["source_key"], row["instruction"], row["variant"]), set()).add(row["seed"])
    # The instruction kept across the change has the same seed for the same image and variant, in both sets.
    assert all(len(values) == 1 for values in seeds.values())
    assert sum(key[1] == "make it snowy" for key in seeds) == 4 * 2

    # A source image removed from the folder leaves the stored source, not the dataset.
    (source / "a.png").unlink()
    shrunk = augment(source, instructions, out, editor)
    assert (shrunk.source_images, shrunk.removed_sources, shrunk.made) == (3, 1, 0)
    assert rows_of(out) == final_rows

    dataset = load(out, tmp_path / "hf-cache")
    assert dataset.num_rows == 32
    assert all((out / row["file_name"]).is_file() for row in final_rows)
    assert schedule_of(out).id == schedule.id
    engine = make_engine(f"sqlite:///{out / '.xmgie' / 'jobs.db'}")
    try:
        # The schedule is disabled: the service's dispatcher would never fire it by itself.
        assert runs.fire_due_schedules(session_factory=make_session_factory(engine)) == []
    finally:
        engine.dispose()


def test_a_corrupt_image_fails_alone_and_is_not_retried(tmp_path):
    source, out = tmp_path / "source", tmp_path / "out"
    add_images(source, ["good.png"])
    (source / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    instructions = tmp_path / "instructions.txt"
    instructions.write_text("make it snowy\n")
    editor = NoOpEditor()

    report = augment(source, instructions, out, editor, variants=1)

    assert report.made == 1 and [failure.source for failure in report.failed] == ["corrupt.png"]
    assert report.failed[0].code in {"not_an_image", "truncated_image"}
    assert [row["source_key"].rsplit("/", 1)[1] for row in rows_of(out)] == ["good.png"]
    again = augment(source, instructions, out, editor, variants=1)
    assert (again.made, again.failed, again.skipped) == (0, [], 2)


def test_items_left_by_a_stopped_call_are_done_by_the_next(tmp_path):
    source, out = tmp_path / "source", tmp_path / "out"
    add_images(source, ["a.png"])
    instructions = tmp_path / "instructions.txt"
    instructions.write_text("make it snowy\n")
    editor = NoOpEditor()
    augment(source, instructions, out, editor, variants=1)
    add_images(source, ["b.png"])
    augment(source, instructions, out, editor, variants=1)  # stores b.png and augments it
    add_images(source, ["c.png"])
    # Stand-in for a call stopped after its run had started: sources stored, job created, nothing edited.
    from xmgie.jobs.augment import source_images, sync_source
    from xmgie.jobs.storage import LocalStorage

    schedule = schedule_of(out)
    storage = LocalStorage(out / ".xmgie" / "storage")
    sync_source(storage, schedule.source_prefix, source_images(source))
    engine = make_engine(f"sqlite:///{out / '.xmgie' / 'jobs.db'}")
    try:
        session_factory = make_session_factory(engine)
        with session_factory() as session, session.begin():
            run_id = runs.fire_now(session=session, schedule_id=schedule.id).id
        stopped = runs.start_run(session_factory=session_factory, storage=storage, run_id=run_id, max_items=100)
    finally:
        engine.dispose()
    assert len(stopped.item_ids) == 1

    report = augment(source, instructions, out, editor, variants=1)

    assert (report.resumed, report.made, report.skipped, report.unfinished) == (1, 1, 2, 0)
    assert sorted(row["source_key"].rsplit("/", 1)[1] for row in rows_of(out)) == ["a.png", "b.png", "c.png"]


def test_instruction_files_plain_and_jsonl(tmp_path):
    plain = tmp_path / "instructions.txt"
    plain.write_text("# comment\n  make it snowy  \n\nadd fog\n")
    assert [entry.instruction for entry in read_instructions(plain, {}, 1000)] == ["make it snowy", "add fog"]
    jsonl = tmp_path / "instructions.jsonl"
    jsonl.write_text('{"instruction": "make it snowy", "options": {"num_inference_steps": 3}}\n"add fog"\n')
    parsed = read_instructions(jsonl, {"max_side": 64}, 1000)
    assert [(entry.instruction, entry.options) for entry in parsed] == [
        ("make it snowy", {"num_inference_steps": 3}),
        ("add fog", {}),
    ]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"instruction": "ok"}\n{"instruction": \n{"instruction": "x", "options": {"no_such_option": 1}}\n'
        '{"instruction": "   "}\n{"instruction": "ok"}\n'
    )
    with pytest.raises(InstructionsError) as raised:
        read_instructions(bad, {}, 1000)
    assert [number for number, _message in raised.value.problems] == [2, 3, 4, 5]
    text = str(raised.value)
    assert f"{bad}:2: invalid JSON" in text and f"{bad}:4: empty_instruction" in text
    assert f"{bad}:5: duplicate_instruction" in text and "line 1" in text

    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    with pytest.raises(InstructionsError, match="empty_instructions"):
        read_instructions(empty, {}, 1000)


def test_the_command_refuses_bad_input_before_creating_anything(tmp_path, capsys):
    source, out = tmp_path / "source", tmp_path / "out"
    add_images(source, ["a.png"])
    bad = tmp_path / "bad.txt"
    bad.write_text("make it snowy\n" + "x" * 2000 + "\n")
    assert main(["augment", str(source), "--instructions", str(bad), "--output-dir", str(out)]) == 2
    assert f"{bad}:2: instruction_too_long" in capsys.readouterr().err

    good = tmp_path / "good.txt"
    good.write_text("make it snowy\n")
    arguments = ["--instructions", str(good), "--output-dir", str(out), "--device", "cpu"]
    assert main(["augment", str(source), *arguments, "--variants", "0"]) == 2
    assert "invalid_variants" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["augment", str(empty), *arguments]) == 2
    assert "no images in" in capsys.readouterr().err
    assert not out.exists()
