"""The one place where job and item statuses change; API routes and worker tasks call these functions.

Every transition locks the job's row first (an UPDATE of ``jobs.updated_at``: a row lock on PostgreSQL, the
database write lock on SQLite), then changes items with conditional UPDATEs, then moves the job's counts and
re-derives its status, all in the caller's transaction. Taking the job row first everywhere gives one lock order
(job, then items), so concurrent transitions of the same job serialize instead of deadlocking, and the counts
always match the items once the transaction commits. The conditional UPDATEs are what guarantee that a succeeded
item is never claimed again and that only the lease holder can complete an item.

Call a transition before reading anything else in the session's transaction: on SQLite a transaction that has
already read may fail to upgrade to a writer.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, insert, or_, select, update
from sqlalchemy.orm import Session

from xmgie.jobs.db import upsert_insert
from xmgie.jobs.exceptions import (
    IdempotencyKeyReusedError,
    InvalidJobError,
    JobAlreadyTerminalError,
    LeaseLostError,
    NoSuchItemError,
    NoSuchJobError,
)
from xmgie.jobs.models import Item, Job, utc_now
from xmgie.jobs.settings import get_settings
from xmgie.jobs.statuses import ItemStatus, JobStatus, WebhookStatus, derive_job_status

LEASE_EXPIRED_CODE = "lease_expired"
"""Error code of an item whose worker vanished (lease expired) on its last allowed attempt."""


@dataclass(frozen=True)
class ItemSpec:
    """What a submission says about one item; the job's position gives its index."""

    input_key: str
    instruction: str
    mask_key: str | None = None
    identity_key: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None


_ITEM_SPEC_FIELDS = frozenset(spec_field.name for spec_field in fields(ItemSpec))


def _as_item_spec(index: int, item: ItemSpec | Mapping[str, Any]) -> ItemSpec:
    if isinstance(item, ItemSpec):
        return item
    unknown = set(item) - _ITEM_SPEC_FIELDS
    if unknown:
        raise InvalidJobError(f"item {index} has unknown fields {sorted(unknown)}")
    try:
        return ItemSpec(**item)
    except TypeError as error:
        raise InvalidJobError(f"item {index} is incomplete: {error}") from error


def _lock_job(session: Session, job_filter: ColumnElement[bool], now: datetime) -> Job | None:
    """Lock the job row matching ``job_filter`` for the rest of the transaction and return it freshly loaded."""
    locked = update(Job).where(job_filter).values(updated_at=now).returning(Job.id)
    job_id = session.execute(locked.execution_options(synchronize_session=False)).scalar_one_or_none()
    if job_id is None:
        return None
    return session.get(Job, job_id, populate_existing=True)


def _lock_job_of_item(session: Session, item_id: uuid.UUID, now: datetime) -> Job:
    job_of_item = select(Item.job_id).where(Item.id == item_id).scalar_subquery()
    job = _lock_job(session, Job.id == job_of_item, now)
    if job is None:
        raise NoSuchItemError(f"no item {item_id}")
    return job


def _update_item(
    session: Session, item_id: uuid.UUID, conditions: Sequence[ColumnElement[bool]], values: Mapping[str, Any]
) -> Item | None:
    """Apply ``values`` to the item if it still meets ``conditions``; the updated item, or None if it did not."""
    statement = update(Item).where(Item.id == item_id, *conditions).values(**values).returning(Item)
    return session.execute(statement.execution_options(populate_existing=True)).scalar_one_or_none()


def _move_counts(job: Job, source: ItemStatus, target: ItemStatus, number: int = 1) -> None:
    setattr(job, f"{source.value}_count", getattr(job, f"{source.value}_count") - number)
    setattr(job, f"{target.value}_count", getattr(job, f"{target.value}_count") + number)


