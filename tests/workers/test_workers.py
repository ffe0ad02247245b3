"""Celery workers as real processes: end to end, duplicate delivery, a worker killed mid-item."""

from __future__ import annotations

import hashlib
import re
import signal
import uuid
from datetime import UTC, datetime
from pathlib import Path

from celery import Celery

from tests.workers.conftest import BROKER_URL, items_of, job_of, make_job, wait_for
from xmgie.jobs import transitions
from xmgie.jobs.dispatch import DEFAULT_QUEUE, EDIT_ITEMS_TASK, RECONCILE_TASK, celery_dispatcher
from xmgie.jobs.storage import LocalStorage


def _outputs(storage_dir: Path, job_id: uuid.UUID) -> list[Path]:
    """The output images of a job in storage (not its masks, manifest or partial files)."""
    folder = storage_dir / "jobs" / str(job_id)
    return sorted(path for path in folder.glob("*.png") if not path.name.endswith(".mask.png"))


def _all_succeeded(session_factory, job_id: uuid.UUID):
    """A condition for ``wait_for``: every item succeeded (fails at once when one ended otherwise)."""

    def condition() -> bool:
        items = items_of(session_factory, job_id)
        ended = [(item.index, item.status, item.error_code) for item in items if item.status in ("failed", "canceled")]
        assert not ended, f"items ended without success: {ended}"
        return all(item.status == "succeeded" for item in items)

    return condition


def _assert_outputs_match(session_factory, storage: LocalStorage, storage_dir: Path, job_id: uuid.UUID) -> None:
    items = items_of(session_factory, job_id)
    for item in items:
        assert item.output_key == f"jobs/{job_id}/{item.index}.png"
        assert hashlib.sha256(storage.get_bytes(item.output_key)).hexdigest() == item.output_sha256
    assert [path.name for path in _outputs(storage_dir, job_id)] == sorted(f"{item.index}.png" for item in items)


def _succeeded_in_logs(*logs: str) -> int:
    """Items the workers' ``edit_items`` calls reported as succeeded, over all their log lines."""
    return sum(int(count) for log in logs for count in re.findall(r"edit_items .*'succeeded': (\d+)", log))


def test_items_dispatched_to_a_worker_all_succeed(session_factory, storage, storage_dir, start_worker, redis_db):
    job_id, item_ids = make_job(session_factory, storage, 6)
    celery_dispatcher(BROKER_URL, micro_batch_size=2)(item_ids)
    assert redis_db.llen("gpu") == 3
    worker = start_worker("--pool=solo")

    wait_for(_all_succeeded(session_factory, job_id), "all items to succeed", [worker])

    _assert_outputs_match(session_factory, storage, storage_dir, job_id)
    assert all(item.attempts == 1 for item in items_of(session_factory, job_id))
    job = job_of(session_factory, job_id)
    assert job.status == "succeeded" and job.succeeded_count == 6


def test_a_message_delivered_twice_edits_each_item_once(session_factory, storage, storage_dir, start_worker, redis_db):
    job_id, item_ids = make_job(session_factory, storage, 3)
    dispatch = celery_dispatcher(BROKER_URL, micro_batch_size=3)
    dispatch(item_ids)
    dispatch(item_ids)
    # Two pool processes take both copies at once and race for the claims.
    worker = start_worker("--pool=prefork", "--concurrency=2", XMGIE_NOOP_DELAY="0.5")

    wait_for(_all_succeeded(session_factory, job_id), "all items to succeed", [worker])
    wait_for(lambda: _succeeded_in_logs(worker.log()) >= 3 and "'skipped'" in worker.log(), "both copies", [worker])

    _assert_outputs_match(session_factory, storage, storage_dir, job_id)
    assert [item.attempts for item in items_of(session_factory, job_id)] == [1, 1, 1]
    assert _succeeded_in_logs(worker.log()) == 3
    job = job_of(session_factory, job_id)
    assert job.status == "succeeded" and job.succeeded_count == 3 and job.running_count == 0


