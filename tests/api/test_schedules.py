"""The HTTP side of dataset augmentation: schedules' round trip and checks, tenant isolation, firing a run now,
and the runs' history with live counts; on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select, update

from api.main import create_app
from tests.api.conftest import png_bytes, upload
from xmgie.jobs import runs
from xmgie.jobs.auth import tenant_for_key
from xmgie.jobs.db import make_session_factory, session_scope
from xmgie.jobs.dispatch import START_RUN_TASK
from xmgie.jobs.models import Augmentation, Item, Job, Run, Schedule
from xmgie.jobs.settings import Settings
from xmgie.jobs.storage import Storage, data_prefix, output_key, storage_from_settings
from xmgie.jobs.transitions import claim_item, succeed_item


class RecordingPublisher:
    """Records each task sent, and whether the run it names was committed (visible to another session) by then."""

    def __init__(self, engine: Engine, fail: bool = False) -> None:
        self.engine = engine
        self.fail = fail
        self.sent: list[tuple[str, list[Any]]] = []
        self.committed: list[bool] = []

    def edits(self, item_ids: Sequence[uuid.UUID]) -> None:
        raise AssertionError("schedule routes publish no edits")

    def send(self, task_name: str, args: Sequence[Any] = ()) -> None:
        with session_scope(self.engine) as session:
            self.committed.append(session.get(Run, uuid.UUID(args[0])) is not None)
        self.sent.append((task_name, list(args)))
        if self.fail:
            raise ConnectionError("broker down")


@pytest.fixture
def publisher(engine: Engine) -> RecordingPublisher:
    return RecordingPublisher(engine)


@pytest.fixture
def client(settings: Settings, publisher: RecordingPublisher) -> Iterator[TestClient]:
    """A client of the app built with the recording publisher."""
    with TestClient(create_app(settings, publisher=publisher)) as client:
        yield client


def space(engine: Engine, headers: dict[str, str]) -> str:
    """The tenant's data space, ``data/<tenant>/``."""
    with session_scope(engine) as session:
        tenant = tenant_for_key(session=session, key=headers["Authorization"].removeprefix("Bearer "))
        assert tenant is not None
        return data_prefix(tenant.id)


def body(own: str, **fields: Any) -> dict[str, Any]:
    """A valid schedule body in the data space ``own``, with ``fields`` replaced."""
    return {
        "name": "nightly",
        "cron": "0 3 * * *",
        "timezone": "Europe/Paris",
        "source": {"prefix": f"{own}photos/"},
        "instructions": ["make it snowy", {"instruction": "turn day into night", "options": {"guidance_scale": 9.0}}],
        "variants": 2,
        "target_prefix": f"{own}augmented",
        "options": {"num_inference_steps": 4},
        **fields,
    }