def _refresh_job_status(session: Session, job: Job, now: datetime) -> None:
    status = derive_job_status(job.counts, cancel_requested=job.cancel_requested_at is not None)
    job.status = status.value
    if status.is_terminal() and job.finished_at is None:
        job.finished_at = now
        if job.webhook_url and job.webhook_status is None:
            # Recorded with the transition that ended the job: the delivery survives any crash after the commit.
            job.webhook_status = WebhookStatus.PENDING.value
    session.flush()


def _same_request(job: Job, request_fingerprint: str | None) -> Job:
    """``job`` if it was created by the same request; jobs from before fingerprints were stored count as the same."""
    if request_fingerprint is not None and job.request_fingerprint not in (None, request_fingerprint):
        raise IdempotencyKeyReusedError(
            f"idempotency key {job.idempotency_key!r} was used for job {job.id} with another request body"
        )
    return job


def create_job(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    items: Sequence[ItemSpec | Mapping[str, Any]],
    options: Mapping[str, Any] | None = None,
    idempotency_key: str | None = None,
    request_fingerprint: str | None = None,
    webhook_url: str | None = None,
    now: datetime | None = None,
) -> tuple[Job, bool]:
    """Create a queued job with its queued items; ``(job, created)``.

    With an ``idempotency_key`` already used by the tenant, nothing is written and the existing job comes back with
    ``created=False`` (also when two submissions race: the unique constraint decides, the loser gets the winner's job).
    ``request_fingerprint`` identifies the submission's body: when both it and the existing job's are known and
    differ, the key is being reused for another request and ``IdempotencyKeyReusedError`` is raised.
    """
    now = now or utc_now()
    if idempotency_key is not None:
        existing = _job_by_idempotency_key(session, tenant_id, idempotency_key)
        if existing is not None:
            return _same_request(existing, request_fingerprint), False
    specs = [_as_item_spec(index, item) for index, item in enumerate(items)]
    if not specs:
        raise InvalidJobError("a job needs at least one item")

    job_id = uuid.uuid4()
    job_row = {
        "id": job_id,
        "tenant_id": tenant_id,
        "status": JobStatus.QUEUED.value,
        "options": dict(options or {}),
        "idempotency_key": idempotency_key,
        "request_fingerprint": request_fingerprint,
        "webhook_url": webhook_url,
        "item_count": len(specs),
        "queued_count": len(specs),
        "running_count": 0,
        "succeeded_count": 0,
        "failed_count": 0,
        "canceled_count": 0,
        "created_at": now,
        "updated_at": now,
    }
    statement = (
        upsert_insert(session)(Job)
        .values(**job_row)
        .on_conflict_do_nothing(index_elements=["tenant_id", "idempotency_key"])
        .returning(Job.id)
    )
    if session.execute(statement).scalar_one_or_none() is None:
        existing = _job_by_idempotency_key(session, tenant_id, idempotency_key)
        if existing is None:
            raise RuntimeError(f"job insert for idempotency key {idempotency_key!r} conflicted but found no job")
        return _same_request(existing, request_fingerprint), False

    item_rows = [
        {
            **{name: getattr(spec, name) for name in _ITEM_SPEC_FIELDS},
            "id": uuid.uuid4(),
            "job_id": job_id,
            "index": index,
            "status": ItemStatus.QUEUED.value,
            "attempts": 0,
            "created_at": now,
        }
        for index, spec in enumerate(specs)
    ]
    session.execute(insert(Item), item_rows)
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    return job, True


def _job_by_idempotency_key(session: Session, tenant_id: uuid.UUID, idempotency_key: str | None) -> Job | None:
    query = select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == idempotency_key)
    return session.execute(query.execution_options(populate_existing=True)).scalar_one_or_none()


