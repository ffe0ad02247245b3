"""Outages met while processing: an unreachable storage does not spend attempts, an output write is retried in
place, a lease stays its worker's across a lost commit, an outage after an item's result is recorded never hides
that result, and database retries stop at their deadline."""

from __future__ import annotations

import io
import time
import uuid

import pytest
from PIL import Image
from sqlalchemy import Engine, exc, select

from tests.services import free_port
from xmgie.jobs import processing, transitions
from xmgie.jobs.db import is_database_unavailable, make_engine, retry_while_unavailable
from xmgie.jobs.editor import NoOpEditor
from xmgie.jobs.models import Item, Tenant, utc_now
from xmgie.jobs.processing import DEFERRED, StorageDeferral, process_items
from xmgie.jobs.settings import Settings
from xmgie.jobs.storage import LocalStorage, StorageUnavailableError, manifest_key

WORKER = "outage-worker"


class FlakyStorage(LocalStorage):
    """A storage folder that refuses reads and/or the next ``failing_writes`` writes of job outputs, as an
    unreachable S3 endpoint would."""

    def __init__(self, root, reads_down: bool = False, failing_writes: int = 0) -> None:
        super().__init__(root)
        self.reads_down = reads_down
        self.failing_writes = failing_writes
        self.output_writes = 0

    def get_bytes(self, key: str) -> bytes:
        if self.reads_down:
            raise StorageUnavailableError("S3 endpoint unreachable: connection refused")
        return super().get_bytes(key)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        if key.startswith("jobs/") and key.endswith(".png"):
            self.output_writes += 1
            if self.failing_writes > 0:
                self.failing_writes -= 1
                raise StorageUnavailableError("S3 endpoint unreachable: connection refused")
        return super().put_bytes(key, data, content_type)


class CountingEditor(NoOpEditor):
    def __init__(self) -> None:
        super().__init__()
        self.edited = 0

    def edit(self, requests):
        self.edited += len(requests)
        return super().edit(requests)


@pytest.fixture
def settings(engine: Engine) -> Settings:
    return Settings(database_url=str(engine.url), max_attempts=3, lease_seconds=60, storage_deferrals=5)


@pytest.fixture
def short_storage_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Storage retries pause 10 ms instead of 1 s at first (the backoff's shape is unchanged)."""
    monkeypatch.setattr(processing, "STORAGE_RETRY_FIRST_DELAY_SECONDS", 0.01)


def one_item(session_factory, storage: LocalStorage) -> uuid.UUID:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (10, 200, 30)).save(buffer, format="PNG")
    with session_factory() as session, session.begin():
        tenant = Tenant(name=f"tenant-{uuid.uuid4().hex}")
        session.add(tenant)
        session.flush()
        key = f"uploads/{tenant.id}/in.png"
        LocalStorage.put_bytes(storage, key, buffer.getvalue())
        job, _ = transitions.create_job(
            session=session, tenant_id=tenant.id, items=[{"input_key": key, "instruction": "x"}]
        )
        return session.execute(select(Item.id).where(Item.job_id == job.id)).scalar_one()


class OutageAfterResults:
    """A session factory that refuses connections, as a stopped PostgreSQL does, from the moment an item's result is
    recorded until ``outage_seconds`` later (``None``: for good)."""

    def __init__(self, session_factory, outage_seconds: float | None) -> None:
        self.session_factory = session_factory
        self.outage_seconds = outage_seconds
        self.down_since: float | None = None
        self.refused = 0

    def start(self) -> None:
        self.down_since = time.monotonic()

    def __call__(self):
        down = self.down_since is not None and (
            self.outage_seconds is None or time.monotonic() - self.down_since < self.outage_seconds
        )
        if down:
            self.refused += 1
            raise exc.OperationalError("connect", {}, ConnectionRefusedError("connection refused"))
        return self.session_factory()


@pytest.fixture
def outage_after_results(monkeypatch: pytest.MonkeyPatch, session_factory):
    """``make(outage_seconds)``: the session factory of an outage that begins once a result is recorded."""

    def make(outage_seconds: float | None) -> OutageAfterResults:
        outage = OutageAfterResults(session_factory, outage_seconds)
        record = transitions.succeed_item

        def succeed_then_go_down(**kwargs):
            recorded = record(**kwargs)
            outage.start()
            return recorded

        monkeypatch.setattr(transitions, "succeed_item", succeed_then_go_down)
        return outage

    return make


def item(session_factory, item_id: uuid.UUID) -> Item:
    with session_factory() as session:
        found = session.get(Item, item_id)
        assert found is not None
        return found


