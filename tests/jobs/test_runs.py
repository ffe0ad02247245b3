"""Augmentation runs: slots fire once, runs are incremental under the schedule's fingerprint, the dataset manifest
lists exactly the succeeded outputs; on SQLite and PostgreSQL, a storage folder and an S3 server, with the item
machinery of the workers."""

from __future__ import annotations

import io
import json
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import Engine, func, select

from tests.services import S3_CREDENTIALS, moto_server
from xmgie.jobs import runs
from xmgie.jobs.db import make_session_factory
from xmgie.jobs.editor import NoOpEditor
from xmgie.jobs.models import Augmentation, Item, Run, Schedule, Tenant
from xmgie.jobs.processing import process_items
from xmgie.jobs.schedules import (
    ScheduleError,
    check_source_prefix,
    check_target_prefix,
    derived_seed,
    latest_slot,
    next_slot,
)
from xmgie.jobs.settings import Settings
from xmgie.jobs.storage import LocalStorage, S3Storage, Storage, data_prefix

T0 = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), (seed * 30 % 256, 90, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def factory(migrated_engine: Engine):
    return make_session_factory(migrated_engine)


@pytest.fixture(scope="module")
def moto_port() -> Iterator[int]:
    with moto_server() as port:
        yield port


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """A storage folder, or a fresh bucket on a moto S3 server process (outputs are then copied server-side)."""
    if request.param == "local":
        return LocalStorage(tmp_path / "storage")
    port = request.getfixturevalue("moto_port")
    bucket = f"runs-{uuid.uuid4().hex[:12]}"
    return S3Storage(bucket, endpoint_url=f"http://127.0.0.1:{port}", create_bucket=True, **S3_CREDENTIALS)


def new_schedule(factory, **fields) -> Schedule:
    with factory() as session, session.begin():
        tenant = Tenant(name=f"tenant-{uuid.uuid4().hex}")
        session.add(tenant)
        session.flush()
        values = {
            "name": "nightly",
            "interval_seconds": 60,
            "timezone": "UTC",
            "source_prefix": f"{data_prefix(tenant.id)}photos/",
            "target_prefix": f"{data_prefix(tenant.id)}augmented/",
            "instructions": [{"instruction": "make it snowy", "options": {}}],
            "variants": 1,
            "options": {},
            "enabled": True,
            "created_at": T0,
            "updated_at": T0,
            **fields,
        }
        schedule = Schedule(tenant_id=tenant.id, **values)
        session.add(schedule)
    return schedule


def add_images(storage: Storage, schedule: Schedule, names: list[str], data: bytes | None = None) -> None:
    for index, name in enumerate(names):
        storage.put_bytes(f"{schedule.source_prefix}{name}", data if data is not None else png(index), "image/png")


def run_once(factory, storage, schedule: Schedule, settings: Settings, now: datetime) -> Run:
    """Fire the schedule manually, start the run and process its items in-process; the run afterwards."""
    with factory() as session, session.begin():
        run_id = runs.fire_now(session=session, schedule_id=schedule.id, now=now).id
    started = runs.start_run(session_factory=factory, storage=storage, run_id=run_id, max_items=1000, now=now)
    if started.item_ids:
        process_items(
            session_factory=factory,
            storage=storage,
            editor=NoOpEditor(),
            item_ids=started.item_ids,
            worker="test",
            settings=settings,
        )
    with factory() as session:
        return session.get(Run, run_id)


def metadata(storage: Storage, schedule: Schedule) -> list[dict]:
    lines = storage.get_bytes(runs.metadata_key(schedule.target_prefix)).decode().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, max_attempts=2)


def test_interval_and_cron_slots():
    assert (
        latest_slot(cron=None, interval_seconds=60, timezone="UTC", anchor=T0, now=T0 + timedelta(seconds=59)) is None
    )
    slot = latest_slot(cron=None, interval_seconds=60, timezone="UTC", anchor=T0, now=T0 + timedelta(seconds=150))
    assert slot == T0 + timedelta(seconds=120)
    # 02:30 every day in Paris is 01:30 UTC in winter.
    paris = latest_slot(
        cron="30 2 * * *", interval_seconds=None, timezone="Europe/Paris", anchor=T0 - timedelta(days=3), now=T0
    )
    assert paris == datetime(2026, 11, 28, 1, 30, tzinfo=UTC)
    exact = latest_slot(
        cron="0 12 * * *", interval_seconds=None, timezone="UTC", anchor=T0 - timedelta(days=1), now=T0
    )
    assert exact == T0
    assert latest_slot(cron="0 12 * * *", interval_seconds=None, timezone="UTC", anchor=T0, now=T0) is None
    following = next_slot(cron="30 2 * * *", interval_seconds=None, timezone="Europe/Paris", anchor=T0, now=T0)
    assert following == datetime(2026, 11, 29, 1, 30, tzinfo=UTC)


