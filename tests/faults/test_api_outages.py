"""``xmgie api`` while a service it depends on refuses connections: 503 with the JSON envelope and a code, never a
bare 500, and nothing half-created."""

from __future__ import annotations

import io
import uuid

import httpx2
import pytest
from PIL import Image
from sqlalchemy import func, select

from tests.services import api_server, free_port, service_env
from xmgie.jobs.auth import KEY_PREFIX, create_api_key
from xmgie.jobs.db import make_engine, session_scope
from xmgie.jobs.migrate import upgrade_database
from xmgie.jobs.models import Job

pytestmark = pytest.mark.faults


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_route_answers_503_database_unavailable_while_the_database_refuses(tmp_path):
    env = service_env(
        XMGIE_DATA_DIR=str(tmp_path),
        XMGIE_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/gone",
        XMGIE_STORAGE_URL=f"file://{tmp_path / 'storage'}",
    )
    headers = {"Authorization": f"Bearer {KEY_PREFIX}some-key"}
    with api_server(env, tmp_path / "api.log") as base_url, httpx2.Client(base_url=base_url, timeout=30) as client:
        answers = [
            client.get(f"/v1/jobs/{uuid.uuid4()}", headers=headers),
            client.post("/v1/jobs", headers=headers, json={"items": [{"image": "x", "instruction": "y"}]}),
            client.post("/v1/uploads", headers=headers, files={"file": ("in.png", _png(), "image/png")}),
            client.get("/v1/schedules", headers=headers),
        ]
        ready = client.get("/readyz")
    for answer in answers:
        assert answer.status_code == 503, (answer.request.url, answer.text)
        assert answer.json()["error"]["code"] == "database_unavailable"
        assert answer.headers["retry-after"]
    assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith("error")


def test_a_submission_while_the_broker_is_down_is_refused_with_503_and_creates_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'xmgie.db'}"
    upgrade_database(url)
    engine = make_engine(url)
    with session_scope(engine) as session:
        headers = {"Authorization": f"Bearer {create_api_key(session=session, tenant_name='outage')}"}
    env = service_env(
        XMGIE_DATA_DIR=str(tmp_path),
        XMGIE_DATABASE_URL=url,
        XMGIE_STORAGE_URL=f"file://{tmp_path / 'storage'}",
        XMGIE_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0",
    )
    with api_server(env, tmp_path / "api.log") as base_url, httpx2.Client(base_url=base_url, timeout=30) as client:
        uploaded = client.post("/v1/uploads", headers=headers, files={"file": ("in.png", _png(), "image/png")})
        assert uploaded.status_code == 201, uploaded.text
        body = {"items": [{"image": uploaded.json()["reference"], "instruction": "make it blue"}]}
        answer = client.post("/v1/jobs", headers=headers, json=body)
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "broker_unavailable"
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(Job)) == 0
    engine.dispose()
