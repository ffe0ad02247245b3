"""An API on a migrated database (a SQLite file, and a throw-away PostgreSQL database) with local storage."""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import Engine, select

from api.main import create_app
from tests.jobs.databases import POSTGRES_SERVER_URL, fresh_postgres_database, postgres_reachable
from xmgie.jobs.auth import create_api_key
from xmgie.jobs.db import make_engine, session_scope
from xmgie.jobs.migrate import upgrade_database
from xmgie.jobs.models import Item
from xmgie.jobs.settings import Settings

MAX_ITEMS = 8
MAX_UPLOAD_BYTES = 64_000
MAX_PIXELS = 256 * 256


@pytest.fixture(scope="session")
def api_postgres_url() -> Iterator[str]:
    """A migrated throw-away PostgreSQL database shared by this session's API tests."""
    if not postgres_reachable():
        pytest.skip(f"PostgreSQL is not reachable at {POSTGRES_SERVER_URL}")
    with fresh_postgres_database() as url:
        upgrade_database(url)
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated database: a fresh SQLite file per test, or the session's PostgreSQL database."""
    if request.param == "postgresql":
        return request.getfixturevalue("api_postgres_url")
    url = f"sqlite:///{tmp_path / 'xmgie.db'}"
    upgrade_database(url)
    return url


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    """Small limits, so the limit tests stay small."""
    return Settings(
        data_dir=tmp_path,
        database_url=database_url,
        storage_url=f"file://{tmp_path / 'storage'}",
        max_items_per_job=MAX_ITEMS,
        max_upload_bytes=MAX_UPLOAD_BYTES,
        max_image_pixels=MAX_PIXELS,
        max_instruction_chars=200,
    )


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    """An engine of the tests' own, to look at what the API wrote."""
    engine = make_engine(settings.database_url)
    yield engine
    engine.dispose()


class Dispatched:
    """Records each dispatch call, and whether the items were committed (visible to another session) by then."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.calls: list[list[uuid.UUID]] = []
        self.committed: list[bool] = []

    def __call__(self, item_ids: list[uuid.UUID]) -> None:
        with session_scope(self.engine) as session:
            visible = set(session.scalars(select(Item.id).where(Item.id.in_(item_ids))))
        self.committed.append(visible == set(item_ids))
        self.calls.append(list(item_ids))


@pytest.fixture
def dispatched(engine: Engine) -> Dispatched:
    """The recording publisher the app is built with."""
    return Dispatched(engine)


@pytest.fixture
def client(settings: Settings, dispatched: Dispatched) -> Iterator[TestClient]:
    """A client of the app."""
    with TestClient(create_app(settings, dispatch=dispatched)) as client:
        yield client


@pytest.fixture
def new_key(engine: Engine) -> Callable[[], dict[str, str]]:
    """Issues a key for a new tenant; returns the Authorization header."""

    def issue() -> dict[str, str]:
        with session_scope(engine) as session:
            key = create_api_key(session=session, tenant_name=f"tenant-{uuid.uuid4().hex}")
        return {"Authorization": f"Bearer {key}"}

    return issue


@pytest.fixture
def auth(new_key: Callable[[], dict[str, str]]) -> dict[str, str]:
    """Tenant A's Authorization header."""
    return new_key()


def png_bytes(width: int = 32, height: int = 24, colour: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    """A small PNG file."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def upload(client: TestClient, headers: dict[str, str], data: bytes | None = None) -> str:
    """Upload an image and return its reference."""
    response = client.post(
        "/v1/uploads", headers=headers, files={"file": ("in.png", data or png_bytes(), "image/png")}
    )
    assert response.status_code == 201, response.text
    return response.json()["reference"]


def submit(client: TestClient, headers: dict[str, str], reference: str, count: int = 1, **body: Any) -> Any:
    """Submit a job of ``count`` items editing ``reference``."""
    items = [{"image": reference, "instruction": f"make it blue {index}"} for index in range(count)]
    return client.post("/v1/jobs", headers=headers, json={"items": items, **body})
