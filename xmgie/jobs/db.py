"""Database engines and sessions built from a URL (by default ``Settings.database_url``).

SQLite gets WAL journaling (readers never wait for the writer), enforced foreign keys and a busy timeout;
``postgresql://`` URLs use the psycopg (3) driver, a connect timeout, and a ping before a pooled connection is
handed out, so connections that died with a server restart are replaced instead of failing their first statement.
``retry_while_unavailable`` runs a unit of work again, on a fresh connection, while the database is unreachable.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, exc, make_url
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, sessionmaker

from xmgie.jobs.settings import get_settings

logger = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
"""How long a SQLite writer waits for the database lock before giving up."""
POSTGRES_CONNECT_TIMEOUT_SECONDS = 5
"""How long opening a PostgreSQL connection may take (a probe or request fails then, instead of hanging)."""
RETRY_FIRST_DELAY_SECONDS = 0.2
"""First pause of ``retry_while_unavailable``; each next one doubles (jittered) up to ``RETRY_MAX_DELAY_SECONDS``."""
RETRY_MAX_DELAY_SECONDS = 5.0

T = TypeVar("T")


def is_database_unavailable(error: BaseException) -> bool:
    """Whether ``error`` says the database could not be reached or dropped the connection (a server restart, a
    network cut, a full pool) rather than refusing the statement itself; such work can be tried again."""
    if isinstance(error, exc.DBAPIError) and error.connection_invalidated:
        return True
    if isinstance(error, exc.InterfaceError | exc.TimeoutError):
        return True
    if isinstance(error, exc.OperationalError):
        if type(error.orig).__module__.startswith("sqlite3"):
            # sqlite3 names a missing table an OperationalError too; only a lock or an unopenable file is passing.
            return any(sign in str(error.orig) for sign in ("locked", "unable to open"))
        return True
    return False


def retry_while_unavailable(work: Callable[[], T], *, give_up_after: float, what: str) -> T:
    """``work()``, called again after a jittered, growing pause each time it fails because the database is
    unavailable, for at most ``give_up_after`` seconds; the last such error is raised then. Other errors at once.

    ``work`` must be a whole transaction (it opens and commits its own session), so a retry starts it afresh on a
    new connection; whether a commit that failed had landed is the caller's to check.
    """
    deadline = time.monotonic() + give_up_after
    delay = RETRY_FIRST_DELAY_SECONDS
    while True:
        try:
            return work()
        except Exception as error:
            if not is_database_unavailable(error) or time.monotonic() + delay > deadline:
                raise
            logger.warning("%s: database unavailable (%s); trying again in %.1f s", what, type(error).__name__, delay)
        time.sleep(delay)
        delay = min(RETRY_MAX_DELAY_SECONDS, delay * 2) * random.uniform(0.75, 1.25)


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
    connect_args = {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_SECONDS, **engine_options.pop("connect_args", {})}
    return create_engine(parsed, pool_pre_ping=True, connect_args=connect_args, **engine_options)


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