def test_an_item_of_a_killed_worker_is_reconciled_and_done_once(
    session_factory, storage, storage_dir, start_worker, redis_db
):
    job_id, item_ids = make_job(session_factory, storage, 1)
    celery_dispatcher(BROKER_URL)(item_ids)
    doomed = start_worker("--pool=solo", XMGIE_LEASE_SECONDS="2", XMGIE_NOOP_DELAY="30")
    wait_for(lambda: items_of(session_factory, job_id)[0].status == "running", "the item to run", [doomed])

    doomed.kill(signal.SIGKILL)
    doomed.process.wait(timeout=10)
    item = items_of(session_factory, job_id)[0]
    assert item.status == "running" and item.attempts == 1
    assert _outputs(storage_dir, job_id) == []
    rescuer = start_worker("--pool=solo", XMGIE_LEASE_SECONDS="30", XMGIE_NOOP_DELAY="0.5")
    wait_for(lambda: datetime.now(UTC) > item.lease_expires_at, "the lease to expire", [doomed], timeout=10)
    client = Celery("xmgie-test", broker=BROKER_URL, set_as_current=False)
    client.send_task(RECONCILE_TASK, queue=DEFAULT_QUEUE)
    client.close()

    wait_for(_all_succeeded(session_factory, job_id), "the item to succeed", [doomed, rescuer])
    item = items_of(session_factory, job_id)[0]
    assert item.attempts == 2
    assert len(_outputs(storage_dir, job_id)) == 1
    _assert_outputs_match(session_factory, storage, storage_dir, job_id)
    assert "reconcile: {'released': 1" in rescuer.log()
    assert job_of(session_factory, job_id).status == "succeeded"
    assert EDIT_ITEMS_TASK in rescuer.log()


def test_a_worker_edits_with_the_tiny_model(session_factory, storage, storage_dir, start_worker, redis_db, tiny_dir):
    job_id, item_ids = make_job(
        session_factory, storage, 2, options={"max_side": 64, "num_inference_steps": 2, "max_new_tokens": 9}
    )
    celery_dispatcher(BROKER_URL, micro_batch_size=2)(item_ids)
    worker = start_worker(
        "--pool=prefork",
        "--concurrency=1",
        XMGIE_EDITOR="pipeline",
        XMGIE_MODEL=str(tiny_dir),
        XMGIE_MODEL_CACHE_DIR=str(tiny_dir.parent),
        XMGIE_DEVICE="cpu",
        XMGIE_DTYPE="float32",
    )

    wait_for(_all_succeeded(session_factory, job_id), "the tiny model's edits", [worker], timeout=90)

    _assert_outputs_match(session_factory, storage, storage_dir, job_id)
    items = items_of(session_factory, job_id)
    assert all(item.expressive_instruction is not None for item in items)
    assert all(item.timings["batch_size"] == 2.0 for item in items)


def _cancel(session_factory, job_id: uuid.UUID) -> datetime:
    """Cancel the job through the transition the API uses; the commit time of the cancel."""
    with session_factory() as session, session.begin():
        job = transitions.cancel_job(session=session, job_id=job_id)
        return job.cancel_requested_at


def _drained(redis_db, worker, expected_calls: int):
    """A condition: the gpu queue is empty and the worker logged ``expected_calls`` finished edit_items calls."""
    return lambda: redis_db.llen("gpu") == 0 and worker.log().count("edit_items [") >= expected_calls