def test_unreadable_inputs_defer_the_item_without_spending_an_attempt(session_factory, settings, tmp_path):
    storage = FlakyStorage(tmp_path / "storage", reads_down=True)
    item_id = one_item(session_factory, storage)
    editor = CountingEditor()

    [outcome] = process_items(
        session_factory=session_factory,
        storage=storage,
        editor=editor,
        item_ids=[item_id],
        worker=WORKER,
        settings=settings,
        storage_deferral=StorageDeferral(done=3, max_delay_seconds=30.0),
    )

    assert outcome.status == DEFERRED and outcome.error_code == "storage_error"
    # The fourth deferral waits 8 s, jittered to 50-100 %.
    assert 4.0 <= outcome.retry_after_seconds <= 8.0
    deferred = item(session_factory, item_id)
    assert (deferred.status, deferred.attempts, deferred.lease_owner) == ("queued", 0, None)
    assert deferred.lease_expires_at > utc_now()
    with session_factory() as session:
        swept = transitions.items_to_reconcile(session=session, queued_before=utc_now())
    assert item_id not in {candidate.id for candidate in swept}, "the reconciler must wait for the scheduled retry"

    storage.reads_down = False
    [outcome] = process_items(
        session_factory=session_factory,
        storage=storage,
        editor=editor,
        item_ids=[item_id],
        worker=WORKER,
        settings=settings,
        storage_deferral=StorageDeferral(done=4, max_delay_seconds=30.0),
    )
    done = item(session_factory, item_id)
    assert (outcome.status, done.status, done.attempts, editor.edited) == ("succeeded", "succeeded", 1, 1)


def test_storage_failures_spend_attempts_once_the_deferrals_are_used_up(session_factory, settings, tmp_path):
    storage = FlakyStorage(tmp_path / "storage", reads_down=True)
    item_id = one_item(session_factory, storage)
    for deferral in (StorageDeferral(done=settings.storage_deferrals, max_delay_seconds=30.0), None):
        [outcome] = process_items(
            session_factory=session_factory,
            storage=storage,
            editor=CountingEditor(),
            item_ids=[item_id],
            worker=WORKER,
            settings=settings,
            storage_deferral=deferral,
        )
        assert outcome.status == "queued" and outcome.error_code == "storage_error"
    assert item(session_factory, item_id).attempts == 2


@pytest.mark.usefixtures("short_storage_pauses")
def test_a_failed_output_write_is_retried_in_place_and_the_edit_runs_once(session_factory, settings, tmp_path):
    storage = FlakyStorage(tmp_path / "storage", failing_writes=3)
    item_id = one_item(session_factory, storage)
    editor = CountingEditor()

    [outcome] = process_items(
        session_factory=session_factory,
        storage=storage,
        editor=editor,
        item_ids=[item_id],
        worker=WORKER,
        settings=settings.model_copy(update={"storage_retry_seconds": 30.0}),
    )

    done = item(session_factory, item_id)
    assert (outcome.status, done.attempts, editor.edited, storage.output_writes) == ("succeeded", 1, 1, 4)
    assert storage.exists(done.output_key)


@pytest.mark.usefixtures("short_storage_pauses")
def test_an_output_write_failing_past_its_retry_time_spends_the_attempt(session_factory, settings, tmp_path):
    storage = FlakyStorage(tmp_path / "storage", failing_writes=1000)
    item_id = one_item(session_factory, storage)
    [outcome] = process_items(
        session_factory=session_factory,
        storage=storage,
        editor=CountingEditor(),
        item_ids=[item_id],
        worker=WORKER,
        settings=settings.model_copy(update={"storage_retry_seconds": 0.2}),
    )
    assert (outcome.status, outcome.error_code) == ("queued", "storage_error")
    assert 2 <= storage.output_writes < 1000
    assert item(session_factory, item_id).attempts == 1


def job_of(session_factory, item_id: uuid.UUID) -> uuid.UUID:
    return item(session_factory, item_id).job_id


def test_an_outage_right_after_a_result_is_ridden_through_and_the_job_ended(
    session_factory, outage_after_results, settings, tmp_path
):
    """The database stops just after the last item's success commits: the ended job is still found (its manifest
    written, its end announced) once the database is back, and the success is returned, never raised over."""
    storage = LocalStorage(tmp_path / "storage")
    item_id = one_item(session_factory, storage)
    outage = outage_after_results(0.5)
    announced = []

    [outcome] = process_items(
        session_factory=outage,
        storage=storage,
        editor=CountingEditor(),
        item_ids=[item_id],
        worker=WORKER,
        settings=settings,
        on_jobs_finished=announced.append,
    )

    job_id = job_of(session_factory, item_id)
    assert outage.refused > 0
    assert outcome.status == "succeeded" and item(session_factory, item_id).attempts == 1
    assert announced == [[job_id]]
    assert storage.exists(manifest_key(job_id))


