"""Augmentation schedules with real processes: ``xmgie beat`` ticking every second, workers on Redis, PostgreSQL,
and moto's S3 server as storage."""

from __future__ import annotations

import io
import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from PIL import Image
from sqlalchemy import select

from tests.services import S3_CREDENTIALS, moto_server, s3_settings
from tests.workers.conftest import wait_for
from xmgie.jobs.models import Run, Schedule, Tenant
from xmgie.jobs.storage import S3Storage, data_prefix

BUCKET = "xmgie-schedules"


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), (seed * 50 % 256, 90, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def s3() -> Iterator[tuple[S3Storage, dict[str, str]]]:
    """A bucket on a moto server process, and the settings that point workers at it."""
    with moto_server() as port:
        endpoint = f"http://127.0.0.1:{port}"
        storage = S3Storage(BUCKET, endpoint_url=endpoint, create_bucket=True, **S3_CREDENTIALS)
        env = {
            **s3_settings(port, BUCKET),
            "XMGIE_SCHEDULE_TICK_SECONDS": "0.5",
            "XMGIE_RECONCILE_SECONDS": "60",
        }
        yield storage, env


def _schedule(session_factory, storage: S3Storage, *, interval: int, images: int, variants: int = 1) -> Schedule:
    with session_factory() as session, session.begin():
        tenant = Tenant(name=f"tenant-{uuid.uuid4().hex}")
        session.add(tenant)
        session.flush()
        space = data_prefix(tenant.id)
        schedule = Schedule(
            tenant_id=tenant.id,
            name="every-second",
            interval_seconds=interval,
            timezone="UTC",
            source_prefix=f"{space}photos/",
            target_prefix=f"{space}augmented/",
            instructions=[{"instruction": "make it snowy", "options": {}}, {"instruction": "at dusk", "options": {}}],
            variants=variants,
            options={},
            enabled=True,
            created_at=datetime.now(UTC),
            updated_at=datetime.now(UTC),
        )
        session.add(schedule)
    for index in range(images):
        storage.put_bytes(f"{schedule.source_prefix}{index}.png", _png(index), "image/png")
    return schedule


def _runs(session_factory, schedule_id: uuid.UUID) -> list[Run]:
    with session_factory() as session:
        return list(session.scalars(select(Run).where(Run.schedule_id == schedule_id).order_by(Run.slot)))


def _disable(session_factory, schedule_id: uuid.UUID) -> None:
    with session_factory() as session, session.begin():
        session.get(Schedule, schedule_id).enabled = False


def test_a_one_second_schedule_fires_and_publishes_its_dataset(session_factory, start_worker, redis_db, s3, tmp_path):
    storage, env = s3
    schedule = _schedule(session_factory, storage, interval=1, images=3, variants=2)
    worker = start_worker("--pool=solo", **env)
    beat = start_worker("--schedule-file", str(tmp_path / "beat"), command="beat", **env)

    def published() -> bool:
        return any(
            run.published_at is not None and run.job_id is not None for run in _runs(session_factory, schedule.id)
        )

    wait_for(published, "a run of the schedule to be published", [worker, beat], timeout=90)
    _disable(session_factory, schedule.id)

    run = next(run for run in _runs(session_factory, schedule.id) if run.job_id is not None)
    assert (run.status, run.image_count, run.item_count, run.succeeded_count) == ("succeeded", 3, 12, 12)
    rows = [json.loads(line) for line in storage.get_bytes(f"{schedule.target_prefix}metadata.jsonl").splitlines()]
    assert len(rows) == 12
    for row in rows:
        assert storage.exists(f"{schedule.target_prefix}{row['file_name']}"), row["file_name"]
        assert row["source_key"].startswith(schedule.source_prefix)
        assert row["instruction"] in ("make it snowy", "at dusk")
    assert len({row["seed"] for row in rows}) == 12
    assert "Sending due task dispatch-schedules (xmgie.dispatch_schedules)" in beat.log()
    # Later slots found nothing new to edit: no second job.
    assert sum(run.job_id is not None for run in _runs(session_factory, schedule.id)) == 1


def test_two_beats_create_exactly_one_run_per_slot(session_factory, start_worker, redis_db, s3, tmp_path):
    storage, env = s3
    schedule = _schedule(session_factory, storage, interval=1, images=1)
    workers = [start_worker("--pool=solo", **env) for _ in range(2)]
    beats = [
        start_worker("--schedule-file", str(tmp_path / f"beat-{index}"), command="beat", **env) for index in range(2)
    ]
    everyone = [*workers, *beats]

    wait_for(lambda: len(_runs(session_factory, schedule.id)) >= 6, "six slots to fire", everyone, timeout=90)
    _disable(session_factory, schedule.id)
    wait_for(
        lambda: all(run.finished_at is not None for run in _runs(session_factory, schedule.id)),
        "every run to end",
        everyone,
    )

    slots = [run.slot for run in _runs(session_factory, schedule.id)]
    assert len(slots) == len(set(slots))
    seconds = [(slot - slots[0]).total_seconds() for slot in slots]
    assert all(second == int(second) for second in seconds)
    # Both beats ticked, and both workers ran dispatchers, yet each slot made one run.
    for beat in beats:
        assert beat.log().count("Sending due task dispatch-schedules") >= 4
    fired = sum(
        int(count) for worker in workers for count in re.findall(r"dispatch_schedules: \{'fired': (\d+)", worker.log())
    )
    assert fired == len(slots)
    assert sum("dispatch_schedules" in worker.log() for worker in workers) >= 1
