"""Job and item transitions on SQLite and PostgreSQL: idempotent submission, leases, retries, counts, cancel."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from xmgie.jobs.db import make_session_factory
from xmgie.jobs.exceptions import InvalidJobError, JobAlreadyTerminalError, LeaseLostError, NoSuchJobError
from xmgie.jobs.models import Item, Job, Tenant, utc_now
from xmgie.jobs.statuses import ItemStatus, JobStatus
from xmgie.jobs.transitions import (
    LEASE_EXPIRED_CODE,
    ItemSpec,
    cancel_item,
    cancel_job,
    claim_item,
    create_job,
    expired_leases,
    fail_item,
    is_cancel_requested,
    items_to_reconcile,
    release_expired_item,
    renew_leases,
    succeed_item,
)

LEASE = 60.0


def submit(session: Session, tenant_id: uuid.UUID, number: int = 1, **keywords: object) -> tuple[Job, list[Item]]:
    """Create and commit a job with ``number`` items; the job and its items in index order."""
    specs = [ItemSpec(input_key=f"uploads/{index}.png", instruction=f"edit {index}") for index in range(number)]
    job, _ = create_job(session=session, tenant_id=tenant_id, items=specs, **keywords)
    session.commit()
    return job, item_rows(session, job.id)


def item_rows(session: Session, job_id: uuid.UUID) -> list[Item]:
    query = select(Item).where(Item.job_id == job_id).order_by(Item.index).execution_options(populate_existing=True)
    return list(session.execute(query).scalars())


def reload_job(session: Session, job_id: uuid.UUID) -> Job:
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    return job


def claim(
    session: Session, item: Item, worker: str, now: datetime | None = None, max_attempts: int = 3
) -> Item | None:
    claimed = claim_item(
        session=session, item_id=item.id, worker=worker, lease_seconds=LEASE, max_attempts=max_attempts, now=now
    )
    session.commit()
    return claimed


def succeed(session: Session, item: Item, worker: str) -> Item:
    done = succeed_item(
        session=session,
        item_id=item.id,
        worker=worker,
        output_key=f"jobs/{item.job_id}/{item.index}.png",
        output_sha256="0" * 64,
    )
    session.commit()
    return done


def fail(session: Session, item: Item, worker: str, *, retry: bool, max_attempts: int = 3) -> Item:
    failed = fail_item(
        session=session,
        item_id=item.id,
        worker=worker,
        code="bad_image",
        message="cannot decode",
        retry=retry,
        max_attempts=max_attempts,
    )
    session.commit()
    return failed


def assert_counts_match_items(session: Session, job_id: uuid.UUID) -> None:
    """The job's count columns equal the number of its items in each status."""
    job = reload_job(session, job_id)
    actual = Counter(
        dict(
            session.execute(select(Item.status, func.count()).where(Item.job_id == job_id).group_by(Item.status)).all()
        )
    )
    assert {status.value: number for status, number in job.counts.items() if number} == dict(actual)
    assert job.item_count == sum(actual.values())


def test_create_job_stores_queued_items_in_order(session: Session, tenant_id: uuid.UUID) -> None:
    job, items = submit(session, tenant_id, 3, options={"steps": 4}, webhook_url="https://example.com/hook")
    assert job.status == JobStatus.QUEUED
    assert (job.item_count, job.queued_count, job.running_count) == (3, 3, 0)
    assert job.options == {"steps": 4}
    assert [item.index for item in items] == [0, 1, 2]
    assert [item.input_key for item in items] == ["uploads/0.png", "uploads/1.png", "uploads/2.png"]
    assert all(item.status == ItemStatus.QUEUED and item.attempts == 0 for item in items)
    assert job.created_at.tzinfo is not None


def test_same_idempotency_key_returns_the_same_job(session: Session, tenant_id: uuid.UUID) -> None:
    first, created = create_job(
        session=session, tenant_id=tenant_id, items=[{"input_key": "a.png", "instruction": "x"}], idempotency_key="k1"
    )
    session.commit()
    again, created_again = create_job(
        session=session,
        tenant_id=tenant_id,
        items=[{"input_key": "b.png", "instruction": "y"}, {"input_key": "c.png", "instruction": "z"}],
        idempotency_key="k1",
    )
    session.commit()
    assert (created, created_again) == (True, False)
    assert again.id == first.id
    assert [item.input_key for item in item_rows(session, first.id)] == ["a.png"]

    other_tenant = Tenant(name=f"other-{uuid.uuid4().hex}")
    session.add(other_tenant)
    session.commit()
    elsewhere, created_elsewhere = create_job(
        session=session,
        tenant_id=other_tenant.id,
        items=[{"input_key": "a.png", "instruction": "x"}],
        idempotency_key="k1",
    )
    session.commit()
    assert created_elsewhere is True
    assert elsewhere.id != first.id