def claim_item(
    *,
    session: Session,
    item_id: uuid.UUID,
    worker: str,
    lease_seconds: float,
    max_attempts: int,
    now: datetime | None = None,
) -> Item | None:
    """Take the item's lease for ``worker``: the running item, or None if it is not this worker's to run.

    A queued item, or a running one whose lease has expired, is claimed when it has attempts left; its attempts go
    up by one. A running item whose lease ``worker`` already holds is kept by it with a fresh deadline and the same
    attempts (its earlier claim committed but the worker never heard so, e.g. the database connection dropped).
    None when another worker holds a live lease, the item is finished, its attempts are used up, or its job is
    being canceled.
    """
    now = now or utc_now()
    job = _lock_job_of_item(session, item_id, now)
    if job.cancel_requested_at is not None:
        return None
    renewed = {"lease_expires_at": now + timedelta(seconds=lease_seconds)}
    own = _update_item(session, item_id, _held_by(worker), renewed)
    if own is not None:
        _refresh_job_status(session, job, now)
        return own
    lease = {
        "status": ItemStatus.RUNNING.value,
        "lease_owner": worker,
        "lease_expires_at": now + timedelta(seconds=lease_seconds),
        "attempts": Item.attempts + 1,
        "started_at": now,
    }
    has_attempts_left = Item.attempts < max_attempts
    item = _update_item(session, item_id, [Item.status == ItemStatus.QUEUED.value, has_attempts_left], lease)
    if item is not None:
        _move_counts(job, ItemStatus.QUEUED, ItemStatus.RUNNING)
    else:
        lease_expired = [Item.status == ItemStatus.RUNNING.value, Item.lease_expires_at < now, has_attempts_left]
        item = _update_item(session, item_id, lease_expired, lease)
        if item is None:
            return None
    if job.started_at is None:
        job.started_at = now
    _refresh_job_status(session, job, now)
    return item


def _held_by(worker: str) -> list[ColumnElement[bool]]:
    return [Item.status == ItemStatus.RUNNING.value, Item.lease_owner == worker]


def _leave_running(
    session: Session,
    job: Job,
    item_id: uuid.UUID,
    worker: str,
    target: ItemStatus,
    values: dict[str, Any],
    now: datetime,
) -> Item:
    """Move the running item ``worker`` holds to ``target`` with ``values``, counting it in its (locked) job.
    Raises ``LeaseLostError`` unless ``worker`` holds the lease."""
    item = _update_item(session, item_id, _held_by(worker), values)
    if item is None:
        raise LeaseLostError(f"worker {worker!r} does not hold item {item_id}")
    _move_counts(job, ItemStatus.RUNNING, target)
    _refresh_job_status(session, job, now)
    return item


def succeed_item(
    *,
    session: Session,
    item_id: uuid.UUID,
    worker: str,
    output_key: str,
    output_sha256: str,
    mask_output_key: str | None = None,
    expressive_instruction: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    timings: Mapping[str, Any] | None = None,
    now: datetime | None = None,
) -> Item:
    """Record the item's result; raises ``LeaseLostError`` unless ``worker`` holds the item's lease."""
    now = now or utc_now()
    job = _lock_job_of_item(session, item_id, now)
    result = {
        "status": ItemStatus.SUCCEEDED.value,
        "lease_expires_at": None,
        "output_key": output_key,
        "output_sha256": output_sha256,
        "mask_output_key": mask_output_key,
        "expressive_instruction": expressive_instruction,
        "metrics": dict(metrics) if metrics is not None else None,
        "timings": dict(timings) if timings is not None else None,
        "error_code": None,
        "error_message": None,
        "finished_at": now,
    }
    return _leave_running(session, job, item_id, worker, ItemStatus.SUCCEEDED, result, now)


