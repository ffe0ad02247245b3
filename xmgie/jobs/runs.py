"""Runs of augmentation schedules: firing slots once, turning a run into a job, publishing the dataset.

The life of a run, each step safe to repeat and to race:

1. ``fire_due_schedules`` (beat's dispatcher) moves each due schedule's ``last_slot`` forward with a conditional
   UPDATE and inserts the run for that slot (unique per schedule and slot): two dispatchers, or one restarted
   mid-tick, create one run per slot.
2. ``start_run`` lists the source, plans the outputs not made yet under the schedule's fingerprint, and creates the
   job, its ``augmentations`` and the run's link to the job in one transaction (the job's idempotency key is the
   run, so a repeated start finds the same job). The caller publishes the items after the commit.
3. When the job has ended, ``publish_run`` copies the run's succeeded outputs under the target prefix and rewrites
   the dataset manifest (``metadata.jsonl``, every succeeded output of every run so far) — written last, under the
   schedule's row lock, so a reader never sees a manifest naming a file that is not there, and two runs ending at
   once do not overwrite each other's rows.
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, insert, or_, select, update
from sqlalchemy.orm import Session

from xmgie.editing.options import merge_options
from xmgie.jobs import transitions
from xmgie.jobs.db import upsert_insert
from xmgie.jobs.models import Augmentation, Item, Job, Run, Schedule, utc_now
from xmgie.jobs.schedules import (
    METADATA_FILE,
    derived_seed,
    fingerprint,
    is_image_key,
    latest_slot,
    output_file_name,
)
from xmgie.jobs.statuses import ItemStatus, JobStatus
from xmgie.jobs.storage import ObjectNotFoundError, Storage, StorageError

logger = logging.getLogger(__name__)

SessionFactory = Callable[[], Session]

RETRYABLE_ITEM_CODES = frozenset({"internal_error", "storage_error", "lease_expired"})
"""Failures that say nothing about the image: such outputs are planned again by the next run."""
SCHEDULE_TRIGGER = "schedule"
MANUAL_TRIGGER = "manual"
NO_SOURCE_IMAGES = "no_source_images"
SOURCE_UNAVAILABLE = "source_unavailable"


@dataclass(frozen=True)
class StartedRun:
    """What ``start_run`` did: the run's job (None when there was nothing new) and the items to publish."""

    run_id: uuid.UUID
    job_id: uuid.UUID | None
    item_ids: list[uuid.UUID]


# --- Firing --------------------------------------------------------------------------------------------------------


def fire_due_schedules(*, session_factory: SessionFactory, now: datetime | None = None) -> list[uuid.UUID]:
    """Create the run of each enabled schedule whose latest slot has not fired; the new runs' ids.

    Each schedule is claimed in its own transaction: the UPDATE of ``last_slot`` succeeds for one dispatcher only
    (on PostgreSQL a concurrent one waits for the row, then finds the slot taken), and the run's unique
    (schedule, slot) is a second guard.
    """
    now = now or utc_now()
    with session_factory() as session:
        candidates = session.execute(
            select(
                Schedule.id,
                Schedule.cron,
                Schedule.interval_seconds,
                Schedule.timezone,
                Schedule.created_at,
                Schedule.last_slot,
            ).where(Schedule.enabled.is_(True))
        ).all()
    created = []
    for schedule_id, cron, interval, timezone, created_at, last_slot in candidates:
        slot = latest_slot(cron=cron, interval_seconds=interval, timezone=timezone, anchor=created_at, now=now)
        if slot is None or (last_slot is not None and slot <= last_slot):
            continue
        with session_factory() as session, session.begin():
            claimed = session.execute(
                update(Schedule)
                .where(
                    Schedule.id == schedule_id,
                    Schedule.enabled.is_(True),
                    or_(Schedule.last_slot.is_(None), Schedule.last_slot < slot),
                )
                .values(last_slot=slot)
                .returning(Schedule.id)
                .execution_options(synchronize_session=False)
            ).scalar_one_or_none()
            if claimed is None:
                continue
            run_id = _insert_run(session, schedule_id, slot, SCHEDULE_TRIGGER, now)
        if run_id is not None:
            logger.info("schedule %s fired for slot %s: run %s", schedule_id, slot.isoformat(), run_id)
            created.append(run_id)
    return created


