"""Databases for the job tests: a migrated SQLite file and a fresh PostgreSQL database on 127.0.0.1."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from tests.jobs.databases import POSTGRES_SERVER_URL, fresh_postgres_database, postgres_reachable
from xmgie.jobs.db import make_engine, make_session_factory
from xmgie.jobs.migrate import upgrade_database
from xmgie.jobs.models import Tenant
from xmgie.jobs.storage import LocalStorage


@pytest.fixture(scope="session")
def postgres_available() -> None:
    """Skip PostgreSQL cases when no server runs on the test host."""
    if not postgres_reachable():
        pytest.skip(f"PostgreSQL is not reachable at {POSTGRES_SERVER_URL}")


@pytest.fixture(scope="session")
def postgres_url(postgres_available: None) -> Iterator[str]:
    """A fresh database shared by this test session's PostgreSQL cases."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def migrated_engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """An engine on a database brought to the newest schema by the migrations, once per backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('jobs-db') / 'xmgie.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    upgrade_database(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def session(migrated_engine: Engine) -> Iterator[Session]:
    """A session on the migrated database; tests commit as the service does."""
    with make_session_factory(migrated_engine)() as session:
        yield session


@pytest.fixture
def tenant_id(migrated_engine: Engine) -> uuid.UUID:
    """A tenant of its own for each test, so tests sharing a database never see each other's jobs."""
    with make_session_factory(migrated_engine)() as session:
        tenant = Tenant(name=f"tenant-{uuid.uuid4().hex}")
        session.add(tenant)
        session.commit()
        return tenant.id


@pytest.fixture(scope="module")
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """A migrated SQLite database of the test module's own, for the processing tests that run the worker loop."""
    url = f"sqlite:///{tmp_path_factory.mktemp(request.module.__name__.rsplit('.', 1)[-1]) / 'jobs.db'}"
    upgrade_database(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def session_factory(engine: Engine):
    return make_session_factory(engine)


@pytest.fixture
def storage(tmp_path) -> LocalStorage:
    """A storage folder of the test's own (modules testing several backends define their own ``storage``)."""
    return LocalStorage(tmp_path / "storage")