def create(client: TestClient, headers: dict[str, str], payload: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/schedules", headers=headers, json=payload)
    assert response.status_code == 201, response.text
    return response.json()


def schedule_row(engine: Engine, schedule_id: str) -> Schedule | None:
    with session_scope(engine) as session:
        return session.get(Schedule, uuid.UUID(schedule_id))


def run_count(engine: Engine, schedule_id: str) -> int:
    with session_scope(engine) as session:
        return session.scalar(select(func.count()).select_from(Run).where(Run.schedule_id == uuid.UUID(schedule_id)))


def test_schedules_require_a_key(client: TestClient) -> None:
    for method, path in (
        ("get", "/v1/schedules"),
        ("post", "/v1/schedules"),
        ("post", f"/v1/schedules/{uuid.uuid4()}/run"),
    ):
        response = client.request(method.upper(), path, json={})
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "unauthorized"


def test_create_list_get_patch_delete_round_trip(client: TestClient, auth: dict[str, str], engine: Engine) -> None:
    own = space(engine, auth)
    before = datetime.now(UTC)
    created = create(client, auth, body(own))
    assert created["name"] == "nightly"
    assert created["cron"] == "0 3 * * *" and created["interval_seconds"] is None
    assert created["timezone"] == "Europe/Paris"
    assert created["source"] == {"prefix": f"{own}photos/"}
    assert created["instructions"] == [
        {"instruction": "make it snowy", "options": {}},
        {"instruction": "turn day into night", "options": {"guidance_scale": 9.0}},
    ]
    assert created["variants"] == 2 and created["options"] == {"num_inference_steps": 4}
    assert created["target_prefix"] == f"{own}augmented/"
    assert created["dataset"] == f"{own}augmented/metadata.jsonl"
    assert created["enabled"] is True and created["last_slot"] is None
    upcoming = datetime.fromisoformat(created["next_slot"])
    assert before < upcoming <= before + timedelta(days=1, hours=1)
    local = upcoming.astimezone(ZoneInfo("Europe/Paris"))
    assert (local.hour, local.minute, local.second) == (3, 0, 0)

    row = schedule_row(engine, created["id"])
    assert row is not None
    assert row.source_prefix == f"{own}photos/" and row.source_keys is None
    assert row.instructions == created["instructions"] and row.target_prefix == f"{own}augmented/"

    listed = client.get("/v1/schedules", headers=auth).json()
    assert listed["count"] == 1 and listed["data"] == [{**created, "next_slot": listed["data"][0]["next_slot"]}]
    assert client.get(f"/v1/schedules/{created['id']}", headers=auth).json()["id"] == created["id"]

    # Switching the timing needs the other field set to null; a change is checked as a whole.
    half = client.patch(f"/v1/schedules/{created['id']}", headers=auth, json={"interval_seconds": 3600})
    assert half.status_code == 422 and half.json()["error"]["code"] == "invalid_timing"
    patched = client.patch(
        f"/v1/schedules/{created['id']}",
        headers=auth,
        json={
            "cron": None,
            "interval_seconds": 3600,
            "name": "hourly",
            "source": {"images": [f"{own}photos/a.png", f"{own}photos/a.png", f"{own}photos/b.png"]},
            "instructions": ["  add fog  "],
            "target_prefix": f"{own}fog/",
        },
    )
    assert patched.status_code == 200, patched.text
    changed = patched.json()
    assert changed["name"] == "hourly" and changed["cron"] is None and changed["interval_seconds"] == 3600
    assert changed["source"] == {"images": [f"{own}photos/a.png", f"{own}photos/b.png"]}
    assert changed["instructions"] == [{"instruction": "add fog", "options": {}}]
    assert changed["variants"] == 2 and changed["options"] == {"num_inference_steps": 4}
    assert changed["dataset"] == f"{own}fog/metadata.jsonl"
    assert changed["created_at"] == created["created_at"]
    assert datetime.fromisoformat(changed["updated_at"]) > datetime.fromisoformat(created["updated_at"])
    row = schedule_row(engine, created["id"])
    assert row is not None
    assert row.source_prefix is None and row.source_keys == [f"{own}photos/a.png", f"{own}photos/b.png"]
    assert row.cron is None and row.interval_seconds == 3600 and row.name == "hourly"

    for nulled in ("name", "instructions", "source", "variants"):
        response = client.patch(f"/v1/schedules/{created['id']}", headers=auth, json={nulled: None})
        assert response.status_code == 422, nulled
    assert client.patch(f"/v1/schedules/{created['id']}", headers=auth, json={"colour": "red"}).status_code == 422
    assert client.get(f"/v1/schedules/{created['id']}", headers=auth).json()["name"] == "hourly"

    deleted = client.delete(f"/v1/schedules/{created['id']}", headers=auth)
    assert deleted.status_code == 204 and deleted.content == b""
    missing = client.get(f"/v1/schedules/{created['id']}", headers=auth)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "schedule_not_found"
    assert client.get("/v1/schedules", headers=auth).json() == {"data": [], "count": 0}
    assert schedule_row(engine, created["id"]) is None


def test_bad_schedules_get_their_code(
    client: TestClient, auth: dict[str, str], new_key: Callable[[], dict[str, str]], engine: Engine
) -> None:
    own = space(engine, auth)
    other_headers = new_key()
    other = space(engine, other_headers)
    others_upload = upload(client, other_headers)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"cron": "every night"}, "invalid_cron"),
        ({"cron": "0 3 * *"}, "invalid_cron"),
        ({"cron": "0 3 * * * *"}, "invalid_cron"),
        ({"cron": "61 3 * * *"}, "invalid_cron"),
        ({"timezone": "Mars/Olympus_Mons"}, "invalid_timezone"),
        ({"interval_seconds": 60}, "invalid_timing"),
        ({"cron": None}, "invalid_timing"),
        ({"cron": None, "interval_seconds": 0}, "invalid_interval"),
        ({"instructions": []}, "empty_instructions"),
        ({"instructions": ["make it snowy", "   "]}, "empty_instruction"),
        ({"instructions": ["x" * 201]}, "instruction_too_long"),
        ({"instructions": [{"instruction": "snow", "options": {"no_such_option": 1}}]}, "invalid_option"),
        ({"options": {"num_inference_step": 4}}, "invalid_option"),
        ({"variants": 0}, "invalid_variants"),
        ({"variants": 17}, "invalid_variants"),
        ({"source": {"prefix": f"{other}photos/"}}, "source_outside_tenant_space"),
        ({"source": {"prefix": "jobs/"}}, "source_outside_tenant_space"),
        ({"source": {"prefix": f"{own}../{other.split('/')[1]}/"}}, "source_outside_tenant_space"),
        ({"source": {"prefix": f"{own}%2e%2e/{other.split('/')[1]}/"}}, "source_outside_tenant_space"),
        ({"source": {"images": [f"{own}%2E%2E/{other.split('/')[1]}/a.png"]}}, "source_outside_tenant_space"),
        ({"source": {"images": [f"{own}photos/a.png", others_upload]}}, "source_outside_tenant_space"),
        ({"source": {"images": [f"{other}photos/a.png"]}}, "source_outside_tenant_space"),
        ({"source": {"images": []}}, "empty_source"),
        ({"source": {}}, "invalid_source"),
        ({"source": {"prefix": f"{own}photos/", "images": [f"{own}photos/a.png"]}}, "invalid_source"),
        ({"target_prefix": f"{other}augmented/"}, "target_outside_tenant_space"),
        ({"target_prefix": f"uploads/{own.split('/')[1]}/augmented/"}, "target_outside_tenant_space"),
        ({"target_prefix": own}, "target_outside_tenant_space"),
        ({"target_prefix": f"{own}a//b/"}, "target_outside_tenant_space"),
        ({"target_prefix": f"{own}%2e%2e/{other.split('/')[1]}/augmented/"}, "target_outside_tenant_space"),
        ({"target_prefix": f"{own}photos/augmented/"}, "target_overlaps_source"),
        ({"source": {"prefix": own}}, "target_overlaps_source"),
        ({"source": {"images": [f"{own}augmented/old.png"]}}, "target_overlaps_source"),
        ({"name": ""}, "invalid_request"),
        ({"colour": "red"}, "invalid_request"),
    ]
    for fields, code in cases:
        response = client.post("/v1/schedules", headers=auth, json=body(own, **fields))
        assert response.status_code == 422, (fields, response.text)
        assert response.json()["error"]["code"] == code, (fields, response.json())
    assert client.get("/v1/schedules", headers=auth).json()["count"] == 0

    # The same rules apply to a change.
    created = create(client, auth, body(own))
    for fields, code in cases[:-2]:
        response = client.patch(f"/v1/schedules/{created['id']}", headers=auth, json=fields)
        assert response.status_code == 422, (fields, response.text)
        assert response.json()["error"]["code"] == code, (fields, response.json())
    unchanged = client.get(f"/v1/schedules/{created['id']}", headers=auth).json()
    assert {**unchanged, "next_slot": None} == {**created, "next_slot": None}


