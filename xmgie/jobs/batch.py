"""``xmgie batch``: a bulk job from a JSON Lines manifest, run on the embedded defaults through the service's path.

The job lives in a SQLite database under ``<output-dir>/.xmgie/`` (or ``XMGIE_DATABASE_URL``), brought up to date by
the migrations; inputs are uploaded to the storage (a folder beside it, or ``XMGIE_STORAGE_URL``); the job is created
with ``create_job`` and its items are processed in-process by ``process_items``, in micro-batches, exactly as a
worker would. The job's idempotency key is the SHA-256 of the manifest's bytes (and of the ``--steps``/``--max-side``
overrides, when given), so running the same manifest again resumes the same job: succeeded items are never redone.

Afterwards the outputs are copied to ``<output-dir>/<index>_<stem>.png`` (the mask used beside it), and
``results.jsonl`` and a before/after ``contact_sheet.png`` are written there.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from sqlalchemy import select
from sqlalchemy.orm import Session

from xmgie.editing.errors import EditInputError
from xmgie.editing.options import EditOptions
from xmgie.jobs import transitions
from xmgie.jobs.db import make_engine, make_session_factory
from xmgie.jobs.editor import Editor, lazy_pipeline_editor
from xmgie.jobs.migrate import upgrade_database
from xmgie.jobs.models import Item, Job, Tenant, utc_now
from xmgie.jobs.processing import IMAGE_NOT_FOUND, ItemOutcome, SessionFactory, process_items
from xmgie.jobs.settings import Settings
from xmgie.jobs.statuses import ItemStatus
from xmgie.jobs.storage import Storage, storage_from_settings, upload_key

LOCAL_TENANT = "local"
"""Name of the tenant that owns the jobs of ``xmgie batch``."""

STATE_DIR = ".xmgie"
"""Folder of the output directory that holds the job database and the storage of the embedded defaults."""

REQUIRED_KEYS = ("image", "instruction")
OPTIONAL_KEYS = ("mask", "identity_image", "seed", "options")
THUMBNAIL_HEIGHT = 256
CONTACT_SHEET_MAX_ROWS = 200
_GREY = (128, 128, 128)
_SUFFIX = re.compile(r"\.[a-z0-9]{1,8}")


class ManifestError(ValueError):
    """A manifest that cannot be run; ``problems`` lists ``(line number, message)`` pairs."""

    def __init__(self, path: Path, problems: list[tuple[int, str]]) -> None:
        self.path = path
        self.problems = problems
        lines = "\n".join(f"{path}:{number}: {message}" for number, message in problems)
        super().__init__(f"manifest {path} has {len(problems)} invalid line(s):\n{lines}")


@dataclass
class ManifestEntry:
    """One line of a manifest, checked; paths resolved relative to the manifest's folder."""

    line: int
    image: str
    instruction: str
    image_path: Path
    mask_path: Path | None = None
    identity_path: Path | None = None
    seed: int | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchReport:
    """What ``run_batch`` did."""

    job_id: uuid.UUID
    resumed: bool
    edited: int
    counts: dict[str, int]
    results_path: Path
    contact_sheet_path: Path
    seconds: float


def read_manifest(path: Path, *, steps: int | None = None, max_side: int | None = None) -> list[ManifestEntry]:
    """Parse and check a manifest; ``ManifestError`` naming every bad line (nothing is run then).

    ``steps`` and ``max_side`` fill ``num_inference_steps`` and ``max_side`` of items that do not set them.
    """
    folder = path.parent
    entries: list[ManifestEntry] = []
    problems: list[tuple[int, str]] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ManifestError(path, [(0, f"not UTF-8 text: {error}")]) from error
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            entries.append(_parse_line(raw, number, folder, steps, max_side))
        except ValueError as error:
            problems.append((number, str(error)))
    if not problems and not entries:
        problems.append((0, "no items (the manifest is empty)"))
    if problems:
        raise ManifestError(path, problems)
    return entries