def test_an_outage_outlasting_its_retries_after_a_result_still_returns_the_result(
    session_factory, outage_after_results, settings, tmp_path
):
    """What follows a recorded result (the ended jobs' manifests and announcements) is left to the readers and the
    sweeps when the database stays away: the caller still learns the item succeeded, so nothing redoes it."""
    storage = LocalStorage(tmp_path / "storage")
    item_id = one_item(session_factory, storage)
    outage = outage_after_results(None)
    announced = []

    [outcome] = process_items(
        session_factory=outage,
        storage=storage,
        editor=CountingEditor(),
        item_ids=[item_id],
        worker=WORKER,
        settings=settings.model_copy(update={"database_retry_seconds": 0.3}),
        on_jobs_finished=announced.append,
    )

    assert outage.refused > 1
    assert outcome.status == "succeeded" and item(session_factory, item_id).status == "succeeded"
    assert announced == [] and not storage.exists(manifest_key(job_of(session_factory, item_id)))


def test_a_failing_announcement_of_an_ended_job_does_not_hide_the_results(session_factory, settings, tmp_path):
    storage = LocalStorage(tmp_path / "storage")
    item_id = one_item(session_factory, storage)

    def announce(job_ids):
        raise exc.OperationalError("select", {}, ConnectionRefusedError("connection refused"))

    [outcome] = process_items(
        session_factory=session_factory,
        storage=storage,
        editor=CountingEditor(),
        item_ids=[item_id],
        worker=WORKER,
        settings=settings,
        on_jobs_finished=announce,
    )
    assert outcome.status == "succeeded"
    assert storage.exists(manifest_key(job_of(session_factory, item_id)))


def test_a_worker_takes_its_own_lease_again_with_the_same_attempts(session_factory, settings, tmp_path):
    """A claim that committed but whose answer was lost with the connection: the retry finds the lease its own."""
    item_id = one_item(session_factory, LocalStorage(tmp_path / "storage"))
    with session_factory() as session, session.begin():
        first = transitions.claim_item(
            session=session, item_id=item_id, worker=WORKER, lease_seconds=5, max_attempts=3
        )
        first_deadline = first.lease_expires_at
    with session_factory() as session, session.begin():
        assert (
            transitions.claim_item(session=session, item_id=item_id, worker="other", lease_seconds=60, max_attempts=3)
            is None
        )
        again = transitions.claim_item(
            session=session, item_id=item_id, worker=WORKER, lease_seconds=60, max_attempts=3
        )
    assert again is not None and again.attempts == 1 and again.lease_expires_at > first_deadline
    with session_factory() as session:
        assert session.get(Item, item_id).attempts == 1


def test_lease_renewal_only_touches_the_workers_own_leases(session_factory, tmp_path):
    storage = LocalStorage(tmp_path / "storage")
    mine, theirs = one_item(session_factory, storage), one_item(session_factory, storage)
    with session_factory() as session, session.begin():
        transitions.claim_item(session=session, item_id=mine, worker=WORKER, lease_seconds=5, max_attempts=3)
        transitions.claim_item(session=session, item_id=theirs, worker="other", lease_seconds=5, max_attempts=3)
    with session_factory() as session, session.begin():
        renewed = transitions.renew_leases(session=session, item_ids=[mine, theirs], worker=WORKER, lease_seconds=600)
    assert renewed == [mine]
    assert (item(session_factory, mine).lease_expires_at - utc_now()).total_seconds() > 500
    assert (item(session_factory, theirs).lease_expires_at - utc_now()).total_seconds() < 10


def test_database_retries_stop_at_their_deadline_on_a_refused_connection():
    engine = make_engine(f"postgresql://postgres@127.0.0.1:{free_port()}/nothing")
    calls = []

    def ping() -> None:
        calls.append(time.monotonic())
        with engine.connect():
            pass

    with pytest.raises(Exception) as raised:
        retry_while_unavailable(ping, give_up_after=1.0, what="pinging")
    engine.dispose()
    assert is_database_unavailable(raised.value)
    assert len(calls) >= 3 and calls[-1] - calls[0] <= 1.0


def test_errors_of_the_statement_itself_are_not_retried(engine: Engine):
    calls = []

    def bad() -> None:
        calls.append(1)
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT * FROM no_such_table")

    with pytest.raises(Exception) as raised:
        retry_while_unavailable(bad, give_up_after=5.0, what="a bad query")
    assert not is_database_unavailable(raised.value) and calls == [1]