def test_names_are_unique_per_tenant(
    client: TestClient, auth: dict[str, str], new_key: Callable[[], dict[str, str]], engine: Engine
) -> None:
    own = space(engine, auth)
    create(client, auth, body(own))
    again = client.post("/v1/schedules", headers=auth, json=body(own))
    assert again.status_code == 409 and again.json()["error"]["code"] == "schedule_exists"

    second = create(client, auth, body(own, name="weekly"))
    renamed = client.patch(f"/v1/schedules/{second['id']}", headers=auth, json={"name": "nightly"})
    assert renamed.status_code == 409 and renamed.json()["error"]["code"] == "schedule_exists"
    same_name = client.patch(f"/v1/schedules/{second['id']}", headers=auth, json={"name": "weekly", "variants": 3})
    assert same_name.status_code == 200 and same_name.json()["variants"] == 3
    listed = client.get("/v1/schedules", headers=auth).json()
    assert [schedule["name"] for schedule in listed["data"]] == ["nightly", "weekly"] and listed["count"] == 2

    other_headers = new_key()
    create(client, other_headers, body(space(engine, other_headers)))


def test_a_tenant_cannot_reach_another_tenants_schedule(
    client: TestClient,
    auth: dict[str, str],
    new_key: Callable[[], dict[str, str]],
    engine: Engine,
    publisher: RecordingPublisher,
) -> None:
    created = create(client, auth, body(space(engine, auth)))
    other = new_key()
    base = f"/v1/schedules/{created['id']}"
    for method, path, payload in (
        ("get", base, None),
        ("patch", base, {"enabled": False}),
        ("delete", base, None),
        ("post", f"{base}/pause", None),
        ("post", f"{base}/resume", None),
        ("post", f"{base}/run", None),
        ("get", f"{base}/runs", None),
    ):
        response = client.request(method.upper(), path, headers=other, json=payload)
        assert response.status_code == 404, (method, path)
        assert response.json()["error"]["code"] == "schedule_not_found"
    assert client.get("/v1/schedules", headers=other).json() == {"data": [], "count": 0}
    assert client.get(f"/v1/schedules/{uuid.uuid4()}", headers=auth).status_code == 404

    # Nothing happened to the owner's schedule.
    assert publisher.sent == []
    assert client.get(base, headers=auth).json()["enabled"] is True
    assert run_count(engine, created["id"]) == 0


