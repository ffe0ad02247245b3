"""Database engines and sessions built from a URL (by default ``Settings.database_url``).

SQLite gets WAL journaling (readers never wait for the writer), enforced foreign keys and a busy timeout;
``postgresql://`` URLs use the psycopg (3) driver.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, sessionmaker

from xmgie.jobs.settings import get_settings

SQLITE_BUSY_TIMEOUT_MS = 30_000
"""How long a SQLite writer waits for the database lock before giving up."""


def upsert_insert(session: Session) -> Any:
    """The INSERT construct of the session's dialect, with ``on_conflict_do_nothing`` (PostgreSQL or SQLite)."""
    from sqlalchemy.dialects import postgresql, sqlite

    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def engine_url(url: str | URL) -> URL:
    """The URL with a driver that is installed: ``postgresql://`` and ``postgres://`` become ``postgresql+psycopg``."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _configure_sqlite_connection(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def make_engine(url: str | URL | None = None, **engine_options: Any) -> Engine:
    """A new engine for ``url`` (default: the configured database), creating a SQLite file's folder if needed."""
    parsed = engine_url(url if url is not None else get_settings().database_url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        engine = create_engine(parsed, connect_args=connect_args, **engine_options)
        event.listen(engine, "connect", _configure_sqlite_connection)
        return engine
    return create_engine(parsed, pool_pre_ping=True, **engine_options)


@lru_cache(maxsize=8)
def get_engine(url: str | None = None) -> Engine:
    """The process-wide engine for ``url`` (default: the configured database), created on first use."""
    return make_engine(url)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory bound to ``engine``; objects stay readable after commit."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """A session that commits when the block ends normally and rolls back when it raises."""
    session = make_session_factory(engine if engine is not None else get_engine())()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
