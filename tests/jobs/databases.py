"""Throw-away PostgreSQL databases on the test server (127.0.0.1 unless XMGIE_TEST_POSTGRES_URL says otherwise)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

POSTGRES_SERVER_URL = os.environ.get("XMGIE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
"""A maintenance database on the test server, used to create and drop a throw-away database per test session."""


def _server_url_with_database(database: str) -> str:
    return POSTGRES_SERVER_URL.rsplit("/", 1)[0] + f"/{database}"


def postgres_reachable() -> bool:
    """Whether the test PostgreSQL server answers."""
    import psycopg

    try:
        with psycopg.connect(POSTGRES_SERVER_URL, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """The URL of a new empty database, dropped (with its connections) afterwards."""
    import psycopg

    name = f"xmgie_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_SERVER_URL, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _server_url_with_database(name)
    finally:
        with psycopg.connect(POSTGRES_SERVER_URL, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
