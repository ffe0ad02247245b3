"""The lease heartbeat: leases renewed while items are edited, lost leases noticed, the model loaded before claims."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.exc import OperationalError

from tests.conftest import gradient_image
from tests.jobs.test_processing import WORKER, PaintingEditor, items_of, make_job, png
from xmgie.jobs import transitions
from xmgie.jobs.editor import EditRequest, EditResult
from xmgie.jobs.leases import LeaseHeartbeat
from xmgie.jobs.models import Item, utc_now
from xmgie.jobs.processing import process_items
from xmgie.jobs.settings import Settings
from xmgie.jobs.storage import output_key

LEASE_SECONDS = 1


@pytest.fixture
def settings(engine: Engine) -> Settings:
    return Settings(database_url=str(engine.url), max_attempts=3, lease_seconds=LEASE_SECONDS)


class SlowEditor(PaintingEditor):
    """Paints like ``PaintingEditor`` after ``seconds`` of sleep; ``during(requests)`` runs as each edit starts."""

    def __init__(self, seconds: float, during: Callable[[list[EditRequest]], None] | None = None) -> None:
        super().__init__()
        self.seconds = seconds
        self.during = during

    def edit(self, requests: list[EditRequest]) -> list[EditResult]:
        if self.during is not None:
            self.during(requests)
        time.sleep(self.seconds)
        return super().edit(requests)


@pytest.fixture
def reconciler(session_factory) -> Iterator[list[uuid.UUID]]:
    """The reconciler's release of expired leases, every 0.1 s on a thread; the ids it released."""
    released: list[uuid.UUID] = []
    stop = threading.Event()

    def sweep() -> None:
        while not stop.wait(0.1):
            with session_factory() as session, session.begin():
                expired = [item.id for item in transitions.expired_leases(session=session)]
            for item_id in expired:
                with session_factory() as session, session.begin():
                    if transitions.release_expired_item(session=session, item_id=item_id, max_attempts=3):
                        released.append(item_id)

    thread = threading.Thread(target=sweep, daemon=True)
    thread.start()
    yield released
    stop.set()
    thread.join()


def _heartbeats_alive() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("lease-heartbeat")]


def test_an_edit_slower_than_three_leases_finishes_once_with_the_reconciler_running(
    session_factory, storage, settings, reconciler
) -> None:
    job_id, item_ids = make_job(session_factory, storage, [png(gradient_image(32, 24, phase)) for phase in (0, 1)])

    outcomes = process_items(
        session_factory=session_factory,
        storage=storage,
        editor=SlowEditor(3.5 * LEASE_SECONDS),
        item_ids=item_ids,
        worker=WORKER,
        settings=settings,
    )

    assert [outcome.status for outcome in outcomes] == ["succeeded", "succeeded"]
    assert reconciler == []
    items = items_of(session_factory, job_id)
    assert [(item.status, item.attempts, item.lease_owner) for item in items] == [("succeeded", 1, WORKER)] * 2
    assert _heartbeats_alive() == []


def test_without_the_heartbeat_such_an_edit_loses_its_lease(
    session_factory, storage, settings, reconciler, monkeypatch
) -> None:
    # The same edit with a heartbeat that never beats: the reconciler takes the item back mid-edit.
    monkeypatch.setattr(LeaseHeartbeat, "start", lambda self: self)
    job_id, item_ids = make_job(session_factory, storage, [png(gradient_image(32, 24, 0))])

    outcomes = process_items(
        session_factory=session_factory,
        storage=storage,
        editor=SlowEditor(3.5 * LEASE_SECONDS),
        item_ids=item_ids,
        worker=WORKER,
        settings=settings,
    )

    assert [outcome.status for outcome in outcomes] == ["skipped"]
    assert reconciler == item_ids
    assert items_of(session_factory, job_id)[0].status == "queued"


def test_a_lease_taken_over_during_the_edit_is_noticed_and_its_result_dropped(
    session_factory, storage, settings, caplog
) -> None:
    job_id, item_ids = make_job(session_factory, storage, [png(gradient_image(32, 24, 0))])

    def take_over(requests: list[EditRequest]) -> None:
        # Another worker claims the item as if this one had gone silent past its lease.
        with session_factory() as session, session.begin():
            taken = transitions.claim_item(
                session=session,
                item_id=item_ids[0],
                worker="other-worker",
                lease_seconds=60,
                max_attempts=3,
                now=utc_now() + timedelta(seconds=LEASE_SECONDS + 1),
            )
            assert taken is not None

    with caplog.at_level(logging.WARNING, logger="xmgie.jobs.processing"):
        outcomes = process_items(
            session_factory=session_factory,
            storage=storage,
            editor=SlowEditor(LEASE_SECONDS, during=take_over),
            item_ids=item_ids,
            worker=WORKER,
            settings=settings,
        )

    assert [outcome.status for outcome in outcomes] == ["skipped"]
    assert "lease lost during the edit; its result is dropped" in caplog.text
    # Nothing was written over what the new holder will write, and its lease is untouched.
    assert not storage.exists(output_key(job_id, 0))
    item = items_of(session_factory, job_id)[0]
    assert (item.status, item.lease_owner, item.attempts) == ("running", "other-worker", 2)


def test_a_failed_renewal_is_logged_and_the_next_one_renews(session_factory, storage, settings, caplog) -> None:
    job_id, item_ids = make_job(session_factory, storage, [png(gradient_image(32, 24, 0))])
    with session_factory() as session, session.begin():
        transitions.claim_item(
            session=session, item_id=item_ids[0], worker=WORKER, lease_seconds=LEASE_SECONDS, max_attempts=3
        )
    first_deadline = items_of(session_factory, job_id)[0].lease_expires_at
    calls = []

    def flaky_factory():
        calls.append(None)
        if len(calls) == 1:
            raise OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
        return session_factory()

    lost: list[uuid.UUID] = []
    heartbeat = LeaseHeartbeat(
        session_factory=flaky_factory, item_ids=item_ids, worker=WORKER, lease_seconds=60, on_lost=lost.append
    )
    with caplog.at_level(logging.WARNING, logger="xmgie.jobs.leases"):
        heartbeat.renew_once()
    assert "renewing the leases of 1 item(s) failed" in caplog.text
    assert items_of(session_factory, job_id)[0].lease_expires_at == first_deadline

    heartbeat.renew_once()
    assert items_of(session_factory, job_id)[0].lease_expires_at > first_deadline + timedelta(seconds=50)
    assert heartbeat.renewals == 1 and lost == []

    with session_factory() as session, session.begin():
        transitions.fail_item(session=session, item_id=item_ids[0], worker=WORKER, code="x", message="x", retry=True)
    heartbeat.renew_once()
    heartbeat.renew_once()
    assert lost == item_ids


def test_the_model_is_loaded_before_any_item_is_claimed(session_factory, storage, settings) -> None:
    job_id, item_ids = make_job(session_factory, storage, [png(gradient_image(32, 24, 0))])
    seen_at_load: list[tuple[str, int]] = []

    class LoadingEditor(PaintingEditor):
        def load(self) -> None:
            with session_factory() as session:
                rows = session.execute(select(Item.status, Item.attempts).where(Item.job_id == job_id)).all()
            seen_at_load.extend((status, attempts) for status, attempts in rows)

    outcomes = process_items(
        session_factory=session_factory,
        storage=storage,
        editor=LoadingEditor(),
        item_ids=item_ids,
        worker=WORKER,
        settings=settings,
    )

    assert seen_at_load == [("queued", 0)]
    assert [outcome.status for outcome in outcomes] == ["succeeded"]