def test_create_job_refuses_empty_or_malformed_items(session: Session, tenant_id: uuid.UUID) -> None:
    with pytest.raises(InvalidJobError, match="at least one item"):
        create_job(session=session, tenant_id=tenant_id, items=[])
    with pytest.raises(InvalidJobError, match="unknown fields"):
        create_job(session=session, tenant_id=tenant_id, items=[{"input_key": "a", "instruction": "b", "colour": 1}])
    with pytest.raises(InvalidJobError, match="incomplete"):
        create_job(session=session, tenant_id=tenant_id, items=[{"input_key": "a"}])


def test_second_claim_of_a_running_item_gets_none(session: Session, tenant_id: uuid.UUID) -> None:
    job, (item,) = submit(session, tenant_id)
    claimed = claim(session, item, "worker-a")
    assert claimed is not None
    assert (claimed.status, claimed.lease_owner, claimed.attempts) == (ItemStatus.RUNNING, "worker-a", 1)
    assert claim(session, item, "worker-b") is None
    assert reload_job(session, job.id).status == JobStatus.RUNNING
    assert reload_job(session, job.id).started_at is not None
    assert_counts_match_items(session, job.id)


def test_expired_lease_can_be_claimed_again_and_only_the_new_holder_completes(
    session: Session, tenant_id: uuid.UUID
) -> None:
    job, (item,) = submit(session, tenant_id)
    start = utc_now()
    assert claim(session, item, "worker-a", now=start) is not None
    assert claim(session, item, "worker-b", now=start + timedelta(seconds=LEASE - 1)) is None
    reclaimed = claim(session, item, "worker-b", now=start + timedelta(seconds=LEASE + 1))
    assert reclaimed is not None
    assert (reclaimed.attempts, reclaimed.lease_owner) == (2, "worker-b")
    with pytest.raises(LeaseLostError):
        succeed(session, item, "worker-a")
    session.rollback()
    done = succeed(session, item, "worker-b")
    assert done.status == ItemStatus.SUCCEEDED
    assert done.output_key == f"jobs/{job.id}/0.png"
    assert_counts_match_items(session, job.id)
    assert reload_job(session, job.id).status == JobStatus.SUCCEEDED


def test_succeeded_item_is_never_claimed_again(session: Session, tenant_id: uuid.UUID) -> None:
    job, (item,) = submit(session, tenant_id)
    claim(session, item, "worker-a")
    succeed(session, item, "worker-a")
    assert claim(session, item, "worker-b", now=utc_now() + timedelta(days=1)) is None
    (stored,) = item_rows(session, job.id)
    assert (stored.status, stored.attempts, stored.lease_owner) == (ItemStatus.SUCCEEDED, 1, "worker-a")
    with pytest.raises(LeaseLostError):
        fail(session, item, "worker-a", retry=True)


def test_retryable_failure_requeues_until_attempts_run_out(session: Session, tenant_id: uuid.UUID) -> None:
    job, (item,) = submit(session, tenant_id)
    claim(session, item, "worker-a", max_attempts=2)
    first = fail(session, item, "worker-a", retry=True, max_attempts=2)
    assert (first.status, first.attempts, first.lease_owner) == (ItemStatus.QUEUED, 1, None)
    assert reload_job(session, job.id).status == JobStatus.QUEUED
    second_claim = claim(session, item, "worker-b", max_attempts=2)
    assert second_claim is not None and second_claim.attempts == 2
    second = fail(session, item, "worker-b", retry=True, max_attempts=2)
    assert (second.status, second.error_code, second.finished_at is not None) == (ItemStatus.FAILED, "bad_image", True)
    assert claim(session, item, "worker-c", max_attempts=2) is None
    assert reload_job(session, job.id).status == JobStatus.FAILED
    assert_counts_match_items(session, job.id)