def test_cancel_while_queued_starts_no_item(session_factory, storage, storage_dir, start_worker, redis_db):
    job_id, item_ids = make_job(session_factory, storage, 4)
    celery_dispatcher(BROKER_URL, micro_batch_size=2)(item_ids)
    _cancel(session_factory, job_id)
    worker = start_worker("--pool=solo")

    wait_for(_drained(redis_db, worker, 2), "both messages to be consumed", [worker])

    items = items_of(session_factory, job_id)
    assert [(item.status, item.attempts, item.started_at) for item in items] == [("canceled", 0, None)] * 4
    assert _outputs(storage_dir, job_id) == []
    assert "'skipped': 2" in worker.log()
    job = job_of(session_factory, job_id)
    assert job.status == "canceled" and job.canceled_count == 4


def test_cancel_while_running_starts_no_item_after_the_cancel(
    session_factory, storage, storage_dir, start_worker, redis_db
):
    job_id, item_ids = make_job(session_factory, storage, 5)
    celery_dispatcher(BROKER_URL, micro_batch_size=1)(item_ids)
    worker = start_worker("--pool=solo", XMGIE_NOOP_DELAY="1.5")
    wait_for(lambda: items_of(session_factory, job_id)[1].status == "running", "the second item to run", [worker])

    canceled_at = _cancel(session_factory, job_id)
    wait_for(lambda: job_of(session_factory, job_id).status == "canceled", "the job to end canceled", [worker])
    wait_for(_drained(redis_db, worker, 5), "every message to be consumed", [worker])

    items = items_of(session_factory, job_id)
    assert all(item.started_at is None or item.started_at < canceled_at for item in items)
    assert items[0].status == "succeeded"
    # The item running at the cancel finishes (or is canceled, if its worker had not yet started the edit).
    assert items[1].status in ("succeeded", "canceled") and items[1].attempts == 1
    assert [(item.status, item.attempts) for item in items[2:]] == [("canceled", 0)] * 3
    succeeded = [f"{item.index}.png" for item in items if item.status == "succeeded"]
    assert [path.name for path in _outputs(storage_dir, job_id)] == succeeded
    job = job_of(session_factory, job_id)
    assert (job.succeeded_count + job.canceled_count, job.running_count, job.queued_count) == (5, 0, 0)


def test_beat_reconciles_items_whose_message_was_lost(
    session_factory, storage, storage_dir, start_worker, redis_db, tmp_path
):
    # The rows are committed but no message was ever published (say, the API died right after its commit).
    job_id, _ = make_job(session_factory, storage, 3)
    assert redis_db.llen("gpu") == 0
    timing = {"XMGIE_LEASE_SECONDS": "2", "XMGIE_RECONCILE_SECONDS": "1"}
    worker = start_worker("--pool=solo", **timing)
    beat = start_worker("--schedule-file", str(tmp_path / "beat-schedule"), command="beat", **timing)

    wait_for(_all_succeeded(session_factory, job_id), "the lost items to be published again", [worker, beat])

    _assert_outputs_match(session_factory, storage, storage_dir, job_id)
    assert all(item.attempts == 1 for item in items_of(session_factory, job_id))
    assert "Sending due task reconcile (xmgie.reconcile)" in beat.log()
    assert re.search(r"reconcile: \{'released': 0, 'ended': 0, 'republished': 3", worker.log())


def test_a_large_job_is_published_by_a_worker_and_done_once(
    session_factory, storage, storage_dir, start_worker, redis_db
):
    from xmgie.jobs.dispatch import DIRECT_PUBLISH_MESSAGES

    count = DIRECT_PUBLISH_MESSAGES + 8
    job_id, item_ids = make_job(session_factory, storage, count)
    celery_dispatcher(BROKER_URL, micro_batch_size=1)(item_ids)
    assert (redis_db.llen("gpu"), redis_db.llen("default")) == (0, 1)
    worker = start_worker("--pool=solo")

    wait_for(_all_succeeded(session_factory, job_id), "every item of the large job", [worker])

    _assert_outputs_match(session_factory, storage, storage_dir, job_id)
    assert all(item.attempts == 1 for item in items_of(session_factory, job_id))
    assert f"publish_edits: {count} items in {count} messages" in worker.log()