def _insert_run(session: Session, schedule_id: uuid.UUID, slot: datetime, trigger: str, now: datetime):
    values = {
        "id": uuid.uuid4(),
        "schedule_id": schedule_id,
        "slot": slot,
        "trigger": trigger,
        "status": JobStatus.QUEUED.value,
        "image_count": 0,
        "item_count": 0,
        "succeeded_count": 0,
        "failed_count": 0,
        "created_at": now,
    }
    statement = (
        upsert_insert(session)(Run)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["schedule_id", "slot"])
        .returning(Run.id)
    )
    return session.execute(statement).scalar_one_or_none()


def fire_now(*, session: Session, schedule_id: uuid.UUID, now: datetime | None = None) -> Run:
    """A manual run of the schedule now (its slot is this instant; the schedule's own slots are unaffected)."""
    now = now or utc_now()
    run_id = None
    slot = now
    while run_id is None:
        # Two manual runs in the same microsecond: the second takes the next free microsecond.
        run_id = _insert_run(session, schedule_id, slot, MANUAL_TRIGGER, now)
        slot += timedelta(microseconds=1)
    run = session.get(Run, run_id)
    assert run is not None
    return run


# --- Starting ------------------------------------------------------------------------------------------------------


def list_source(storage: Storage, schedule: Schedule) -> list[str]:
    """The schedule's source images: the image files under its prefix, or its fixed list; sorted, distinct."""
    if schedule.source_keys is not None:
        return sorted(dict.fromkeys(schedule.source_keys))
    assert schedule.source_prefix is not None
    return [key for key in storage.list_keys(schedule.source_prefix) if is_image_key(key)]


def _done_outputs(session: Session, schedule_id: uuid.UUID, fingerprint_: str) -> set[tuple[str, int, int]]:
    """(image, instruction, variant) made, being made, or failed for a reason of the image, under ``fingerprint_``."""
    final_failure = and_(
        Item.status == ItemStatus.FAILED.value,
        or_(Item.error_code.is_(None), Item.error_code.not_in(RETRYABLE_ITEM_CODES)),
    )
    query = (
        select(Augmentation.source_key, Augmentation.instruction_index, Augmentation.variant)
        .join(Item, Item.id == Augmentation.item_id)
        .where(
            Augmentation.schedule_id == schedule_id,
            Augmentation.fingerprint == fingerprint_,
            or_(
                Item.status.in_([ItemStatus.QUEUED.value, ItemStatus.RUNNING.value, ItemStatus.SUCCEEDED.value]),
                final_failure,
            ),
        )
    )
    return {(key, index, variant) for key, index, variant in session.execute(query)}