def test_failure_without_retry_is_final(session: Session, tenant_id: uuid.UUID) -> None:
    job, (item,) = submit(session, tenant_id)
    claim(session, item, "worker-a")
    assert fail(session, item, "worker-a", retry=False).status == ItemStatus.FAILED
    assert claim(session, item, "worker-a") is None


@pytest.mark.parametrize(
    ("outcomes", "expected"),
    [
        (["succeed", "succeed", "succeed"], JobStatus.SUCCEEDED),
        (["succeed", "fail", "succeed"], JobStatus.PARTIAL),
        (["fail", "fail", "fail"], JobStatus.FAILED),
    ],
)
def test_counts_and_job_status_follow_item_transitions(
    session: Session, tenant_id: uuid.UUID, outcomes: list[str], expected: JobStatus
) -> None:
    job, items = submit(session, tenant_id, len(outcomes))
    for item in items:
        claim(session, item, "worker-a")
    running = reload_job(session, job.id)
    assert (running.status, running.queued_count, running.running_count) == (JobStatus.RUNNING, 0, 3)
    for item, outcome in zip(items, outcomes, strict=True):
        assert reload_job(session, job.id).finished_at is None
        if outcome == "succeed":
            succeed(session, item, "worker-a")
        else:
            fail(session, item, "worker-a", retry=False)
        assert_counts_match_items(session, job.id)
    finished = reload_job(session, job.id)
    assert finished.status == expected
    assert (finished.succeeded_count, finished.failed_count) == (outcomes.count("succeed"), outcomes.count("fail"))
    assert finished.finished_at is not None


def test_cancel_queued_job_cancels_its_items(session: Session, tenant_id: uuid.UUID) -> None:
    job, items = submit(session, tenant_id, 3)
    canceled = cancel_job(session=session, job_id=job.id)
    session.commit()
    assert (canceled.status, canceled.canceled_count, canceled.queued_count) == (JobStatus.CANCELED, 3, 0)
    assert canceled.finished_at is not None
    assert all(item.status == ItemStatus.CANCELED for item in item_rows(session, job.id))
    assert claim(session, items[0], "worker-a") is None
    with pytest.raises(JobAlreadyTerminalError):
        cancel_job(session=session, job_id=job.id)


def test_cancel_finished_job_is_refused(session: Session, tenant_id: uuid.UUID) -> None:
    job, (item,) = submit(session, tenant_id)
    claim(session, item, "worker-a")
    succeed(session, item, "worker-a")
    with pytest.raises(JobAlreadyTerminalError):
        cancel_job(session=session, job_id=job.id)
    session.rollback()
    assert reload_job(session, job.id).status == JobStatus.SUCCEEDED


def test_cancel_running_job_leaves_running_items_to_their_worker(session: Session, tenant_id: uuid.UUID) -> None:
    job, (first, second) = submit(session, tenant_id, 2)
    claim(session, first, "worker-a")
    assert is_cancel_requested(session=session, job_id=job.id) is False
    cancel_job(session=session, job_id=job.id)
    session.commit()
    assert is_cancel_requested(session=session, job_id=job.id) is True
    pending = reload_job(session, job.id)
    assert (pending.status, pending.running_count, pending.canceled_count) == (JobStatus.RUNNING, 1, 1)
    assert claim(session, second, "worker-b") is None
    assert claim(session, first, "worker-b", now=utc_now() + timedelta(seconds=LEASE * 2)) is None
    cancel_job(session=session, job_id=job.id)
    session.commit()
    assert cancel_item(session=session, item_id=first.id, worker="worker-a").status == ItemStatus.CANCELED
    session.commit()
    assert reload_job(session, job.id).status == JobStatus.CANCELED
    assert_counts_match_items(session, job.id)


def test_cancel_unknown_or_foreign_job_is_no_such_job(session: Session, tenant_id: uuid.UUID) -> None:
    with pytest.raises(NoSuchJobError):
        cancel_job(session=session, job_id=uuid.uuid4())
    job, _ = submit(session, tenant_id)
    with pytest.raises(NoSuchJobError):
        cancel_job(session=session, job_id=job.id, tenant_id=uuid.uuid4())
    session.rollback()
    assert reload_job(session, job.id).status == JobStatus.QUEUED


