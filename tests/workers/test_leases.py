"""Lease heartbeats with real worker processes: a slow edit keeps its lease, a killed worker's lease runs out."""

from __future__ import annotations

import re
import signal
from datetime import UTC, datetime

from celery import Celery

from tests.workers.conftest import BROKER_URL, items_of, job_of, make_job, wait_for
from xmgie.jobs.dispatch import DEFAULT_QUEUE, RECONCILE_TASK, celery_dispatcher


def test_an_edit_slower_than_three_leases_finishes_once_while_the_reconciler_runs(
    session_factory, storage, start_worker, redis_db, tmp_path
) -> None:
    job_id, item_ids = make_job(session_factory, storage, 1)
    celery_dispatcher(BROKER_URL)(item_ids)
    lease = {"XMGIE_LEASE_SECONDS": "2", "XMGIE_RECONCILE_SECONDS": "1"}
    # A model load and an edit each longer than three leases; a second worker runs the reconciler every second.
    editor = start_worker("--pool=solo", "--queues=gpu", XMGIE_NOOP_LOAD_DELAY="6.5", XMGIE_NOOP_DELAY="6.5", **lease)
    bookkeeper = start_worker("--pool=solo", "--queues=default", **lease)
    beat = start_worker("--schedule-file", str(tmp_path / "beat-schedule"), command="beat", **lease)
    workers = [editor, bookkeeper, beat]

    wait_for(lambda: items_of(session_factory, job_id)[0].status == "succeeded", "the slow item", workers, 90)
    # The task logs its counts after the item's commit: wait for the line rather than race it.
    wait_for(lambda: "'succeeded': 1" in editor.log(), "the editor's report", workers, 10)

    assert items_of(session_factory, job_id)[0].attempts == 1
    assert job_of(session_factory, job_id).status == "succeeded"
    reconciles = re.findall(r"reconcile: \{'released': (\d+), 'ended': (\d+)", bookkeeper.log())
    # The reconciler ran all along the edit and never took the item back.
    assert len(reconciles) >= 5 and all(found == ("0", "0") for found in reconciles)
    assert "lease lost" not in editor.log()


def test_a_killed_workers_renewed_lease_still_runs_out_and_its_item_is_taken_over(
    session_factory, storage, start_worker, redis_db
) -> None:
    job_id, item_ids = make_job(session_factory, storage, 1)
    celery_dispatcher(BROKER_URL)(item_ids)
    doomed = start_worker("--pool=solo", XMGIE_LEASE_SECONDS="2", XMGIE_NOOP_DELAY="60")
    wait_for(lambda: items_of(session_factory, job_id)[0].status == "running", "the item to run", [doomed])
    first = items_of(session_factory, job_id)[0]
    first_deadline = first.lease_expires_at
    wait_for(
        lambda: items_of(session_factory, job_id)[0].lease_expires_at > first_deadline,
        "the heartbeat to renew the lease",
        [doomed],
        timeout=20,
    )

    doomed.kill(signal.SIGKILL)
    doomed.process.wait(timeout=10)
    last_deadline = items_of(session_factory, job_id)[0].lease_expires_at
    wait_for(lambda: datetime.now(UTC) > last_deadline, "the lease to run out", [doomed], timeout=10)
    # Nobody renews it any more: the heartbeat died with the process.
    assert items_of(session_factory, job_id)[0].lease_expires_at == last_deadline
    rescuer = start_worker("--pool=solo", XMGIE_LEASE_SECONDS="30", XMGIE_NOOP_DELAY="0.2")
    client = Celery("xmgie-test", broker=BROKER_URL, set_as_current=False)
    client.send_task(RECONCILE_TASK, queue=DEFAULT_QUEUE)
    client.close()

    wait_for(lambda: items_of(session_factory, job_id)[0].status == "succeeded", "the take-over", [doomed, rescuer])
    item = items_of(session_factory, job_id)[0]
    assert item.attempts == 2 and item.lease_owner != first.lease_owner
    assert "reconcile: {'released': 1" in rescuer.log()