def start_run(
    *,
    session_factory: SessionFactory,
    storage: Storage,
    run_id: uuid.UUID,
    max_items: int,
    now: datetime | None = None,
) -> StartedRun:
    """Plan the run's outputs and create its job; publish the returned items after this returns (committed).

    Outputs already made under the schedule's current fingerprint are skipped; when nothing is left the run ends
    ``succeeded`` with no job. At most ``max_items`` outputs are planned (the next run takes the rest). A run
    already started returns its job and no items (its items are the reconciler's if their messages were lost).
    """
    now = now or utc_now()
    with session_factory() as session, session.begin():
        run = session.execute(
            update(Run)
            .where(Run.id == run_id, Run.job_id.is_(None), Run.finished_at.is_(None))
            .values(started_at=now)
            .returning(Run)
            .execution_options(populate_existing=True)
        ).scalar_one_or_none()
        if run is None:
            existing = session.get(Run, run_id)
            return StartedRun(run_id, existing.job_id if existing else None, [])
        schedule = session.get(Schedule, run.schedule_id)
        assert schedule is not None
        fingerprint_ = fingerprint(schedule.instructions, schedule.variants, schedule.options)
        run.fingerprint = fingerprint_
        try:
            source = list_source(storage, schedule)
        except StorageError as error:
            _end_without_job(run, now, SOURCE_UNAVAILABLE, f"listing the source failed: {error}")
            return StartedRun(run_id, None, [])
        done = _done_outputs(session, schedule.id, fingerprint_)
        planned = [
            (key, index, entry, variant)
            for key in source
            for index, entry in enumerate(schedule.instructions)
            for variant in range(schedule.variants)
            if (key, index, variant) not in done
        ]
        run.image_count = len(source)
        if not source:
            _end_without_job(run, now, NO_SOURCE_IMAGES, "the source has no images")
            return StartedRun(run_id, None, [])
        if len(planned) > max_items:
            logger.info("run %s: %d outputs planned, %d now, the rest next run", run_id, len(planned), max_items)
            planned = planned[:max_items]
        if not planned:
            _end_without_job(run, now, None, None)
            return StartedRun(run_id, None, [])

        specs = []
        for key, _index, entry, variant in planned:
            options = merge_options(schedule.options, entry.get("options") or {})
            seed = derived_seed(schedule.id, key, entry["instruction"], variant)
            specs.append({"input_key": key, "instruction": entry["instruction"], "options": options, "seed": seed})
        job, _created = transitions.create_job(
            session=session,
            tenant_id=schedule.tenant_id,
            items=specs,
            options=schedule.options,
            idempotency_key=f"run:{run.id}",
            now=now,
        )
        item_ids = list(session.scalars(select(Item.id).where(Item.job_id == job.id).order_by(Item.index)))
        session.execute(
            insert(Augmentation),
            [
                {
                    "id": uuid.uuid4(),
                    "schedule_id": schedule.id,
                    "run_id": run.id,
                    "item_id": item_id,
                    "fingerprint": fingerprint_,
                    "source_key": key,
                    "instruction_index": index,
                    "instruction": entry["instruction"],
                    "variant": variant,
                    "seed": spec["seed"],
                    "file_name": output_file_name(fingerprint_, key, index, variant),
                }
                for item_id, (key, index, entry, variant), spec in zip(item_ids, planned, specs, strict=True)
            ],
        )
        run.job_id = job.id
        run.item_count = len(item_ids)
        run.status = job.status
        logger.info("run %s: job %s with %d items over %d images", run_id, job.id, len(item_ids), len(source))
        return StartedRun(run_id, job.id, item_ids)


def _end_without_job(run: Run, now: datetime, code: str | None, message: str | None) -> None:
    run.status = JobStatus.FAILED.value if code == SOURCE_UNAVAILABLE else JobStatus.SUCCEEDED.value
    run.error_code = code
    run.error_message = message
    run.finished_at = now


# --- Publishing ----------------------------------------------------------------------------------------------------


def _metadata_rows(session: Session, schedule_id: uuid.UUID) -> list[dict[str, Any]]:
    """One row per output file of the schedule whose item succeeded (the latest such item per file)."""
    query = (
        select(Augmentation, Item, Run.slot)
        .join(Item, Item.id == Augmentation.item_id)
        .join(Run, Run.id == Augmentation.run_id)
        .where(
            Augmentation.schedule_id == schedule_id,
            Item.status == ItemStatus.SUCCEEDED.value,
            Run.published_at.is_not(None),
        )
        .order_by(Item.finished_at)
    )
    rows: dict[str, dict[str, Any]] = {}
    for augmentation, item, slot in session.execute(query):
        metrics = item.metrics or {}
        preservation = metrics.get("preservation") or {}
        rows[augmentation.file_name] = {
            "file_name": augmentation.file_name,
            "source_key": augmentation.source_key,
            "instruction": augmentation.instruction,
            "expressive_instruction": item.expressive_instruction,
            "variant": augmentation.variant,
            "seed": augmentation.seed,
            "identity_score": metrics.get("identity_score"),
            "preservation_psnr": preservation.get("psnr"),
            "preservation_l1": preservation.get("l1"),
            "edit_scope": metrics.get("edit_scope"),
            "mask_fraction": metrics.get("mask_fraction"),
            "run_id": str(augmentation.run_id),
            "slot": slot.isoformat(),
        }
    return sorted(rows.values(), key=lambda row: row["file_name"])


def metadata_key(target_prefix: str) -> str:
    """Key of the dataset manifest of a target prefix."""
    return f"{target_prefix}{METADATA_FILE}"


