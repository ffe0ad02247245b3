"""The worker tasks: ``xmgie.edit_items`` (queue ``gpu``) and ``xmgie.reconcile`` (queue ``default``).

Each worker process creates its database engine, storage and editor on its first task (never at import, never in
the parent of a fork); the model itself is loaded by the editor's first edit, once per process. The editor is the
settings' model unless ``XMGIE_EDITOR=noop``: then items are copied unchanged, after ``XMGIE_NOOP_DELAY`` seconds
per item (default 0) and a first load of ``XMGIE_NOOP_LOAD_DELAY`` seconds (default 0), for queue benchmarks and
tests of the job machinery only.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from celery import Task
from sqlalchemy import Engine, select

from workers.celery_app import celery_app
from xmgie.jobs import runs, transitions, webhooks
from xmgie.jobs.db import is_database_unavailable, make_engine, make_session_factory
from xmgie.jobs.dispatch import (
    DEFAULT_QUEUE,
    DELIVER_WEBHOOK_TASK,
    DISPATCH_SCHEDULES_TASK,
    EDIT_ITEMS_TASK,
    GPU_QUEUE,
    PUBLISH_EDITS_TASK,
    RECONCILE_TASK,
    START_RUN_TASK,
    micro_batches,
    publish_batches,
    visibility_timeout_seconds,
)
from xmgie.jobs.editor import Editor, EditRequest, EditResult, NoOpEditor, lazy_pipeline_editor
from xmgie.jobs.models import Job, utc_now
from xmgie.jobs.processing import DEFERRED, SessionFactory, StorageDeferral, process_items
from xmgie.jobs.settings import Settings, get_settings
from xmgie.jobs.statuses import ItemStatus
from xmgie.jobs.storage import Storage, storage_from_settings

logger = logging.getLogger(__name__)

EDITOR_ENV = "XMGIE_EDITOR"
"""``pipeline`` (default: the settings' model) or ``noop`` (no model; benchmarks and tests only)."""
NOOP_DELAY_ENV = "XMGIE_NOOP_DELAY"
"""Seconds the ``noop`` editor waits per item, to stand in for a slow model in tests."""
NOOP_LOAD_DELAY_ENV = "XMGIE_NOOP_LOAD_DELAY"
"""Seconds the ``noop`` editor's first ``load()`` waits, to stand in for a slow model load in tests."""
RECONCILE_BATCH_LIMIT = 1000
"""Items the reconciler looks at per run; the next run takes the rest."""
STALE_WEBHOOK_SECONDS = 900.0
"""A webhook pending this long without an attempt has lost its message: the reconciler publishes it again."""
DATABASE_TASK_RETRIES = 10
"""How often an edit message is retried (each after a longer pause, up to ``DATABASE_TASK_MAX_DELAY_SECONDS``) when
the database stays unreachable past ``Settings.database_retry_seconds``; then the reconciler takes its items back."""
DATABASE_TASK_MAX_DELAY_SECONDS = 60.0
BROKER_MARKER_KEY = "xmgie:broker-marker"
"""A key the reconciler keeps in a Redis broker: when it is gone, the broker lost its data (restarted without
persistence, flushed) and with it every queued message, so every queued item is published again at once."""


class DelayedNoOpEditor(NoOpEditor):
    """``NoOpEditor`` that first sleeps ``delay`` seconds per request, and ``load_delay`` seconds in its first
    ``load()`` (a stand-in for a slow model and its load)."""

    def __init__(self, delay: float = 0.0, load_delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.load_delay = load_delay
        self.loaded = False

    def load(self) -> None:
        """Sleep ``load_delay`` seconds the first time."""
        if not self.loaded:
            logger.info("noop editor: loading for %.1f s", self.load_delay)
            time.sleep(self.load_delay)
            self.loaded = True

    def edit(self, requests: list[EditRequest]) -> list[EditResult]:
        """Sleep, then return the inputs unchanged."""
        if self.delay > 0:
            time.sleep(self.delay * len(requests))
        return super().edit(requests)


def editor_from_environment(settings: Settings) -> Editor:
    """The editor ``XMGIE_EDITOR`` selects: the settings' model (lazily loaded) or the no-op editor."""
    kind = os.environ.get(EDITOR_ENV, "pipeline").strip().lower()
    if kind == "noop":
        return DelayedNoOpEditor(
            float(os.environ.get(NOOP_DELAY_ENV, "0") or 0), float(os.environ.get(NOOP_LOAD_DELAY_ENV, "0") or 0)
        )
    if kind != "pipeline":
        raise ValueError(f"{EDITOR_ENV} must be 'pipeline' or 'noop', got {kind!r}")
    return lazy_pipeline_editor(settings)


@dataclass
class Resources:
    """What the tasks of one worker process share: created on its first task, kept until it exits."""

    pid: int
    settings: Settings
    engine: Engine
    session_factory: SessionFactory
    storage: Storage
    editor: Editor


_resources: Resources | None = None
_resources_lock = threading.Lock()


def resources() -> Resources:
    """This process' resources, created on first use (again in a forked child: nothing crosses a fork)."""
    global _resources
    pid = os.getpid()
    with _resources_lock:
        if _resources is None or _resources.pid != pid:
            settings = get_settings()
            engine = make_engine(settings.database_url)
            _resources = Resources(
                pid=pid,
                settings=settings,
                engine=engine,
                session_factory=make_session_factory(engine),
                storage=storage_from_settings(settings),
                editor=editor_from_environment(settings),
            )
        return _resources


def worker_id(hostname: str | None = None) -> str:
    """The lease owner name of this process: the worker's host name and the process id."""
    return f"{hostname or socket.gethostname()}:{os.getpid()}"


def publish_edits(item_ids: Sequence[uuid.UUID | str], micro_batch_size: int) -> None:
    """Publish ``xmgie.edit_items`` for ``item_ids`` on the ``gpu`` queue, in micro-batches."""
    publish_batches(celery_app, micro_batches(item_ids, micro_batch_size))


@celery_app.task(name=PUBLISH_EDITS_TASK)
def fan_out_edits(item_ids: list[str], micro_batch_size: int) -> int:
    """Publish the edits of a large submission (sent as one message by the API); the number of messages."""
    publish_edits(item_ids, micro_batch_size)
    messages = -(-len(item_ids) // max(1, micro_batch_size))
    logger.info("publish_edits: %d items in %d messages", len(item_ids), messages)
    return messages


@celery_app.task(name=EDIT_ITEMS_TASK, bind=True)
def edit_items(self: Task, item_ids: list[str]) -> dict[str, int]:
    """Process one micro-batch of items (claim, edit, store, record); items sent back to the queue are published
    again at once, items deferred for an unreachable storage after their pause (a retry of this message). A
    database that stays unreachable retries this message later instead of dropping it. Returns the number of items
    per outcome status.
    """
    shared = resources()
    settings = shared.settings
    deferral = StorageDeferral(
        done=self.request.retries or 0,
        max_delay_seconds=min(
            settings.storage_retry_max_delay_seconds, visibility_timeout_seconds(settings.lease_seconds) / 2
        ),
    )
    try:
        outcomes = process_items(
            session_factory=shared.session_factory,
            storage=shared.storage,
            editor=shared.editor,
            item_ids=[uuid.UUID(str(item_id)) for item_id in item_ids],
            worker=worker_id(self.request.hostname),
            settings=settings,
            on_jobs_finished=lambda job_ids: publish_pending_webhooks(shared, job_ids),
            storage_deferral=deferral,
        )
    except Exception as error:
        if not is_database_unavailable(error):
            raise
        delay = min(DATABASE_TASK_MAX_DELAY_SECONDS, 2.0 ** (self.request.retries or 0)) * random.uniform(0.5, 1.0)
        logger.warning("edit_items %s: database unavailable (%s); retrying in %.1f s", item_ids, error, delay)
        raise self.retry(countdown=delay, max_retries=DATABASE_TASK_RETRIES) from error
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    retried = [outcome.item_id for outcome in outcomes if outcome.status == ItemStatus.QUEUED.value]
    if retried:
        publish_edits(retried, settings.micro_batch_size)
    logger.info("edit_items %s: %s", item_ids, counts)
    deferred = [outcome for outcome in outcomes if outcome.status == DEFERRED]
    if deferred:
        countdown = max(outcome.retry_after_seconds or 0.0 for outcome in deferred)
        raise self.retry(args=[[str(outcome.item_id) for outcome in deferred]], countdown=countdown, max_retries=None)
    return counts


def publish_pending_webhooks(shared: Resources, job_ids: list[uuid.UUID]) -> None:
    """Publish the delivery of the pending webhooks among these just-ended jobs."""
    with shared.session_factory() as session:
        for job_id in webhooks.pending_webhooks_of(session=session, job_ids=job_ids):
            publish_webhook(job_id)


def publish_webhook(job_id: uuid.UUID, countdown: float | None = None) -> None:
    """Publish one delivery attempt of the job's webhook on the ``default`` queue, after ``countdown`` seconds."""
    deliver_webhook.apply_async(args=[str(job_id)], queue=DEFAULT_QUEUE, countdown=countdown)


@celery_app.task(name=DELIVER_WEBHOOK_TASK)
def deliver_webhook(job_id: str) -> str | None:
    """One delivery attempt of a finished job's webhook; while it stays pending the next attempt is published with
    a growing delay. A failure never changes the job; it is logged and kept on the job (``webhook_error``).
    """
    shared = resources()
    status = webhooks.deliver_webhook(
        session_factory=shared.session_factory, job_id=uuid.UUID(job_id), settings=shared.settings
    )
    if status == "pending":
        with shared.session_factory() as session:
            attempts = session.scalar(select(Job.webhook_attempts).where(Job.id == uuid.UUID(job_id))) or 0
        publish_webhook(uuid.UUID(job_id), countdown=webhooks.retry_delay_seconds(attempts))
    logger.info("deliver_webhook %s: %s", job_id, status)
    return status


@dataclass
class ReconcileReport:
    """What one reconciler run did."""

    released: int = 0
    """Running items with an expired lease put back in the queue."""
    ended: int = 0
    """Running items with an expired lease ended (failed with no attempts left, or canceled)."""
    republished: int = 0
    """Item ids published again (released ones and queued ones whose message may be lost)."""
    webhooks: int = 0
    """Pending webhooks whose delivery was published again."""

    def as_dict(self) -> dict[str, int]:
        """The report as a plain dictionary."""
        return {
            "released": self.released,
            "ended": self.ended,
            "republished": self.republished,
            "webhooks": self.webhooks,
        }


def reconcile_items(
    *,
    session_factory: SessionFactory,
    settings: Settings,
    publish: Callable[[list[uuid.UUID]], None],
    queued_after_seconds: float,
    republish_queued: bool = True,
    limit: int = RECONCILE_BATCH_LIMIT,
) -> ReconcileReport:
    """Release the running items whose lease expired and publish them again; publish the queued items older than
    ``queued_after_seconds`` too unless ``republish_queued`` is false. Each release is its own transaction.
    """
    report = ReconcileReport()
    now = utc_now()
    with session_factory() as session, session.begin():
        candidates = [
            (item.id, item.status)
            for item in transitions.items_to_reconcile(
                session=session, now=now, queued_before=now - timedelta(seconds=queued_after_seconds), limit=limit
            )
        ]
    to_publish: list[uuid.UUID] = []
    for item_id, status in candidates:
        if status == ItemStatus.RUNNING.value:
            with session_factory() as session, session.begin():
                item = transitions.release_expired_item(
                    session=session, item_id=item_id, max_attempts=settings.max_attempts
                )
                new_status = None if item is None else item.status
            if new_status == ItemStatus.QUEUED.value:
                report.released += 1
                to_publish.append(item_id)
            elif new_status is not None:
                report.ended += 1
        elif republish_queued:
            to_publish.append(item_id)
    if to_publish:
        publish(to_publish)
    report.republished = len(to_publish)
    return report


def _gpu_queue_depth() -> int | None:
    """Messages waiting on the ``gpu`` queue, or None when the broker cannot tell."""
    try:
        with celery_app.connection_for_read() as connection:
            return int(connection.default_channel.queue_declare(queue=GPU_QUEUE, passive=True).message_count)
    except Exception:  # noqa: BLE001 - an unknown depth only means queued items are published again
        return None


def _broker_lost_messages() -> bool:
    """Whether the broker lost its data since the last reconciler run (its marker key is gone); sets the marker.

    False when the broker is not Redis or cannot tell: then lost messages wait for the lease-long sweep.
    """
    try:
        with celery_app.connection_for_write() as connection:
            client = connection.default_channel.client
            return bool(client.set(BROKER_MARKER_KEY, utc_now().isoformat(), nx=True))
    except Exception:  # noqa: BLE001 - no marker only means the slower sweep applies
        return False


@celery_app.task(name=RECONCILE_TASK)
def reconcile(
    queued_after_seconds: float | None = None, webhooks_after_seconds: float | None = None
) -> dict[str, Any]:
    """Take back expired leases and publish again the queued items and pending webhooks whose message may be lost.

    Queued items count as possibly lost once older than ``queued_after_seconds`` (default: the lease duration)
    and only while the ``gpu`` queue is empty, so a long backlog is not flooded with duplicates; pending webhooks
    once untouched for ``webhooks_after_seconds`` (default ``STALE_WEBHOOK_SECONDS``).
    """
    shared = resources()
    settings = shared.settings
    depth = _gpu_queue_depth()
    broker_lost_messages = _broker_lost_messages()
    if queued_after_seconds is None:
        queued_after_seconds = 0.0 if broker_lost_messages else settings.lease_seconds
    report = reconcile_items(
        session_factory=shared.session_factory,
        settings=settings,
        publish=lambda item_ids: publish_edits(item_ids, settings.micro_batch_size),
        queued_after_seconds=queued_after_seconds,
        republish_queued=broker_lost_messages or not depth,
    )
    with shared.session_factory() as session:
        stale = webhooks.stale_pending_webhooks(
            session=session,
            older_than_seconds=STALE_WEBHOOK_SECONDS if webhooks_after_seconds is None else webhooks_after_seconds,
        )
    for job_id in stale:
        publish_webhook(job_id)
    report.webhooks = len(stale)
    logger.info(
        "reconcile: %s (gpu queue depth %s%s)",
        report.as_dict(),
        depth,
        ", the broker lost its messages" if broker_lost_messages else "",
    )
    return report.as_dict()


UNSTARTED_RUN_SECONDS = 300.0
"""A run without a job this long after its creation has lost its start message: the dispatcher sends it again."""


@celery_app.task(name=DISPATCH_SCHEDULES_TASK)
def dispatch_schedules() -> dict[str, int]:
    """Beat's tick: create the run of each due schedule slot (once per slot, whoever ticks) and start it; publish
    runs whose job ended without being published; start again runs whose start message was lost."""
    shared = resources()
    fired = runs.fire_due_schedules(session_factory=shared.session_factory)
    with shared.session_factory() as session:
        lost = [
            run_id
            for run_id in runs.unstarted_runs(session=session, older_than_seconds=UNSTARTED_RUN_SECONDS)
            if run_id not in fired
        ]
    for run_id in [*fired, *lost]:
        start_run_task.apply_async(args=[str(run_id)], queue=DEFAULT_QUEUE)
    published = runs.publish_finished_runs(session_factory=shared.session_factory, storage=shared.storage)
    report = {"fired": len(fired), "restarted": len(lost), "published": published}
    if any(report.values()):
        logger.info("dispatch_schedules: %s", report)
    return report


@celery_app.task(name=START_RUN_TASK)
def start_run_task(run_id: str) -> dict[str, Any]:
    """List a run's source, create its job, publish the job's items (after the commit)."""
    shared = resources()
    started = runs.start_run(
        session_factory=shared.session_factory,
        storage=shared.storage,
        run_id=uuid.UUID(run_id),
        max_items=shared.settings.max_items_per_job,
    )
    if started.item_ids:
        publish_edits(started.item_ids, shared.settings.micro_batch_size)
    logger.info("start_run %s: job %s, %d items", run_id, started.job_id, len(started.item_ids))
    return {"job_id": str(started.job_id) if started.job_id else None, "items": len(started.item_ids)}
