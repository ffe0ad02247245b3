"""Real Celery worker processes on a real Redis and a throw-away PostgreSQL database.

Workers run as ``python -m xmgie.cli worker`` in their own process group, with the no-op editor; every process a
test starts is stopped (SIGTERM, then SIGKILL of its group) when the test ends. The Redis database
(``XMGIE_TEST_REDIS_DB``, default 9) is flushed before each test.
"""

from __future__ import annotations

import io
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from tests.jobs.databases import fresh_postgres_database, postgres_reachable
from tests.services import WorkerProcess, WorkerStarter
from xmgie.jobs import transitions
from xmgie.jobs.db import make_engine, make_session_factory
from xmgie.jobs.migrate import upgrade_database
from xmgie.jobs.models import Item, Job, Tenant
from xmgie.jobs.storage import LocalStorage

REPO_ROOT = Path(__file__).resolve().parents[2]
REDIS_HOST = os.environ.get("XMGIE_TEST_REDIS_HOST", "127.0.0.1")
REDIS_DB = int(os.environ.get("XMGIE_TEST_REDIS_DB", "9"))
BROKER_URL = f"redis://{REDIS_HOST}:6379/{REDIS_DB}"
WAIT_SECONDS = 60.0


def _redis_client():
    import redis

    return redis.Redis(host=REDIS_HOST, port=6379, db=REDIS_DB, socket_connect_timeout=3)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A migrated throw-away PostgreSQL database for the worker tests."""
    if not postgres_reachable():
        pytest.skip("PostgreSQL is not reachable")
    with fresh_postgres_database() as url:
        upgrade_database(url)
        yield url


@pytest.fixture
def redis_db() -> Iterator[Any]:
    """A client of the (flushed) Redis database the workers use as broker."""
    import redis

    client = _redis_client()
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip(f"Redis is not reachable at {BROKER_URL}")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def session_factory(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def storage_dir(tmp_path: Path) -> Path:
    return tmp_path / "storage"


@pytest.fixture
def storage(storage_dir: Path) -> LocalStorage:
    return LocalStorage(storage_dir)


@pytest.fixture
def worker_env(database_url: str, storage_dir: Path, redis_db: Any, tmp_path: Path) -> dict[str, str]:
    """The environment of a worker: this test's broker, database and storage, the no-op editor."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("XMGIE_")}
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(
        PYTHONPATH=pythonpath,
        XMGIE_BROKER_URL=BROKER_URL,
        XMGIE_DATABASE_URL=database_url,
        XMGIE_STORAGE_URL=storage_dir.as_uri(),
        XMGIE_DATA_DIR=str(tmp_path / "data"),
        XMGIE_EDITOR="noop",
        HF_HUB_OFFLINE="1",
    )
    return env


@pytest.fixture
def start_worker(tmp_path: Path, worker_env: dict[str, str]) -> Iterator[Callable[..., WorkerProcess]]:
    """``start_worker(*cli_args, **env)``: a worker process, stopped when the test ends."""
    starter = WorkerStarter(tmp_path, worker_env)
    try:
        yield starter
    finally:
        starter.stop_all()


def png_bytes(seed: int, size: int = 24) -> bytes:
    image = Image.new("RGB", (size, size), (seed * 40 % 256, 80, 160))
    image.putpixel((seed % size, 0), (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_job(
    session_factory: sessionmaker[Session], storage: LocalStorage, count: int, options: dict[str, Any] | None = None
) -> tuple[uuid.UUID, list]:
    """A committed job of ``count`` items (inputs stored under uploads/); its id and item ids by index."""
    with session_factory() as session, session.begin():
        tenant = Tenant(name=f"tenant-{uuid.uuid4().hex}")
        session.add(tenant)
        session.flush()
        items = []
        for index in range(count):
            key = f"uploads/{tenant.id}/{uuid.uuid4().hex}.png"
            storage.put_bytes(key, png_bytes(index))
            items.append({"input_key": key, "instruction": f"edit {index}", "seed": index, "options": options or {}})
        job, _ = transitions.create_job(session=session, tenant_id=tenant.id, items=items)
        job_id = job.id
        item_ids = list(session.execute(select(Item.id).where(Item.job_id == job_id).order_by(Item.index)).scalars())
    return job_id, item_ids


def items_of(session_factory: sessionmaker[Session], job_id: uuid.UUID) -> list[Item]:
    with session_factory() as session:
        return list(session.execute(select(Item).where(Item.job_id == job_id).order_by(Item.index)).scalars())


def job_of(session_factory: sessionmaker[Session], job_id: uuid.UUID) -> Job:
    with session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def wait_for(condition: Callable[[], bool], what: str, workers: list[WorkerProcess], timeout: float = WAIT_SECONDS):
    """Poll ``condition`` every 0.2 s; fail with the workers' logs after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    logs = "\n".join(f"--- {worker.log_path.name}\n{worker.log()[-4000:]}" for worker in workers)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")