def publish_run(*, session_factory: SessionFactory, storage: Storage, run_id: uuid.UUID) -> bool:
    """Publish a run whose job has ended: outputs copied under the target prefix, the manifest rewritten last.

    Returns whether this call published it (False: its job is still going, or it was published already). A storage
    failure leaves the run unpublished for the next sweep; outputs are copied to deterministic names, so copying
    again is harmless.
    """
    with session_factory() as session:
        run = session.get(Run, run_id)
        if run is None or run.published_at is not None or run.job_id is None:
            return False
        job = session.get(Job, run.job_id)
        schedule = session.get(Schedule, run.schedule_id)
        if job is None or schedule is None or not JobStatus(job.status).is_terminal():
            return False
        target_prefix = schedule.target_prefix
        outputs = [
            (item.output_key, augmentation.file_name)
            for augmentation, item in session.execute(
                select(Augmentation, Item)
                .join(Item, Item.id == Augmentation.item_id)
                .where(Augmentation.run_id == run_id, Item.status == ItemStatus.SUCCEEDED.value)
            )
        ]
    for output, file_name in outputs:
        storage.copy(output, f"{target_prefix}{file_name}")

    now = utc_now()
    with session_factory() as session, session.begin():
        # The schedule's row lock serializes manifest writers of one schedule.
        session.execute(
            update(Schedule)
            .where(Schedule.id == schedule.id)
            .values(updated_at=Schedule.updated_at)
            .execution_options(synchronize_session=False)
        )
        job = session.get(Job, run.job_id, populate_existing=True)
        assert job is not None
        marked = session.execute(
            update(Run)
            .where(Run.id == run_id, Run.published_at.is_(None))
            .values(
                published_at=now,
                finished_at=now,
                status=job.status,
                succeeded_count=job.succeeded_count,
                failed_count=job.failed_count,
            )
            .returning(Run.id)
            .execution_options(synchronize_session=False)
        ).scalar_one_or_none()
        if marked is None:
            return False
        rows = _metadata_rows(session, schedule.id)
        buffer = io.StringIO()
        for row in rows:
            buffer.write(json.dumps(row, ensure_ascii=False) + "\n")
        storage.put_bytes(metadata_key(target_prefix), buffer.getvalue().encode("utf-8"), "application/x-ndjson")
    logger.info("run %s published: %d outputs, %d rows in %s", run_id, len(outputs), len(rows), METADATA_FILE)
    return True


def publish_runs_of_jobs(*, session_factory: SessionFactory, storage: Storage, job_ids: Iterable[uuid.UUID]) -> int:
    """Publish the runs of those of ``job_ids`` that have ended; the number published. Failures are logged."""
    job_ids = list(job_ids)
    if not job_ids:
        return 0
    with session_factory() as session:
        run_ids = list(session.scalars(select(Run.id).where(Run.job_id.in_(job_ids), Run.published_at.is_(None))))
    return _publish_each(session_factory, storage, run_ids)


def _publish_each(session_factory: SessionFactory, storage: Storage, run_ids: list[uuid.UUID]) -> int:
    published = 0
    for run_id in run_ids:
        try:
            published += publish_run(session_factory=session_factory, storage=storage, run_id=run_id)
        except (StorageError, ObjectNotFoundError):
            logger.exception("publishing run %s failed; the next sweep tries again", run_id)
    return published


def publish_finished_runs(*, session_factory: SessionFactory, storage: Storage, limit: int = 100) -> int:
    """Publish every run whose job has ended but which is not published yet (e.g. its job was canceled, or the
    worker that ended it died before publishing); the number published."""
    with session_factory() as session:
        terminal = [status.value for status in JobStatus if status.is_terminal()]
        run_ids = list(
            session.scalars(
                select(Run.id)
                .join(Job, Job.id == Run.job_id)
                .where(Run.published_at.is_(None), Job.status.in_(terminal))
                .order_by(Run.created_at)
                .limit(limit)
            )
        )
    return _publish_each(session_factory, storage, run_ids)


def unstarted_runs(*, session: Session, older_than_seconds: float, now: datetime | None = None) -> list[uuid.UUID]:
    """Runs created more than ``older_than_seconds`` ago that have no job and have not ended: their start message
    may be lost."""
    cutoff = (now or utc_now()) - timedelta(seconds=older_than_seconds)
    query = select(Run.id).where(Run.job_id.is_(None), Run.finished_at.is_(None), Run.created_at < cutoff)
    return list(session.scalars(query))