def test_each_slot_fires_once_and_missed_slots_fire_once(factory):
    schedule = new_schedule(factory)
    other = new_schedule(factory, enabled=False)

    assert runs.fire_due_schedules(session_factory=factory, now=T0 + timedelta(seconds=30)) == []
    first = runs.fire_due_schedules(session_factory=factory, now=T0 + timedelta(seconds=61))
    again = runs.fire_due_schedules(session_factory=factory, now=T0 + timedelta(seconds=62))
    # Ten minutes of downtime: one run, for the latest slot.
    after_downtime = runs.fire_due_schedules(session_factory=factory, now=T0 + timedelta(seconds=60 * 11 + 5))

    assert len(first) == 1 and again == [] and len(after_downtime) == 1
    with factory() as session:
        slots = session.scalars(select(Run.slot).where(Run.schedule_id == schedule.id).order_by(Run.slot)).all()
        assert slots == [T0 + timedelta(seconds=60), T0 + timedelta(seconds=660)]
        assert session.get(Schedule, schedule.id).last_slot == T0 + timedelta(seconds=660)
        assert session.scalar(select(func.count()).where(Run.schedule_id == other.id)) == 0


def test_racing_dispatchers_create_one_run_per_slot(factory):
    schedule = new_schedule(factory, interval_seconds=10)
    created: list[uuid.UUID] = []
    barrier = threading.Barrier(4)

    def dispatcher(offset: float) -> None:
        barrier.wait()
        created.extend(runs.fire_due_schedules(session_factory=factory, now=T0 + timedelta(seconds=25 + offset)))

    threads = [threading.Thread(target=dispatcher, args=(offset / 10,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    with factory() as session:
        slots = session.scalars(select(Run.slot).where(Run.schedule_id == schedule.id)).all()
    assert slots == [T0 + timedelta(seconds=20)]
    assert len(created) == 1


def test_runs_are_incremental_under_the_fingerprint(factory, storage, settings):
    schedule = new_schedule(
        factory,
        instructions=[{"instruction": "make it snowy", "options": {}}, {"instruction": "at night", "options": {}}],
        variants=2,
    )
    add_images(storage, schedule, ["a.png", "b.png", "c.png", "notes.txt"])

    first = run_once(factory, storage, schedule, settings, T0)
    assert (first.status, first.image_count, first.item_count, first.succeeded_count) == ("succeeded", 3, 12, 12)
    assert first.published_at is not None
    rows = metadata(storage, schedule)
    assert len(rows) == 12
    assert all(storage.exists(f"{schedule.target_prefix}{row['file_name']}") for row in rows)
    with factory() as session:
        for augmentation, item in session.execute(
            select(Augmentation, Item)
            .join(Item, Item.id == Augmentation.item_id)
            .where(Augmentation.run_id == first.id)
        ):
            assert (
                item.seed
                == augmentation.seed
                == derived_seed(schedule.id, augmentation.source_key, augmentation.instruction, augmentation.variant)
            )
            assert item.input_key == augmentation.source_key

    nothing_new = run_once(factory, storage, schedule, settings, T0 + timedelta(minutes=1))
    assert (nothing_new.status, nothing_new.job_id, nothing_new.item_count) == ("succeeded", None, 0)

    add_images(storage, schedule, ["d.png", "e.png"])
    second = run_once(factory, storage, schedule, settings, T0 + timedelta(minutes=2))
    assert (second.image_count, second.item_count) == (5, 2 * 2 * 2)
    with factory() as session:
        keys = set(session.scalars(select(Augmentation.source_key).where(Augmentation.run_id == second.id)))
    assert keys == {f"{schedule.source_prefix}d.png", f"{schedule.source_prefix}e.png"}
    assert len(metadata(storage, schedule)) == 20

    with factory() as session, session.begin():
        session.get(Schedule, schedule.id).instructions = [{"instruction": "in autumn", "options": {}}]
    third = run_once(factory, storage, schedule, settings, T0 + timedelta(minutes=3))
    assert third.item_count == 5 * 1 * 2
    rows = metadata(storage, schedule)
    assert len(rows) == 30
    assert sum(row["instruction"] == "in autumn" for row in rows) == 10


def test_a_failed_item_does_not_stop_the_run_and_is_left_out_of_the_dataset(factory, storage, settings):
    schedule = new_schedule(factory)
    add_images(storage, schedule, ["a.png", "b.png"])
    add_images(storage, schedule, ["broken.png"], data=png(7)[:40])

    run = run_once(factory, storage, schedule, settings, T0)

    assert (run.status, run.item_count, run.succeeded_count, run.failed_count) == ("partial", 3, 2, 1)
    rows = metadata(storage, schedule)
    assert sorted(row["source_key"].rsplit("/", 1)[1] for row in rows) == ["a.png", "b.png"]
    assert all(storage.exists(f"{schedule.target_prefix}{row['file_name']}") for row in rows)
    images = storage.list_keys(f"{schedule.target_prefix}images/")
    assert len(images) == 2
    # A bad image is not retried by the next run; nothing else is new.
    again = run_once(factory, storage, schedule, settings, T0 + timedelta(minutes=1))
    assert again.item_count == 0 and again.job_id is None


def test_outputs_that_failed_for_a_transient_reason_are_planned_again(factory, storage, settings):
    schedule = new_schedule(factory)
    add_images(storage, schedule, ["a.png"])

    class Broken(NoOpEditor):
        def edit(self, requests):
            raise RuntimeError("out of memory")

    with factory() as session, session.begin():
        run_id = runs.fire_now(session=session, schedule_id=schedule.id, now=T0).id
    started = runs.start_run(session_factory=factory, storage=storage, run_id=run_id, max_items=10, now=T0)
    for _ in range(settings.max_attempts):
        process_items(
            session_factory=factory,
            storage=storage,
            editor=Broken(),
            item_ids=started.item_ids,
            worker="w",
            settings=settings,
        )
    with factory() as session:
        failed = session.get(Run, run_id)
        assert (failed.status, failed.failed_count) == ("failed", 1)
    assert metadata(storage, schedule) == []

    retried = run_once(factory, storage, schedule, settings, T0 + timedelta(minutes=1))
    assert (retried.item_count, retried.succeeded_count) == (1, 1)
    assert len(metadata(storage, schedule)) == 1


def test_publishing_twice_is_harmless_and_an_empty_source_is_reported(factory, storage, settings):
    schedule = new_schedule(factory)
    empty = run_once(factory, storage, schedule, settings, T0)
    assert (empty.status, empty.error_code, empty.job_id) == ("succeeded", "no_source_images", None)

    add_images(storage, schedule, ["a.png"])
    run = run_once(factory, storage, schedule, settings, T0 + timedelta(minutes=1))
    before = storage.get_bytes(runs.metadata_key(schedule.target_prefix))
    assert runs.publish_run(session_factory=factory, storage=storage, run_id=run.id) is False
    assert runs.publish_finished_runs(session_factory=factory, storage=storage) == 0
    assert storage.get_bytes(runs.metadata_key(schedule.target_prefix)) == before
    # Starting an already started run creates nothing more.
    again = runs.start_run(session_factory=factory, storage=storage, run_id=run.id, max_items=10)
    assert again.item_ids == [] and again.job_id == run.job_id


def test_a_source_prefix_is_a_folder_and_the_target_stays_out_of_it():
    tenant = uuid.uuid4()
    space = data_prefix(tenant)
    assert check_source_prefix(f"{space}photos", tenant) == f"{space}photos/"
    assert check_target_prefix(f"{space}out", tenant, source_prefix=f"{space}photos/") == f"{space}out/"
    for target, source in ((f"{space}photos/out", f"{space}photos/"), (f"{space}set/", space)):
        with pytest.raises(ScheduleError) as raised:
            check_target_prefix(target, tenant, source_prefix=source)
        assert raised.value.code == "target_overlaps_source"


def test_manual_runs_in_the_same_instant_are_two_runs(factory):
    schedule = new_schedule(factory)
    with factory() as session, session.begin():
        first = runs.fire_now(session=session, schedule_id=schedule.id, now=T0).slot
        second = runs.fire_now(session=session, schedule_id=schedule.id, now=T0).slot
    assert first == T0 and second == T0 + timedelta(microseconds=1)