def test_run_is_committed_before_its_start_is_published(
    client: TestClient, auth: dict[str, str], engine: Engine, publisher: RecordingPublisher
) -> None:
    created = create(client, auth, body(space(engine, auth), enabled=False))
    response = client.post(f"/v1/schedules/{created['id']}/run", headers=auth)
    assert response.status_code == 202, response.text
    run = response.json()
    assert run["schedule_id"] == created["id"] and run["trigger"] == "manual" and run["status"] == "queued"
    assert run["job_id"] is None and run["item_count"] == 0 and run["error"] is None
    assert run["counts"] == {"queued": 0, "running": 0, "succeeded": 0, "failed": 0, "canceled": 0}
    assert publisher.sent == [(START_RUN_TASK, [run["id"]])]
    assert publisher.committed == [True]
    # A manual run leaves the schedule's own slots alone.
    assert client.get(f"/v1/schedules/{created['id']}", headers=auth).json()["last_slot"] is None


def test_a_run_whose_start_cannot_be_published_is_still_accepted(
    settings: Settings, auth: dict[str, str], engine: Engine
) -> None:
    publisher = RecordingPublisher(engine, fail=True)
    with TestClient(create_app(settings, publisher=publisher)) as client:
        created = create(client, auth, body(space(engine, auth)))
        response = client.post(f"/v1/schedules/{created['id']}/run", headers=auth)
    assert response.status_code == 202
    assert publisher.committed == [True]
    with session_scope(engine) as session:
        run = session.get(Run, uuid.UUID(response.json()["id"]))
        assert run is not None and run.job_id is None


def _claim(engine: Engine, item: Item) -> None:
    with session_scope(engine) as session:
        claimed = claim_item(session=session, item_id=item.id, worker="test-worker", lease_seconds=60, max_attempts=3)
        assert claimed is not None


def _finish_item(engine: Engine, storage: Storage, item: Item, *, claimed: bool = False) -> None:
    """Play the worker: write the output and mark the item succeeded."""
    key = output_key(item.job_id, item.index)
    sha256 = storage.put_bytes(key, png_bytes(colour=(0, 0, 255)), content_type="image/png")
    if not claimed:
        _claim(engine, item)
    with session_scope(engine) as session:
        succeed_item(session=session, item_id=item.id, worker="test-worker", output_key=key, output_sha256=sha256)


def test_runs_show_their_job_with_live_counts_until_published(
    client: TestClient, auth: dict[str, str], engine: Engine, settings: Settings
) -> None:
    own = space(engine, auth)
    for name in ("a.png", "b.png"):
        response = client.post(
            "/v1/uploads",
            headers=auth,
            data={"path": f"photos/{name}"},
            files={"file": (name, png_bytes(), "image/png")},
        )
        assert response.status_code == 201, response.text
    created = create(client, auth, body(own, enabled=False))
    run_id = client.post(f"/v1/schedules/{created['id']}/run", headers=auth).json()["id"]

    storage = storage_from_settings(settings)
    factory = make_session_factory(engine)
    started = runs.start_run(
        session_factory=factory, storage=storage, run_id=uuid.UUID(run_id), max_items=settings.max_items_per_job
    )
    assert len(started.item_ids) == 2 * 2 * 2

    def only_run() -> dict[str, Any]:
        page = client.get(f"/v1/schedules/{created['id']}/runs", headers=auth).json()
        assert page["count"] == 1 and page["next_cursor"] is None
        return page["data"][0]

    run = only_run()
    assert run["id"] == run_id and run["job_id"] == str(started.job_id)
    assert run["image_count"] == 2 and run["item_count"] == 8 and run["fingerprint"]
    assert run["status"] == "queued" and run["started_at"] is not None
    assert run["counts"] == {"queued": 8, "running": 0, "succeeded": 0, "failed": 0, "canceled": 0}

    with session_scope(engine) as session:
        items = list(session.scalars(select(Item).where(Item.job_id == started.job_id).order_by(Item.index)))
    _finish_item(engine, storage, items[0])
    _claim(engine, items[1])
    run = only_run()
    assert run["status"] == "running"
    assert run["counts"] == {"queued": 6, "running": 1, "succeeded": 1, "failed": 0, "canceled": 0}

    _finish_item(engine, storage, items[1], claimed=True)
    for item in items[2:]:
        _finish_item(engine, storage, item)
    # The job has ended, the dataset is not written yet: the run is not done.
    run = only_run()
    assert run["status"] == "running" and run["published_at"] is None
    assert run["counts"]["succeeded"] == 8

    assert runs.publish_run(session_factory=factory, storage=storage, run_id=uuid.UUID(run_id))
    run = only_run()
    assert run["status"] == "succeeded" and run["published_at"] is not None and run["finished_at"] is not None
    assert run["counts"] == {"queued": 0, "running": 0, "succeeded": 8, "failed": 0, "canceled": 0}
    dataset = storage.get_bytes(created["dataset"]).decode("utf-8").splitlines()
    assert len(dataset) == 8
    assert all(storage.exists(f"{created['target_prefix']}{json.loads(line)['file_name']}") for line in dataset)

    # Deleting the schedule takes its runs and augmentation records; its job and its dataset stay.
    assert client.delete(f"/v1/schedules/{created['id']}", headers=auth).status_code == 204
    with session_scope(engine) as session:
        assert session.get(Run, uuid.UUID(run_id)) is None
        query = select(func.count()).select_from(Augmentation).where(Augmentation.run_id == uuid.UUID(run_id))
        assert session.scalar(query) == 0
        assert session.get(Job, started.job_id) is not None
    assert storage.exists(created["dataset"])


