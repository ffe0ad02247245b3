"""``xmgie augment``: one run of dataset augmentation on the embedded defaults, through the service's path.

The state lives where ``xmgie batch`` keeps it (``<output-dir>/.xmgie/``: a SQLite database and a storage folder, or
``XMGIE_DATABASE_URL`` / ``XMGIE_STORAGE_URL``). A call

1. mirrors the images of the source folder (recursively; hidden files and folders are skipped) into the local
   tenant's data space, ``data/<tenant>/source/<relative path>``, storing a file only when it is new or its bytes
   changed, and removing stored images whose file is gone;
2. creates or updates the one schedule of the folder (``SCHEDULE_NAME``): its instructions, variants and job
   options (``--steps``/``--max-side``). The schedule is disabled and its interval is ten years: it exists so the
   run is planned, seeded and published exactly as a scheduled run of the service is, but it never fires by itself
   (should ``xmgie beat`` ever be pointed at this database, the dispatcher passes it over); only this command fires
   it, with ``runs.fire_now``;
3. fires a run and starts it (``runs.start_run``: only the outputs not made yet under the schedule's fingerprint
   are planned, so an unchanged call plans nothing, new images get outputs, and changed instructions re-augment
   every image), processes its items in-process in micro-batches with ``process_items``, as a worker would, and
   publishes the run (images under ``data/<tenant>/dataset/`` and its ``metadata.jsonl``, covering every run);
4. mirrors the dataset into the output folder: each image copied when it changed, ``metadata.jsonl`` last, so the
   folder never holds a manifest naming a missing file. ``datasets.load_dataset("imagefolder", data_dir=...)``
   loads it (the loader skips the hidden ``.xmgie/`` folder).

Items of an earlier call that was stopped midway (queued, or running with an expired lease) are processed first.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from xmgie.editing.errors import EditInputError
from xmgie.jobs import runs
from xmgie.jobs.batch import (
    batch_settings,
    command_settings,
    copy_if_changed,
    local_state,
    local_tenant,
    process_locally,
)
from xmgie.jobs.editor import Editor, lazy_pipeline_editor
from xmgie.jobs.models import Augmentation, Item, Run, Schedule, utc_now
from xmgie.jobs.processing import ItemOutcome
from xmgie.jobs.schedules import (
    IMAGE_SUFFIXES,
    METADATA_FILE,
    Instruction,
    check_options,
    check_source_prefix,
    check_target_prefix,
    check_timing,
    check_variants,
    fingerprint,
    is_image_key,
    parse_instructions,
)
from xmgie.jobs.settings import Settings
from xmgie.jobs.statuses import ItemStatus
from xmgie.jobs.storage import ObjectNotFoundError, Storage, data_prefix

SCHEDULE_NAME = "augment"
"""Name of the local tenant's schedule that ``xmgie augment`` runs."""
NEVER_SECONDS = 10 * 365 * 24 * 3600
"""Interval of that schedule: a schedule needs a timing, and this one is disabled and fired by hand only."""
SOURCE_FOLDER = "source/"
DATASET_FOLDER = "dataset/"
EXIT_SOME_FAILED = 1
"""Exit status when an output failed or was left unfinished (as ``xmgie batch`` exits when an item failed)."""
MAX_LISTED_FAILURES = 20

SessionFactory = Callable[[], Session]


class InstructionsError(ValueError):
    """An instructions file that cannot be used; ``problems`` lists ``(line number, message)`` pairs."""

    def __init__(self, path: Path, problems: list[tuple[int, str]]) -> None:
        self.path = path
        self.problems = problems
        lines = "\n".join(f"{path}:{number}: {message}" for number, message in problems)
        super().__init__(f"instructions file {path} has {len(problems)} problem(s):\n{lines}")


@dataclass(frozen=True)
class FailedOutput:
    """One output of this call whose item failed."""

    source: str
    instruction: str
    variant: int
    code: str | None
    message: str | None


@dataclass
class AugmentReport:
    """What ``run_augment`` did."""

    schedule_id: uuid.UUID
    run_id: uuid.UUID
    job_id: uuid.UUID | None
    source_images: int
    stored_sources: int
    removed_sources: int
    instructions: int
    variants: int
    schedule_state: str
    """``created`` (first call), ``changed`` (instructions, variants or options differ: everything is redone) or
    ``same``."""
    made: int
    skipped: int
    resumed: int
    capped: bool
    unfinished: int
    dataset_rows: int
    metadata_path: Path
    seconds: float
    failed: list[FailedOutput] = field(default_factory=list)