def test_reconciler_releases_expired_leases(session: Session, tenant_id: uuid.UUID) -> None:
    job, (retried, exhausted, live) = submit(session, tenant_id, 3)
    start = utc_now()
    claim(session, retried, "worker-a", now=start, max_attempts=2)
    claim(session, exhausted, "worker-a", now=start, max_attempts=1)
    claim(session, live, "worker-a", now=start + timedelta(seconds=LEASE), max_attempts=2)
    later = start + timedelta(seconds=LEASE + 1)
    assert {item.id for item in expired_leases(session=session, now=later)} >= {retried.id, exhausted.id}
    assert live.id not in {item.id for item in items_to_reconcile(session=session, now=later)}

    requeued = release_expired_item(session=session, item_id=retried.id, max_attempts=2, now=later)
    failed = release_expired_item(session=session, item_id=exhausted.id, max_attempts=1, now=later)
    still_running = release_expired_item(session=session, item_id=live.id, max_attempts=2, now=later)
    session.commit()
    assert requeued is not None and (requeued.status, requeued.lease_owner) == (ItemStatus.QUEUED, None)
    assert failed is not None and (failed.status, failed.error_code) == (ItemStatus.FAILED, LEASE_EXPIRED_CODE)
    assert still_running is None
    assert retried.id in {item.id for item in items_to_reconcile(session=session, now=later + timedelta(seconds=1))}
    assert_counts_match_items(session, job.id)


def test_renewal_extends_only_the_leases_the_worker_still_holds(session: Session, tenant_id: uuid.UUID) -> None:
    job, (kept, expired, taken, finished, queued) = submit(session, tenant_id, 5)
    start = utc_now()
    for item in (kept, expired, taken, finished):
        claim(session, item, "worker-a", now=start)
    succeed(session, finished, "worker-a")
    later = start + timedelta(seconds=LEASE + 5)
    claim(session, taken, "worker-b", now=later)
    before = {item.id: item.lease_expires_at for item in item_rows(session, job.id)}

    # ``expired`` is past its deadline but nobody took it yet: it is still worker-a's, and renewing it is safe.
    renewed = renew_leases(
        session=session,
        item_ids=[item.id for item in (kept, expired, taken, finished, queued)],
        worker="worker-a",
        lease_seconds=LEASE,
        now=later,
    )
    session.commit()

    assert sorted(renewed) == sorted([kept.id, expired.id])
    after = {item.id: item for item in item_rows(session, job.id)}
    for item_id in (kept.id, expired.id):
        assert after[item_id].lease_expires_at == later + timedelta(seconds=LEASE)
        assert (after[item_id].status, after[item_id].lease_owner, after[item_id].attempts) == (
            "running",
            "worker-a",
            1,
        )
    for item_id in (taken.id, finished.id, queued.id):
        assert after[item_id].lease_expires_at == before[item_id]
    assert after[taken.id].lease_owner == "worker-b"
    # A renewed lease is not released by the reconciler.
    assert (
        release_expired_item(session=session, item_id=expired.id, max_attempts=3, now=later + timedelta(seconds=1))
        is None
    )
    session.commit()
    assert_counts_match_items(session, job.id)


@pytest.mark.parametrize("contenders", [2, 4])
def test_racing_claims_have_exactly_one_winner(migrated_engine: Engine, tenant_id: uuid.UUID, contenders: int) -> None:
    sessions = make_session_factory(migrated_engine)
    with sessions() as session:
        job, items = submit(session, tenant_id, 5)

    def contend(item_id: uuid.UUID, worker: str, start: threading.Barrier) -> bool:
        with sessions() as session:
            start.wait()
            claimed = claim_item(session=session, item_id=item_id, worker=worker, lease_seconds=LEASE, max_attempts=3)
            session.commit()
            return claimed is not None

    with ThreadPoolExecutor(max_workers=contenders) as pool:
        for item in items:
            start = threading.Barrier(contenders)
            results = [pool.submit(contend, item.id, f"worker-{n}", start) for n in range(contenders)]
            assert sum(result.result(timeout=30) for result in results) == 1

    with sessions() as session:
        assert all(item.attempts == 1 and item.status == ItemStatus.RUNNING for item in item_rows(session, job.id))
        assert_counts_match_items(session, job.id)