def fail_item(
    *,
    session: Session,
    item_id: uuid.UUID,
    worker: str,
    code: str,
    message: str,
    retry: bool,
    max_attempts: int | None = None,
    now: datetime | None = None,
) -> Item:
    """Record a failed attempt; raises ``LeaseLostError`` unless ``worker`` holds the item's lease.

    With ``retry`` and attempts left (``max_attempts``, default ``Settings.max_attempts``) the item goes back to
    queued for another attempt; otherwise it ends failed with the error. A retryable failure of a job being
    canceled ends the item canceled.
    """
    now = now or utc_now()
    max_attempts = max_attempts if max_attempts is not None else get_settings().max_attempts
    job = _lock_job_of_item(session, item_id, now)
    current = session.get(Item, item_id, populate_existing=True)
    if current is None or current.status != ItemStatus.RUNNING.value or current.lease_owner != worker:
        raise LeaseLostError(f"worker {worker!r} does not hold item {item_id}")
    if retry and job.cancel_requested_at is not None:
        target = ItemStatus.CANCELED
    elif retry and current.attempts < max_attempts:
        target = ItemStatus.QUEUED
    else:
        target = ItemStatus.FAILED
    outcome: dict[str, Any] = {
        "status": target.value,
        "lease_owner": None,
        "lease_expires_at": None,
        "error_code": code,
        "error_message": message,
        "finished_at": now if target.is_terminal() else None,
    }
    return _leave_running(session, job, item_id, worker, target, outcome, now)


def defer_item(
    *,
    session: Session,
    item_id: uuid.UUID,
    worker: str,
    code: str,
    message: str,
    not_before: datetime,
    now: datetime | None = None,
) -> Item:
    """Give back a claimed item that could not start for a reason outside it (the storage is unreachable): queued
    again without spending the attempt its claim counted, with the error kept for the user to see, and left alone by
    the reconciler until ``not_before`` (kept in ``lease_expires_at``; whoever defers it publishes it for then). A
    job being canceled ends the item canceled. Raises ``LeaseLostError`` unless ``worker`` holds the lease.
    """
    now = now or utc_now()
    job = _lock_job_of_item(session, item_id, now)
    target = ItemStatus.CANCELED if job.cancel_requested_at is not None else ItemStatus.QUEUED
    outcome: dict[str, Any] = {
        "status": target.value,
        "lease_owner": None,
        "lease_expires_at": not_before if target is ItemStatus.QUEUED else None,
        "attempts": Item.attempts - 1,
        "error_code": code,
        "error_message": message,
        "finished_at": now if target.is_terminal() else None,
    }
    return _leave_running(session, job, item_id, worker, target, outcome, now)


def renew_leases(
    *,
    session: Session,
    item_ids: Sequence[uuid.UUID],
    worker: str,
    lease_seconds: float,
    now: datetime | None = None,
) -> list[uuid.UUID]:
    """Push the lease deadline of the items ``worker`` holds among ``item_ids`` to ``now + lease_seconds``; the ids
    whose lease it still held (the others were taken back or finished). No status changes, so no job row lock."""
    now = now or utc_now()
    if not item_ids:
        return []
    statement = (
        update(Item)
        .where(Item.id.in_(list(item_ids)), *_held_by(worker))
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .returning(Item.id)
    )
    return list(session.execute(statement.execution_options(synchronize_session=False)).scalars())


def cancel_item(*, session: Session, item_id: uuid.UUID, worker: str, now: datetime | None = None) -> Item:
    """End a running item as canceled (its worker saw the job's cancel request); ``LeaseLostError`` unless held."""
    now = now or utc_now()
    job = _lock_job_of_item(session, item_id, now)
    canceled = {"status": ItemStatus.CANCELED.value, "lease_expires_at": None, "finished_at": now}
    return _leave_running(session, job, item_id, worker, ItemStatus.CANCELED, canceled, now)


def cancel_job(
    *, session: Session, job_id: uuid.UUID, tenant_id: uuid.UUID | None = None, now: datetime | None = None
) -> Job:
    """Cancel a job: its queued items become canceled at once; running items finish or are canceled by their worker.

    Raises ``NoSuchJobError`` for an unknown job (or one of another tenant when ``tenant_id`` is given) and
    ``JobAlreadyTerminalError`` when the job has already finished. Canceling twice is harmless.
    """
    now = now or utc_now()
    job_filter = Job.id == job_id if tenant_id is None else (Job.id == job_id) & (Job.tenant_id == tenant_id)
    job = _lock_job(session, job_filter, now)
    if job is None:
        raise NoSuchJobError(f"no job {job_id}")
    if JobStatus(job.status).is_terminal():
        raise JobAlreadyTerminalError(f"job {job_id} is already {job.status}")
    if job.cancel_requested_at is None:
        job.cancel_requested_at = now
    canceled = (
        update(Item)
        .where(Item.job_id == job_id, Item.status == ItemStatus.QUEUED.value)
        .values(status=ItemStatus.CANCELED.value, finished_at=now)
        .returning(Item.id)
    )
    number = len(session.execute(canceled.execution_options(synchronize_session="fetch")).all())
    _move_counts(job, ItemStatus.QUEUED, ItemStatus.CANCELED, number)
    _refresh_job_status(session, job, now)
    return job