def _parse_line(raw: str, number: int, folder: Path, steps: int | None, max_side: int | None) -> ManifestEntry:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON: {error.msg} (column {error.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise ValueError(f"missing required key(s): {', '.join(missing)}")
    unknown = sorted(set(data) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s): {', '.join(unknown)}")
    for key in ("image", "instruction", "mask", "identity_image"):
        value = data.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"{key} must be a non-empty string")
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise ValueError("options must be a JSON object")
    options = dict(options)
    if steps is not None:
        options.setdefault("num_inference_steps", steps)
    if max_side is not None:
        options.setdefault("max_side", max_side)
    try:
        EditOptions.from_dict(options)
    except EditInputError as error:
        raise ValueError(error.message) from None
    except TypeError as error:
        raise ValueError(f"invalid options: {error}") from None
    return ManifestEntry(
        line=number,
        image=data["image"],
        instruction=data["instruction"],
        image_path=folder / data["image"],
        mask_path=folder / data["mask"] if data.get("mask") else None,
        identity_path=folder / data["identity_image"] if data.get("identity_image") else None,
        seed=seed,
        options=options,
    )


def batch_settings(output_dir: Path, **overrides: Any) -> Settings:
    """Settings of a batch run: the environment's, with the database and storage under ``output_dir/.xmgie``
    unless ``XMGIE_DATABASE_URL`` / ``XMGIE_STORAGE_URL`` name others; ``overrides`` (not None) win."""
    state = output_dir.absolute() / STATE_DIR
    values: dict[str, Any] = {"data_dir": state}
    if "XMGIE_DATABASE_URL" not in os.environ:
        values["database_url"] = f"sqlite:///{state / 'jobs.db'}"
    if "XMGIE_STORAGE_URL" not in os.environ:
        values["storage_url"] = f"file://{state / 'storage'}"
    values.update({key: value for key, value in overrides.items() if value is not None})
    return Settings(**values)


def idempotency_key(manifest_bytes: bytes, overrides: dict[str, Any]) -> str:
    """SHA-256 (hex) of the manifest's bytes, and of the option overrides when there are any."""
    digest = hashlib.sha256(manifest_bytes)
    given = {key: value for key, value in sorted(overrides.items()) if value is not None}
    if given:
        digest.update(b"\0" + json.dumps(given, sort_keys=True).encode())
    return digest.hexdigest()


def local_tenant(session: Session) -> uuid.UUID:
    """Id of the tenant of the local commands (``xmgie batch``, ``xmgie augment``), created on first use."""
    tenant_id = session.execute(select(Tenant.id).where(Tenant.name == LOCAL_TENANT)).scalar_one_or_none()
    if tenant_id is None:
        tenant = Tenant(name=LOCAL_TENANT)
        session.add(tenant)
        session.flush()
        tenant_id = tenant.id
    return tenant_id


def _upload(storage: Storage, tenant_id: uuid.UUID, path: Path) -> str | None:
    """Store the file at ``path`` under a key derived from its content; None when the file does not exist."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    upload_id = uuid.UUID(hashlib.sha256(data).hexdigest()[:32])
    suffix = path.suffix.lower() if _SUFFIX.fullmatch(path.suffix.lower()) else ".img"
    key = upload_key(tenant_id, upload_id, suffix)
    if not storage.exists(key):
        storage.put_bytes(key, data)
    return key


def _missing_key(tenant_id: uuid.UUID, what: str, path: Path) -> str:
    """A key where nothing is stored, standing for a file that was missing when the job was created."""
    upload_id = uuid.UUID(hashlib.sha256(f"{what}:{path}".encode()).hexdigest()[:32])
    return upload_key(tenant_id, upload_id, ".missing")


def _create_or_resume(
    session_factory: Callable[[], Session],
    storage: Storage,
    entries: list[ManifestEntry],
    key: str,
    source: Path,
    worker: str,
    settings: Settings,
) -> tuple[uuid.UUID, bool]:
    """The job of this manifest: the existing one for ``key``, or a new one with the inputs uploaded."""
    with session_factory() as session, session.begin():
        tenant_id = local_tenant(session)
        existing = session.execute(
            select(Job.id).where(Job.tenant_id == tenant_id, Job.idempotency_key == key)
        ).scalar_one_or_none()
    if existing is not None:
        return existing, False

    specs: list[dict[str, Any]] = []
    missing: dict[int, str] = {}
    for index, entry in enumerate(entries):
        spec: dict[str, Any] = {
            "instruction": entry.instruction,
            "options": entry.options,
            "seed": entry.seed,
        }
        for field_name, what, path in (
            ("input_key", "image", entry.image_path),
            ("mask_key", "mask", entry.mask_path),
            ("identity_key", "identity image", entry.identity_path),
        ):
            if path is None:
                continue
            stored = _upload(storage, tenant_id, path)
            if stored is None:
                stored = _missing_key(tenant_id, what, path)
                missing.setdefault(index, f"{what} not found: {path}")
            spec[field_name] = stored
        specs.append(spec)
    with session_factory() as session, session.begin():
        job, created = transitions.create_job(
            session=session,
            tenant_id=tenant_id,
            items=specs,
            options={"source": str(source)},
            idempotency_key=key,
        )
        job_id = job.id
        item_ids = {item_index: item_id for item_index, item_id in _item_ids(session, job_id)}
    if not created:
        return job_id, False
    # Files missing at submission fail their items at once, through the same transitions a worker uses.
    for index, message in missing.items():
        with session_factory() as session, session.begin():
            claimed = transitions.claim_item(
                session=session,
                item_id=item_ids[index],
                worker=worker,
                lease_seconds=settings.lease_seconds,
                max_attempts=settings.max_attempts,
            )
            if claimed is not None:
                transitions.fail_item(
                    session=session,
                    item_id=claimed.id,
                    worker=worker,
                    code=IMAGE_NOT_FOUND,
                    message=message,
                    retry=False,
                    max_attempts=settings.max_attempts,
                )
    return job_id, True


def _item_ids(session: Session, job_id: uuid.UUID) -> list[tuple[int, uuid.UUID]]:
    return list(session.execute(select(Item.index, Item.id).where(Item.job_id == job_id).order_by(Item.index)))


def _runnable_items(session_factory: Callable[[], Session], job_id: uuid.UUID) -> list[uuid.UUID]:
    """Ids of the job's queued items, and of running ones whose lease has expired (a run that was stopped)."""
    with session_factory() as session, session.begin():
        now = utc_now()
        query = (
            select(Item.id)
            .where(Item.job_id == job_id)
            .where(
                (Item.status == ItemStatus.QUEUED.value)
                | ((Item.status == ItemStatus.RUNNING.value) & (Item.lease_expires_at < now))
            )
            .order_by(Item.index)
        )
        return list(session.execute(query).scalars())


def chunks(values: list[uuid.UUID], size: int) -> Iterable[list[uuid.UUID]]:
    """``values`` in consecutive slices of at most ``size``."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


class Progress:
    """A tqdm bar on stderr, or one line per step where tqdm is missing."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total = total
        self.done = 0
        self.quiet = quiet
        self.bar: Any = None
        if quiet or total == 0:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, desc="editing", unit="item", file=sys.stderr, dynamic_ncols=True)

    def update(self, number: int, succeeded: int, failed: int) -> None:
        self.done += number
        if self.bar is not None:
            self.bar.set_postfix(ok=succeeded, failed=failed, refresh=False)
            self.bar.update(number)
        elif not self.quiet:
            print(f"editing: {self.done}/{self.total} ({succeeded} ok, {failed} failed)", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextmanager
def local_state(output_dir: Path, settings: Settings) -> Iterator[tuple[SessionFactory, Storage]]:
    """The database (migrated) and storage of a local command, with ``output_dir/.xmgie`` created; the engine is
    disposed of when the block ends."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / STATE_DIR).mkdir(exist_ok=True)
    upgrade_database(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        storage = storage_from_settings(settings, create_bucket=True)
        storage.check()
        yield make_session_factory(engine), storage
    finally:
        engine.dispose()


def process_locally(
    session_factory: SessionFactory,
    storage: Storage,
    editor: Editor,
    item_ids: list[uuid.UUID],
    worker: str,
    settings: Settings,
    quiet: bool,
) -> list[ItemOutcome]:
    """``process_items`` over ``item_ids`` in micro-batches with a progress bar, in this process; items sent back
    for a retry get their next attempts at once, up to the attempt cap. The final outcome of each item."""
    final: list[ItemOutcome] = []
    succeeded = failed = 0
    progress = Progress(len(item_ids), quiet)
    try:
        for chunk in chunks(item_ids, settings.micro_batch_size):
            outcomes = process_items(
                session_factory=session_factory,
                storage=storage,
                editor=editor,
                item_ids=chunk,
                worker=worker,
                settings=settings,
            )
            retry = [outcome.item_id for outcome in outcomes if outcome.status == ItemStatus.QUEUED.value]
            while retry:
                outcomes = [outcome for outcome in outcomes if outcome.item_id not in set(retry)]
                outcomes += process_items(
                    session_factory=session_factory,
                    storage=storage,
                    editor=editor,
                    item_ids=retry,
                    worker=worker,
                    settings=settings,
                )
                retry = [outcome.item_id for outcome in outcomes if outcome.status == ItemStatus.QUEUED.value]
            final.extend(outcomes)
            succeeded += sum(outcome.status == ItemStatus.SUCCEEDED.value for outcome in outcomes)
            failed += sum(outcome.status == ItemStatus.FAILED.value for outcome in outcomes)
            progress.update(len(chunk), succeeded, failed)
    finally:
        progress.close()
    return final


def run_batch(
    manifest: Path,
    output_dir: Path,
    *,
    settings: Settings,
    editor: Editor | None = None,
    steps: int | None = None,
    max_side: int | None = None,
    quiet: bool = False,
) -> BatchReport:
    """Run (or resume) the job of ``manifest`` and write its outputs, ``results.jsonl`` and the contact sheet.

    Raises ``ManifestError`` before anything is created when a line of the manifest is invalid.
    """
    started = time.perf_counter()
    manifest_bytes = manifest.read_bytes()
    entries = read_manifest(manifest, steps=steps, max_side=max_side)
    with local_state(output_dir, settings) as (session_factory, storage):
        worker = f"xmgie-batch@{socket.gethostname()}:{os.getpid()}"
        key = idempotency_key(manifest_bytes, {"num_inference_steps": steps, "max_side": max_side})
        job_id, created = _create_or_resume(session_factory, storage, entries, key, manifest, worker, settings)

        runnable = _runnable_items(session_factory, job_id)
        editor = editor if editor is not None else lazy_pipeline_editor(settings)
        outcomes = process_locally(session_factory, storage, editor, runnable, worker, settings, quiet)
        succeeded = sum(outcome.status == ItemStatus.SUCCEEDED.value for outcome in outcomes)

        with session_factory() as session:
            job = session.get(Job, job_id)
            assert job is not None
            counts = {status.value: number for status, number in job.counts.items()}
            items = list(session.execute(select(Item).where(Item.job_id == job_id).order_by(Item.index)).scalars())
        results_path, sheet_path = write_outputs(output_dir, storage, entries, items)

    return BatchReport(
        job_id=job_id,
        resumed=not created,
        edited=succeeded,
        counts=counts,
        results_path=results_path,
        contact_sheet_path=sheet_path,
        seconds=time.perf_counter() - started,
    )


def output_name(index: int, entry: ManifestEntry, suffix: str = "") -> str:
    """File name of item ``index``'s output in the output folder: ``<index>_<stem><suffix>.png``."""
    return f"{index}_{Path(entry.image).stem}{suffix}.png"


def copy_if_changed(storage: Storage, key: str, target: Path, sha256: str | None) -> None:
    """Copy object ``key`` to ``target`` unless ``target`` already holds exactly those bytes."""
    if sha256 is not None and target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == sha256:
        return
    data = storage.get_bytes(key)
    if target.is_file() and target.read_bytes() == data:
        return
    partial = target.with_name(f".{target.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, target)


def write_outputs(
    output_dir: Path, storage: Storage, entries: list[ManifestEntry], items: list[Item]
) -> tuple[Path, Path]:
    """Copy outputs next to each other, write ``results.jsonl`` and ``contact_sheet.png``; their paths."""
    lines = []
    for entry, item in zip(entries, items, strict=True):
        output_path = mask_path = None
        if item.status == ItemStatus.SUCCEEDED.value and item.output_key:
            output_path = output_dir / output_name(item.index, entry)
            copy_if_changed(storage, item.output_key, output_path, item.output_sha256)
            if item.mask_output_key:
                mask_path = output_dir / output_name(item.index, entry, "_mask")
                copy_if_changed(storage, item.mask_output_key, mask_path, None)
        metrics = item.metrics or {}
        lines.append(
            {
                "index": item.index,
                "status": item.status,
                "image": entry.image,
                "instruction": item.instruction,
                "seed": item.seed,
                "output": str(output_path) if output_path else None,
                "mask": str(mask_path) if mask_path else None,
                "sha256": item.output_sha256,
                "expressive_instruction": item.expressive_instruction,
                "identity_score": metrics.get("identity_score"),
                "preservation": metrics.get("preservation"),
                "edit_scope": metrics.get("edit_scope"),
                "mask_fraction": metrics.get("mask_fraction"),
                "attempts": item.attempts,
                "error_code": item.error_code,
                "error_message": item.error_message,
            }
        )
    results_path = output_dir / "results.jsonl"
    results_path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    sheet_path = output_dir / "contact_sheet.png"
    contact_sheet(storage, items, output_dir, entries).save(sheet_path)
    return results_path, sheet_path


def _thumbnail(image: Image.Image, height: int) -> Image.Image:
    width = max(1, round(image.width * height / max(image.height, 1)))
    return image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)


def _stored_image(storage: Storage, key: str | None) -> Image.Image | None:
    if key is None:
        return None
    try:
        with Image.open(io.BytesIO(storage.get_bytes(key))) as image:
            image.load()
            return image.convert("RGB")
    except Exception:  # noqa: BLE001 - an unreadable source is shown as a grey tile
        return None


def contact_sheet(
    storage: Storage,
    items: list[Item],
    output_dir: Path,
    entries: list[ManifestEntry],
    height: int = THUMBNAIL_HEIGHT,
) -> Image.Image:
    """Before/after pairs, one row per item (at most ``CONTACT_SHEET_MAX_ROWS``), each ``height`` pixels high,
    labelled with the item's index, image, instruction (its first 60 characters) and status.

    A failed item shows its source (grey when unreadable) beside a grey tile with its error code.
    """
    label_height = 18
    rows = []
    for entry, item in list(zip(entries, items, strict=True))[:CONTACT_SHEET_MAX_ROWS]:
        source = _stored_image(storage, item.input_key)
        before = _thumbnail(source, height) if source is not None else Image.new("RGB", (height, height), _GREY)
        after_path = output_dir / output_name(item.index, entry)
        after = None
        if item.status == ItemStatus.SUCCEEDED.value and after_path.is_file():
            with Image.open(after_path) as edited:
                after = _thumbnail(edited, height)
        if after is None:
            after = Image.new("RGB", before.size, _GREY)
        row = Image.new("RGB", (before.width + after.width + 8, height + label_height), "white")
        row.paste(before, (0, label_height))
        row.paste(after, (before.width + 8, label_height))
        instruction = entry.instruction if len(entry.instruction) <= 60 else entry.instruction[:57] + "..."
        label = f"{item.index}: {entry.image} - {instruction} - {item.status}"
        if item.error_code:
            label += f" ({item.error_code})"
        ImageDraw.Draw(row).text((4, 3), label, fill="black")
        rows.append(row)
    width = max(row.width for row in rows) + 16
    sheet = Image.new("RGB", (width, sum(row.height + 8 for row in rows) + 8), "white")
    top = 8
    for row in rows:
        sheet.paste(row, (8, top))
        top += row.height + 8
    return sheet


def resolve_device(device: str, dtype: str) -> tuple[str, str]:
    """``auto`` device: CUDA when present, else the CPU; ``auto`` dtype: bf16/fp16 on CUDA, fp32 elsewhere."""
    if device == "auto" or dtype == "auto":
        import torch

        from xmgie.loading.directory import default_device, default_dtype

        resolved = default_device() if device == "auto" else torch.device(device)
        device = str(resolved) if device == "auto" else device
        if dtype == "auto":
            dtype = str(default_dtype(resolved)).removeprefix("torch.")
    return device, dtype


def command_settings(
    output_dir: Path, model: str, device: str, dtype: str, cache_dir: Path | None, micro_batch: int | None
) -> Settings:
    """The settings of a local command (``xmgie batch``, ``xmgie augment``) from its runtime arguments: state under
    ``output_dir/.xmgie``, ``auto`` device and dtype resolved."""
    device, dtype = resolve_device(device, dtype)
    return batch_settings(
        output_dir, model=model, device=device, dtype=dtype, model_cache_dir=cache_dir, micro_batch_size=micro_batch
    )


def run_batch_command(
    manifest: Path,
    output_dir: Path,
    *,
    model: str,
    device: str,
    dtype: str,
    cache_dir: Path | None,
    micro_batch: int | None,
    steps: int | None,
    max_side: int | None,
) -> int:
    """``xmgie batch``: run the manifest's job and print a summary; 0 if every item succeeded, 1 if any failed,
    2 for an invalid manifest (with the bad lines named, and nothing run)."""
    if not manifest.is_file():
        print(f"error: manifest not found: {manifest}", file=sys.stderr)
        return 2
    try:
        read_manifest(manifest, steps=steps, max_side=max_side)
    except ManifestError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    settings = command_settings(output_dir, model, device, dtype, cache_dir, micro_batch)
    report = run_batch(manifest, output_dir, settings=settings, steps=steps, max_side=max_side)
    counts = report.counts
    total = sum(counts.values())
    state = "resumed" if report.resumed else "created"
    print(f"job {report.job_id} ({state}): edited {report.edited} item(s) in this run, {report.seconds:.1f} s")
    print(
        f"{counts['succeeded']} succeeded, {counts['failed']} failed, {counts['canceled']} canceled"
        + (f", {counts['queued'] + counts['running']} unfinished" if counts["queued"] + counts["running"] else "")
        + f" of {total}"
    )
    print(f"outputs: {output_dir}")
    print(f"results: {report.results_path}")
    print(f"contact sheet: {report.contact_sheet_path}")
    if counts["failed"]:
        for line in report.results_path.read_text(encoding="utf-8").splitlines():
            result = json.loads(line)
            if result["status"] == ItemStatus.FAILED.value:
                print(
                    f"  item {result['index']} ({result['image']}): {result['error_code']}: {result['error_message']}"
                )
    return 0 if counts["succeeded"] == total else 1