def test_runs_are_listed_newest_first_by_pages(client: TestClient, auth: dict[str, str], engine: Engine) -> None:
    created = create(client, auth, body(space(engine, auth)))
    fired = [client.post(f"/v1/schedules/{created['id']}/run", headers=auth).json()["id"] for _ in range(3)]
    base = f"/v1/schedules/{created['id']}/runs"
    first = client.get(base, headers=auth, params={"limit": 2}).json()
    assert first["count"] == 3 and [run["id"] for run in first["data"]] == fired[::-1][:2]
    second = client.get(base, headers=auth, params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [run["id"] for run in second["data"]] == fired[:1] and second["next_cursor"] is None
    assert client.get(base, headers=auth, params={"limit": 501}).status_code == 422
    bad_cursor = client.get(base, headers=auth, params={"cursor": str(uuid.uuid4())})
    assert bad_cursor.status_code == 422 and bad_cursor.json()["error"]["code"] == "invalid_cursor"


def test_pause_and_resume_toggle_enabled_and_next_slot(
    client: TestClient, auth: dict[str, str], engine: Engine
) -> None:
    created = create(client, auth, body(space(engine, auth), cron=None, interval_seconds=60))
    # Pretend the schedule was created an hour ago and nothing has fired since.
    with session_scope(engine) as session:
        session.execute(
            update(Schedule)
            .where(Schedule.id == uuid.UUID(created["id"]))
            .values(created_at=datetime.now(UTC) - timedelta(hours=1))
        )
    paused = client.post(f"/v1/schedules/{created['id']}/pause", headers=auth)
    assert paused.status_code == 200
    assert paused.json()["enabled"] is False and paused.json()["next_slot"] is None
    assert datetime.fromisoformat(paused.json()["updated_at"]) > datetime.fromisoformat(created["updated_at"])
    runs.fire_due_schedules(session_factory=make_session_factory(engine))
    assert run_count(engine, created["id"]) == 0

    resumed = client.post(f"/v1/schedules/{created['id']}/resume", headers=auth).json()
    assert resumed["enabled"] is True
    now = datetime.now(UTC)
    assert now < datetime.fromisoformat(resumed["next_slot"]) <= now + timedelta(seconds=60)
    # The slots passed while paused count as fired: the schedule fires next at its next slot, not at once.
    assert resumed["last_slot"] is not None
    assert datetime.fromisoformat(resumed["last_slot"]) > now - timedelta(seconds=61)
    runs.fire_due_schedules(session_factory=make_session_factory(engine))
    assert run_count(engine, created["id"]) == 0

    # PATCH can pause as well.
    patched = client.patch(f"/v1/schedules/{created['id']}", headers=auth, json={"enabled": False}).json()
    assert patched["enabled"] is False and patched["next_slot"] is None


def test_openapi_describes_the_schedule_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/schedules", "/v1/schedules/{schedule_id}", "/v1/schedules/{schedule_id}/runs"} <= set(paths)
    assert {"/v1/schedules/{schedule_id}/run", "/v1/schedules/{schedule_id}/pause"} <= set(paths)
