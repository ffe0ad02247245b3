"""The HTTP contract at its edges: bounds and texts the database could not hold, 405's ``Allow``, the PATCH schema,
reused idempotency keys and the envelope of unexpected errors (cases a fuzzer once turned into 5xx)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select, update

from api.main import create_app
from api.schemas import INT32_MAX
from tests.api.conftest import Dispatched, png_bytes, submit, upload
from tests.api.test_schedules import body as schedule_body
from tests.api.test_schedules import space
from xmgie.jobs.auth import tenant_for_key
from xmgie.jobs.db import session_scope
from xmgie.jobs.models import Item, Job, Schedule
from xmgie.jobs.settings import Settings

NUL = "a\x00b"
LONE_SURROGATE_JSON = '"a\\ud800b"'
"""A JSON string holding a lone surrogate (JSON allows the escape; UTF-8 and PostgreSQL cannot hold it)."""


def _post_raw(client: TestClient, path: str, headers: dict[str, str], body: str) -> Any:
    return client.post(path, headers={**headers, "Content-Type": "application/json"}, content=body.encode("ascii"))


def _error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return response.json()["error"]


def _count(engine: Engine, headers: dict[str, str], table: type[Job] | type[Schedule]) -> int:
    """The tenant's rows of ``table`` (the PostgreSQL database is shared by the session's tests)."""
    with session_scope(engine) as session:
        tenant = tenant_for_key(session=session, key=headers["Authorization"].removeprefix("Bearer "))
        assert tenant is not None
        return session.scalar(select(func.count()).select_from(table).where(table.tenant_id == tenant.id)) or 0


# --- Bounds of integer columns -------------------------------------------------------------------------------------


def test_item_cursor_above_the_column_range_is_refused(client: TestClient, auth: dict[str, str]) -> None:
    job = submit(client, auth, upload(client, auth), count=2).json()
    page = client.get(f"/v1/jobs/{job['id']}/items", headers=auth, params={"cursor": INT32_MAX})
    assert page.status_code == 200 and page.json()["data"] == []
    error = _error(client.get(f"/v1/jobs/{job['id']}/items", headers=auth, params={"cursor": INT32_MAX + 1}), 422)
    assert error["code"] == "invalid_request" and "cursor" in error["message"]


def test_interval_above_the_column_range_is_refused_on_create_and_change(
    client: TestClient, auth: dict[str, str], engine: Engine
) -> None:
    own = space(engine, auth)
    timing = {"cron": None, "interval_seconds": INT32_MAX + 1}
    error = _error(client.post("/v1/schedules", headers=auth, json=schedule_body(own, **timing)), 422)
    assert "interval_seconds" in error["message"]
    assert _count(engine, auth, Schedule) == 0

    created = client.post(
        "/v1/schedules", headers=auth, json=schedule_body(own, cron=None, interval_seconds=INT32_MAX)
    )
    assert created.status_code == 201, created.text
    schedule_id = created.json()["id"]
    error = _error(client.patch(f"/v1/schedules/{schedule_id}", headers=auth, json=timing), 422)
    assert "interval_seconds" in error["message"]
    assert client.get(f"/v1/schedules/{schedule_id}", headers=auth).json()["interval_seconds"] == INT32_MAX


# --- Texts PostgreSQL or UTF-8 cannot hold -------------------------------------------------------------------------


def test_nul_and_lone_surrogates_in_job_texts_are_refused(
    client: TestClient, auth: dict[str, str], engine: Engine, dispatched: Dispatched
) -> None:
    reference = upload(client, auth)
    item = {"image": reference, "instruction": "make it blue"}
    for field_name, target in (("instruction", "item"), ("idempotency_key", "job"), ("image", "item")):
        with_nul = {"items": [{**item, field_name: NUL}]} if target == "item" else {"items": [item], field_name: NUL}
        error = _error(client.post("/v1/jobs", headers=auth, json=with_nul), 422)
        assert field_name in error["message"] and "NUL" in error["message"], error
        raw = json.dumps(with_nul).replace(json.dumps(NUL), LONE_SURROGATE_JSON)
        # Pydantic refuses some surrogates itself (constrained strings), the others are refused as unstorable.
        error = _error(_post_raw(client, "/v1/jobs", auth, raw), 422)
        assert field_name in error["message"] and ("surrogate" in error["message"] or "unicode" in error["message"])
    assert _count(engine, auth, Job) == 0 and dispatched.calls == []


def test_nul_and_lone_surrogates_in_schedules_are_refused_and_not_stored(
    client: TestClient, auth: dict[str, str], engine: Engine
) -> None:
    own = space(engine, auth)
    cases = [
        {"name": NUL},
        {"instructions": [NUL]},
        {"instructions": [{"instruction": NUL}]},
        {"timezone": NUL},
        {"source": {"images": [f"{own}photos/{NUL}.png"]}},
    ]
    for fields in cases:
        payload = schedule_body(own, **fields)
        (field_name,) = fields
        error = _error(client.post("/v1/schedules", headers=auth, json=payload), 422)
        assert field_name in error["message"] and "NUL" in error["message"], error
        raw = json.dumps(payload).replace(json.dumps(NUL)[1:-1], LONE_SURROGATE_JSON[1:-1])
        # Pydantic refuses some surrogates itself (constrained strings), the others are refused as unstorable.
        error = _error(_post_raw(client, "/v1/schedules", auth, raw), 422)
        assert field_name in error["message"] and ("surrogate" in error["message"] or "unicode" in error["message"])
    assert _count(engine, auth, Schedule) == 0

    schedule_id = client.post("/v1/schedules", headers=auth, json=schedule_body(own)).json()["id"]
    error = _error(client.patch(f"/v1/schedules/{schedule_id}", headers=auth, json={"instructions": [NUL]}), 422)
    assert error["code"] == "invalid_request"
    with session_scope(engine) as session:
        stored = session.get(Schedule, uuid.UUID(schedule_id))
        assert stored is not None and all("\x00" not in entry["instruction"] for entry in stored.instructions)


@pytest.mark.parametrize(
    ("path", "code"),
    [
        (NUL, "invalid_request"),
        ("a" * 300 + ".png", "invalid_path"),  # a file name no file system holds
        ("/".join(["é" * 100] * 6) + ".png", "invalid_path"),  # under 1024 characters, over 1024 bytes
    ],
)
def test_upload_paths_that_no_backend_can_hold_are_refused(
    client: TestClient, auth: dict[str, str], path: str, code: str
) -> None:
    response = client.post(
        "/v1/uploads", headers=auth, files={"file": ("in.png", png_bytes(), "image/png")}, data={"path": path}
    )
    assert _error(response, 422)["code"] == code
    ok = client.post(
        "/v1/uploads", headers=auth, files={"file": ("in.png", png_bytes(), "image/png")}, data={"path": "é" * 90}
    )
    assert ok.status_code == 201, ok.text


# --- 405, PATCH schema, unexpected errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v1/schedules/{id}", {"GET", "PATCH", "DELETE"}),
        ("POST", "/v1/schedules/{id}", {"GET", "PATCH", "DELETE"}),
        ("DELETE", "/v1/schedules", {"GET", "POST"}),
        ("GET", "/v1/jobs", {"POST"}),
        ("DELETE", "/v1/jobs/{id}", {"GET"}),
    ],
)
def test_method_not_allowed_lists_every_allowed_method(
    client: TestClient, auth: dict[str, str], method: str, path: str, allowed: set[str]
) -> None:
    response = client.request(method, path.format(id=uuid.uuid4()), headers=auth)
    assert _error(response, 405)["code"] == "method_not_allowed"
    assert set(response.headers["Allow"].split(", ")) == allowed


def test_patch_schema_declares_nullable_exactly_what_the_server_accepts_as_null(
    client: TestClient, auth: dict[str, str], engine: Engine
) -> None:
    schema = client.get("/openapi.json").json()["components"]["schemas"]["ScheduleUpdate"]["properties"]

    def nullable(prop: dict[str, Any]) -> bool:
        return any(option.get("type") == "null" for option in prop.get("anyOf", []))

    assert {name for name, prop in schema.items() if nullable(prop)} == {"cron", "interval_seconds"}
    assert all("default" not in prop for name, prop in schema.items() if not nullable(prop))

    schedule_id = client.post("/v1/schedules", headers=auth, json=schedule_body(space(engine, auth))).json()["id"]
    for name in schema:
        if not nullable(schema[name]):
            error = _error(client.patch(f"/v1/schedules/{schedule_id}", headers=auth, json={name: None}), 422)
            assert name in error["message"]
    switched = client.patch(f"/v1/schedules/{schedule_id}", headers=auth, json={"cron": None, "interval_seconds": 60})
    assert switched.status_code == 200, switched.text
    assert switched.json()["cron"] is None and switched.json()["interval_seconds"] == 60


def test_unexpected_errors_get_the_envelope_and_are_logged(
    settings: Settings, auth: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    class BrokenStorage:
        def __getattr__(self, name: str) -> Callable[..., None]:
            def fail(*args: object, **kwargs: object) -> None:
                raise RuntimeError("the storage backend broke")

            return fail

    app = create_app(settings)
    app.state.storage = BrokenStorage()
    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level(logging.ERROR, "api.errors"):
        response = client.post("/v1/uploads", headers=auth, files={"file": ("in.png", png_bytes(), "image/png")})
    assert response.status_code == 500 and response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "internal_error"
    assert "the storage backend broke" not in response.text
    assert any("POST /v1/uploads" in record.getMessage() for record in caplog.records)


# --- Idempotency keys ----------------------------------------------------------------------------------------------


def test_reused_idempotency_key_with_another_body_conflicts(
    client: TestClient, auth: dict[str, str], engine: Engine, dispatched: Dispatched
) -> None:
    reference = upload(client, auth)
    first = submit(client, auth, reference, count=2, idempotency_key="nightly-7")
    assert first.status_code == 202, first.text

    # The same job written differently (defaults spelled out, keys in another order) is the same request.
    same = {
        "idempotency_key": "nightly-7",
        "options": {},
        "items": [{"instruction": f"make it blue {index}", "image": reference, "options": {}} for index in range(2)],
    }
    again = client.post("/v1/jobs", headers=auth, json=same)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]

    changed = submit(client, auth, reference, count=3, idempotency_key="nightly-7")
    error = _error(changed, 409)
    assert error["code"] == "idempotency_key_reused" and first.json()["id"] in error["message"]
    other_options = submit(
        client, auth, reference, count=2, idempotency_key="nightly-7", options={"num_inference_steps": 4}
    )
    assert _error(other_options, 409)["code"] == "idempotency_key_reused"
    assert _count(engine, auth, Job) == 1 and len(dispatched.calls) == 1
    with session_scope(engine) as session:
        items = select(func.count()).select_from(Item).where(Item.job_id == uuid.UUID(first.json()["id"]))
        assert session.scalar(items) == 2


def test_jobs_stored_without_a_fingerprint_match_any_body(
    client: TestClient, auth: dict[str, str], engine: Engine
) -> None:
    reference = upload(client, auth)
    first = submit(client, auth, reference, count=1, idempotency_key="from-before")
    with session_scope(engine) as session:
        session.execute(update(Job).where(Job.id == uuid.UUID(first.json()["id"])).values(request_fingerprint=None))
    again = submit(client, auth, reference, count=4, idempotency_key="from-before")
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert again.json()["item_count"] == 1


def test_uploading_the_same_file_again_gives_the_same_reference_and_the_same_request(
    client: TestClient, auth: dict[str, str], new_key: Callable[[], dict[str, str]]
) -> None:
    first = upload(client, auth)
    assert upload(client, auth) == first
    assert upload(client, auth, png_bytes(colour=(1, 2, 3))) != first
    assert upload(client, new_key()) != first, "another tenant's copy is its own"
    job = submit(client, auth, first, idempotency_key="rerun")
    again = submit(client, auth, upload(client, auth), idempotency_key="rerun")
    assert again.status_code == 200 and again.json()["id"] == job.json()["id"]