def release_expired_item(
    *, session: Session, item_id: uuid.UUID, max_attempts: int, now: datetime | None = None
) -> Item | None:
    """Take back a running item whose lease expired (its worker vanished): queued again if it has attempts left,
    failed with ``lease_expired`` if not, canceled if its job is being canceled. None if the lease is still live.
    """
    now = now or utc_now()
    job = _lock_job_of_item(session, item_id, now)
    current = session.get(Item, item_id, populate_existing=True)
    if current is None or current.status != ItemStatus.RUNNING.value or current.lease_expires_at is None:
        return None
    if current.lease_expires_at >= now:
        return None
    if job.cancel_requested_at is not None:
        target = ItemStatus.CANCELED
    elif current.attempts < max_attempts:
        target = ItemStatus.QUEUED
    else:
        target = ItemStatus.FAILED
    outcome: dict[str, Any] = {
        "status": target.value,
        "lease_owner": None,
        "lease_expires_at": None,
        "finished_at": now if target.is_terminal() else None,
    }
    if target is ItemStatus.FAILED:
        outcome["error_code"] = LEASE_EXPIRED_CODE
        outcome["error_message"] = f"the worker stopped answering on attempt {current.attempts} of {max_attempts}"
    expired = [Item.status == ItemStatus.RUNNING.value, Item.lease_expires_at < now]
    item = _update_item(session, item_id, expired, outcome)
    if item is None:
        return None
    _move_counts(job, ItemStatus.RUNNING, target)
    _refresh_job_status(session, job, now)
    return item


def expired_leases(*, session: Session, now: datetime | None = None, limit: int = 1000) -> list[Item]:
    """Running items whose lease deadline has passed, oldest deadline first."""
    now = now or utc_now()
    query = (
        select(Item)
        .where(Item.status == ItemStatus.RUNNING.value, Item.lease_expires_at < now)
        .order_by(Item.lease_expires_at)
        .limit(limit)
    )
    return list(session.execute(query).scalars())


def items_to_reconcile(
    *, session: Session, now: datetime | None = None, queued_before: datetime | None = None, limit: int = 1000
) -> list[Item]:
    """Items the reconciler must look at: running ones with an expired lease (release them with
    ``release_expired_item``) and queued ones created before ``queued_before`` (default ``now``), whose queue
    message may be lost (publish them again: a duplicate message is harmless, ``claim_item`` lets one through).
    A queued item deferred until a later time (``defer_item``) is left out until then: its message is scheduled.
    """
    now = now or utc_now()
    queued_before = queued_before or now
    query = (
        select(Item)
        .where(
            or_(
                (Item.status == ItemStatus.RUNNING.value) & (Item.lease_expires_at < now),
                (Item.status == ItemStatus.QUEUED.value)
                & (Item.created_at < queued_before)
                & or_(Item.lease_expires_at.is_(None), Item.lease_expires_at < now),
            )
        )
        .order_by(Item.created_at, Item.index)
        .limit(limit)
    )
    return list(session.execute(query).scalars())


def is_cancel_requested(*, session: Session, job_id: uuid.UUID) -> bool:
    """Whether someone asked to cancel the job (workers check this between steps of a running item)."""
    requested = session.execute(select(Job.cancel_requested_at).where(Job.id == job_id)).one_or_none()
    if requested is None:
        raise NoSuchJobError(f"no job {job_id}")
    return requested[0] is not None