# --- Inputs --------------------------------------------------------------------------------------------------------


def read_instructions(path: Path, job_options: dict[str, Any], max_chars: int) -> list[Instruction]:
    """The instructions of ``path``: plain text, one per line (blank lines and ``#`` lines skipped), or, for a
    ``.jsonl`` file, one JSON object ``{"instruction": ..., "options": {...}}`` per line.

    Each is checked with ``parse_instructions`` (the job options merged under its own); ``InstructionsError``
    names every bad line.
    """
    if not path.is_file():
        raise FileNotFoundError(f"instructions file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InstructionsError(path, [(0, f"not UTF-8 text: {error}")]) from error
    is_jsonl = path.suffix.lower() == ".jsonl"
    entries: list[tuple[int, Any]] = []
    problems: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not is_jsonl:
            entries.append((number, line))
            continue
        try:
            entries.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            problems.append((number, f"invalid JSON: {error.msg} (column {error.colno})"))
    seen: dict[str, int] = {}
    for number, entry in entries:
        try:
            (parsed,) = parse_instructions([entry], job_options, max_chars)
        except EditInputError as error:  # ScheduleError, or EditOptions' own invalid_option
            problems.append((number, _line_message(error)))
            continue
        except TypeError as error:
            problems.append((number, f"invalid_instruction: {error}"))
            continue
        canonical = json.dumps(parsed.as_dict(), sort_keys=True)
        if canonical in seen:
            problems.append((number, f"duplicate_instruction: same instruction and options as line {seen[canonical]}"))
        seen.setdefault(canonical, number)
    if problems:
        raise InstructionsError(path, problems)
    try:
        return parse_instructions([entry for _number, entry in entries], job_options, max_chars)
    except EditInputError as error:
        raise InstructionsError(path, [(0, f"{error.code}: {error.message}")]) from None


def _line_message(error: EditInputError) -> str:
    """``parse_instructions``' message for a one-element list, without its "instruction 0" numbering."""
    message = error.message.removeprefix("instruction 0: ").replace("instruction 0", "the instruction")
    return f"{error.code}: {message}"


def source_images(source_dir: Path, exclude: Path | None = None) -> dict[str, Path]:
    """Image files under ``source_dir`` by relative ``/``-path, sorted; hidden files and folders, names that are
    not safe storage keys, and the folder ``exclude`` (an output folder inside the source) are left out."""
    root = source_dir.absolute()
    excluded = exclude.resolve() if exclude is not None else None
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        folder = Path(dirpath)
        dirnames[:] = sorted(
            name for name in dirnames if not name.startswith(".") and (folder / name).resolve() != excluded
        )
        for name in sorted(filenames):
            path = folder / name
            relative = path.relative_to(root).as_posix()
            if not name.startswith(".") and is_image_key(relative) and path.is_file():
                found[relative] = path
    return found


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _stored_sha256(storage: Storage, key: str) -> str | None:
    """SHA-256 of the object under ``key`` (the one S3 recorded, else of its bytes); None when there is none."""
    recorded = getattr(storage, "sha256", None)
    try:
        if recorded is not None:
            value = recorded(key)
            if value is not None:
                return value
        return hashlib.sha256(storage.get_bytes(key)).hexdigest()
    except ObjectNotFoundError:
        return None


def sync_source(storage: Storage, prefix: str, files: dict[str, Path]) -> tuple[int, int]:
    """Make the objects under ``prefix`` mirror ``files``: store the new or changed ones, delete those whose file
    is gone; ``(stored, removed)``."""
    existing = set(storage.list_keys(prefix))
    stored = 0
    for relative, path in files.items():
        key = prefix + relative
        if key in existing and _stored_sha256(storage, key) == _file_sha256(path):
            continue
        storage.put_file(key, path)
        stored += 1
    gone = sorted(existing - {prefix + relative for relative in files})
    for key in gone:
        storage.delete(key)
    return stored, len(gone)


# --- The schedule and its runs -------------------------------------------------------------------------------------


def ensure_schedule(
    session_factory: SessionFactory,
    tenant_id: uuid.UUID,
    instructions: list[Instruction],
    variants: int,
    options: dict[str, Any],
) -> tuple[uuid.UUID, str]:
    """The id of the tenant's ``SCHEDULE_NAME`` schedule, created or updated to these settings; and ``created``,
    ``changed`` (its fingerprint changed) or ``same``."""
    source_prefix = check_source_prefix(data_prefix(tenant_id) + SOURCE_FOLDER, tenant_id)
    target_prefix = check_target_prefix(data_prefix(tenant_id) + DATASET_FOLDER, tenant_id)
    check_timing(None, NEVER_SECONDS, "UTC")
    stored = [instruction.as_dict() for instruction in instructions]
    with session_factory() as session, session.begin():
        schedule = session.execute(
            select(Schedule).where(Schedule.tenant_id == tenant_id, Schedule.name == SCHEDULE_NAME)
        ).scalar_one_or_none()
        if schedule is None:
            schedule = Schedule(
                tenant_id=tenant_id,
                name=SCHEDULE_NAME,
                cron=None,
                interval_seconds=NEVER_SECONDS,
                timezone="UTC",
                source_prefix=source_prefix,
                source_keys=None,
                instructions=stored,
                variants=variants,
                target_prefix=target_prefix,
                options=options,
                enabled=False,
            )
            session.add(schedule)
            session.flush()
            return schedule.id, "created"
        changed = fingerprint(schedule.instructions, schedule.variants, schedule.options) != fingerprint(
            stored, variants, options
        )
        wanted = {
            "instructions": stored,
            "variants": variants,
            "options": options,
            "source_prefix": source_prefix,
            "source_keys": None,
            "target_prefix": target_prefix,
            "enabled": False,
        }
        if any(getattr(schedule, name) != value for name, value in wanted.items()):
            for name, value in wanted.items():
                setattr(schedule, name, value)
            schedule.updated_at = utc_now()
        return schedule.id, "changed" if changed else "same"


def _unpublished_runs(session_factory: SessionFactory, schedule_id: uuid.UUID) -> list[uuid.UUID]:
    with session_factory() as session:
        query = (
            select(Run.id)
            .where(Run.schedule_id == schedule_id, Run.job_id.is_not(None), Run.published_at.is_(None))
            .order_by(Run.created_at)
        )
        return list(session.scalars(query))


def _open_items(session_factory: SessionFactory, schedule_id: uuid.UUID, *, runnable: bool) -> list[uuid.UUID]:
    """Items of the schedule's unpublished runs that are queued or running; with ``runnable``, only those this
    process may take (queued, or running with an expired lease: an earlier call that was stopped)."""
    now = utc_now()
    with session_factory() as session:
        condition = Item.status.in_([ItemStatus.QUEUED.value, ItemStatus.RUNNING.value])
        if runnable:
            condition = (Item.status == ItemStatus.QUEUED.value) | (
                (Item.status == ItemStatus.RUNNING.value) & (Item.lease_expires_at < now)
            )
        query = (
            select(Item.id)
            .join(Run, Run.job_id == Item.job_id)
            .where(Run.schedule_id == schedule_id, Run.published_at.is_(None), condition)
            .order_by(Run.created_at, Item.index)
        )
        return list(session.scalars(query))


def _failures(session_factory: SessionFactory, outcomes: list[ItemOutcome], source_prefix: str) -> list[FailedOutput]:
    failed = {outcome.item_id: outcome for outcome in outcomes if outcome.status == ItemStatus.FAILED.value}
    if not failed:
        return []
    with session_factory() as session:
        rows = session.execute(
            select(Augmentation).where(Augmentation.item_id.in_(list(failed))).order_by(Augmentation.file_name)
        ).scalars()
        return [
            FailedOutput(
                source=row.source_key.removeprefix(source_prefix),
                instruction=row.instruction,
                variant=row.variant,
                code=failed[row.item_id].error_code,
                message=failed[row.item_id].error_message,
            )
            for row in rows
            if row.item_id is not None
        ]


# --- The dataset folder --------------------------------------------------------------------------------------------


def _output_sha256s(session_factory: SessionFactory, schedule_id: uuid.UUID) -> dict[str, str]:
    """SHA-256 of each published file of the schedule (its item's output), by file name."""
    with session_factory() as session:
        query = (
            select(Augmentation.file_name, Item.output_sha256)
            .join(Item, Item.id == Augmentation.item_id)
            .where(Augmentation.schedule_id == schedule_id, Item.status == ItemStatus.SUCCEEDED.value)
            .order_by(Item.finished_at)
        )
        return {name: sha256 for name, sha256 in session.execute(query) if sha256}


def mirror_dataset(storage: Storage, target_prefix: str, output_dir: Path, sha256s: dict[str, str]) -> int:
    """Copy the dataset under ``target_prefix`` into ``output_dir``: every image whose bytes differ, then
    ``metadata.jsonl`` (only if it changed) once every file it names is there; the number of rows."""
    manifest_key = runs.metadata_key(target_prefix)
    for key in storage.list_keys(target_prefix):
        relative = key[len(target_prefix) :]
        if key == manifest_key or not is_image_key(relative):
            continue
        target = output_dir.joinpath(*relative.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_if_changed(storage, key, target, sha256s.get(relative))
    try:
        data = storage.get_bytes(manifest_key)
    except ObjectNotFoundError:
        return 0
    rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    missing = [row["file_name"] for row in rows if not output_dir.joinpath(*row["file_name"].split("/")).is_file()]
    if missing:
        raise RuntimeError(f"{manifest_key} names {len(missing)} file(s) the storage does not hold, e.g. {missing[0]}")
    target = output_dir / METADATA_FILE
    if not (target.is_file() and target.read_bytes() == data):
        partial = target.with_name(f".{target.name}.partial")
        partial.write_bytes(data)
        os.replace(partial, target)
    return len(rows)


# --- The command ---------------------------------------------------------------------------------------------------


def job_options(steps: int | None, max_side: int | None) -> dict[str, Any]:
    """The schedule's job options from ``--steps`` and ``--max-side`` (each instruction's own options win)."""
    given = {"num_inference_steps": steps, "max_side": max_side}
    return check_options({name: value for name, value in given.items() if value is not None}, "--steps/--max-side")


def run_augment(
    source_dir: Path,
    instructions_file: Path,
    output_dir: Path,
    *,
    settings: Settings,
    variants: int = 1,
    editor: Editor | None = None,
    steps: int | None = None,
    max_side: int | None = None,
    quiet: bool = False,
) -> AugmentReport:
    """Augment the images of ``source_dir`` not augmented yet under these instructions, variants and options, and
    mirror the whole dataset into ``output_dir``.

    Raises before anything is stored when the instructions, the variants or the source folder are unusable
    (``InstructionsError``, ``ScheduleError``, ``FileNotFoundError``, ``ValueError``).
    """
    started = time.perf_counter()
    options = job_options(steps, max_side)
    check_variants(variants)
    instructions = read_instructions(instructions_file, options, settings.max_instruction_chars)
    if not source_dir.is_dir():
        raise FileNotFoundError(f"source folder not found: {source_dir}")
    if source_dir.resolve() == output_dir.resolve():
        raise ValueError("--output-dir must not be the source folder (its outputs would become sources)")
    files = source_images(source_dir, exclude=output_dir)
    if not files:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise ValueError(f"no images in {source_dir} (files ending in {suffixes}; hidden ones are skipped)")
    with local_state(output_dir, settings) as (session_factory, storage):
        worker = f"xmgie-augment@{socket.gethostname()}:{os.getpid()}"
        with session_factory() as session, session.begin():
            tenant_id = local_tenant(session)
        source_prefix = data_prefix(tenant_id) + SOURCE_FOLDER
        target_prefix = data_prefix(tenant_id) + DATASET_FOLDER
        stored, removed = sync_source(storage, source_prefix, files)
        schedule_id, schedule_state = ensure_schedule(session_factory, tenant_id, instructions, variants, options)
        editor = editor if editor is not None else lazy_pipeline_editor(settings)

        # Items of an earlier call that stopped midway are done first: the new run's plan counts them as taken.
        leftover = _open_items(session_factory, schedule_id, runnable=True)
        outcomes = process_locally(session_factory, storage, editor, leftover, worker, settings, quiet)

        with session_factory() as session, session.begin():
            run_id = runs.fire_now(session=session, schedule_id=schedule_id).id
        started_run = runs.start_run(
            session_factory=session_factory, storage=storage, run_id=run_id, max_items=settings.max_items_per_job
        )
        outcomes += process_locally(session_factory, storage, editor, started_run.item_ids, worker, settings, quiet)

        # process_items publishes a run when its job ends; publishing again is a no-op then, and catches a run
        # whose last item ended in an earlier call.
        for unpublished in _unpublished_runs(session_factory, schedule_id):
            runs.publish_run(session_factory=session_factory, storage=storage, run_id=unpublished)
        unfinished = len(_open_items(session_factory, schedule_id, runnable=False))
        with session_factory() as session:
            run = session.get(Run, run_id)
            assert run is not None
            image_count, item_count = run.image_count, run.item_count
        rows = mirror_dataset(storage, target_prefix, output_dir, _output_sha256s(session_factory, schedule_id))
        failed = _failures(session_factory, outcomes, source_prefix)

    planned_total = image_count * len(instructions) * variants
    return AugmentReport(
        schedule_id=schedule_id,
        run_id=run_id,
        job_id=started_run.job_id,
        source_images=image_count,
        stored_sources=stored,
        removed_sources=removed,
        instructions=len(instructions),
        variants=variants,
        schedule_state=schedule_state,
        made=sum(outcome.status == ItemStatus.SUCCEEDED.value for outcome in outcomes),
        skipped=max(planned_total - item_count - len(leftover), 0),
        resumed=len(leftover),
        capped=item_count >= settings.max_items_per_job,
        unfinished=unfinished,
        dataset_rows=rows,
        metadata_path=output_dir / METADATA_FILE,
        seconds=time.perf_counter() - started,
        failed=failed,
    )


def print_report(report: AugmentReport, source_dir: Path, output_dir: Path) -> None:
    """The summary ``xmgie augment`` prints."""
    print(
        f"source {source_dir}: {report.source_images} image(s) ({report.stored_sources} new or changed stored, "
        f"{report.removed_sources} removed); {report.instructions} instruction(s) × {report.variants} variant(s)"
    )
    if report.schedule_state == "changed":
        print("the instructions, variants or options changed since the last call: outputs are planned anew")
    print(
        f"run {report.run_id}: {report.made} new output(s) made, {len(report.failed)} failed, "
        f"{report.skipped} skipped as already done"
        + (f", {report.resumed} taken over from an interrupted call" if report.resumed else "")
        + f" ({report.seconds:.1f} s)"
    )
    if report.failed:
        codes: dict[str, int] = {}
        for failure in report.failed:
            codes[failure.code or "unknown"] = codes.get(failure.code or "unknown", 0) + 1
        print("failed by code: " + ", ".join(f"{code} {number}" for code, number in sorted(codes.items())))
        for failure in report.failed[:MAX_LISTED_FAILURES]:
            print(
                f"  {failure.source} / {failure.instruction!r} / variant {failure.variant}: "
                f"{failure.code}: {failure.message}"
            )
        if len(report.failed) > MAX_LISTED_FAILURES:
            print(f"  ... and {len(report.failed) - MAX_LISTED_FAILURES} more")
    if report.capped:
        print("this run planned its maximum of outputs (XMGIE_MAX_ITEMS_PER_JOB); run again for the rest")
    if report.unfinished:
        print(
            f"{report.unfinished} output(s) are still held by another (or a stopped) call; run again once its "
            "lease has expired"
        )
    print(f"dataset: {report.dataset_rows} row(s) in {report.metadata_path}")
    print(f'load it with: datasets.load_dataset("imagefolder", data_dir="{output_dir}", split="train")')


def run_augment_command(
    source_dir: Path,
    output_dir: Path,
    *,
    instructions: Path,
    variants: int,
    model: str,
    device: str,
    dtype: str,
    cache_dir: Path | None,
    micro_batch: int | None,
    steps: int | None,
    max_side: int | None,
) -> int:
    """``xmgie augment``: one incremental augmentation run and its summary; 0 when nothing failed, 1
    (``EXIT_SOME_FAILED``) when an output failed or is unfinished, 2 for unusable input (nothing is run then)."""
    try:
        read_instructions(instructions, job_options(steps, max_side), batch_settings(output_dir).max_instruction_chars)
        check_variants(variants)
    except InstructionsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    settings = command_settings(output_dir, model, device, dtype, cache_dir, micro_batch)
    report = run_augment(
        source_dir,
        instructions,
        output_dir,
        settings=settings,
        variants=variants,
        steps=steps,
        max_side=max_side,
    )
    print_report(report, source_dir, output_dir)
    return EXIT_SOME_FAILED if report.failed or report.unfinished else 0
