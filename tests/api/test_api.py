"""The HTTP contract: authentication, uploads, submission, polling, listing, cancel, manifests and probes."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from api.main import create_app
from tests.api.conftest import MAX_ITEMS, MAX_UPLOAD_BYTES, Dispatched, png_bytes, submit, upload
from tests.services import silent_server
from xmgie.jobs.auth import create_api_key
from xmgie.jobs.db import session_scope
from xmgie.jobs.migrate import upgrade_database
from xmgie.jobs.models import Item
from xmgie.jobs.settings import Settings
from xmgie.jobs.storage import LocalStorage, manifest_key, output_key
from xmgie.jobs.transitions import claim_item, succeed_item


def _item_ids(engine: Engine, job_id: str) -> list[uuid.UUID]:
    with session_scope(engine) as session:
        query = select(Item.id).where(Item.job_id == uuid.UUID(job_id)).order_by(Item.index)
        return list(session.scalars(query))


def _succeed(engine: Engine, settings: Settings, job_id: str, index: int) -> None:
    """Play the worker: write the output and mark item ``index`` succeeded."""
    storage = LocalStorage(Path(settings.storage_url.removeprefix("file://")))
    key = output_key(job_id, index)
    sha256 = storage.put_bytes(key, png_bytes(colour=(0, 0, 255)), content_type="image/png")
    item_id = _item_ids(engine, job_id)[index]
    with session_scope(engine) as session:
        claim_item(session=session, item_id=item_id, worker="test-worker", lease_seconds=60, max_attempts=3)
    with session_scope(engine) as session:
        succeed_item(
            session=session,
            item_id=item_id,
            worker="test-worker",
            output_key=key,
            output_sha256=sha256,
            metrics={"identity_score": 0.8, "edit_scope": "global", "mask_fraction": 1.0},
        )


def test_requests_without_a_valid_key_are_unauthorized(client: TestClient) -> None:
    for headers in ({}, {"Authorization": "Bearer xmgie_not-a-key"}, {"Authorization": "Basic abc"}):
        response = client.get(f"/v1/jobs/{uuid.uuid4()}", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
    response = client.post("/v1/uploads", files={"file": ("a.png", png_bytes(), "image/png")})
    assert response.status_code == 401


def test_submission_is_accepted_and_dispatched_after_commit(
    client: TestClient, auth: dict[str, str], dispatched: Dispatched, engine: Engine
) -> None:
    reference = upload(client, auth)
    response = submit(client, auth, reference, count=3, options={"num_inference_steps": 4})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued" and job["item_count"] == 3 and job["progress"] == 0.0
    assert job["counts"] == {"queued": 3, "running": 0, "succeeded": 0, "failed": 0, "canceled": 0}
    assert dispatched.calls == [_item_ids(engine, job["id"])]
    assert dispatched.committed == [True]

    polled = client.get(f"/v1/jobs/{job['id']}", headers=auth).json()
    assert polled["id"] == job["id"] and polled["created_at"] and polled["finished_at"] is None


def test_same_idempotency_key_returns_the_same_job_without_dispatching_again(
    client: TestClient, auth: dict[str, str], dispatched: Dispatched
) -> None:
    reference = upload(client, auth)
    first = submit(client, auth, reference, count=2, idempotency_key="batch-7")
    again = submit(client, auth, reference, count=2, idempotency_key="batch-7")
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert len(dispatched.calls) == 1


def test_tenants_cannot_see_each_others_jobs_or_uploads(
    client: TestClient, auth: dict[str, str], new_key, settings: Settings
) -> None:
    other = new_key()
    reference = upload(client, auth)
    job_id = submit(client, auth, reference).json()["id"]
    for method, path in (
        ("get", f"/v1/jobs/{job_id}"),
        ("get", f"/v1/jobs/{job_id}/items"),
        ("post", f"/v1/jobs/{job_id}/cancel"),
        ("get", f"/v1/jobs/{job_id}/manifest"),
    ):
        response = client.request(method.upper(), path, headers=other)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "job_not_found"
    response = submit(client, other, reference)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "unknown_upload"
    assert response.json()["error"]["item"] == 0
    # The owner's job was not touched by the other tenant's cancel.
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).json()["status"] == "queued"


def test_unknown_references_are_refused(client: TestClient, auth: dict[str, str]) -> None:
    reference = upload(client, auth)
    for bogus in ("uploads/../../etc/passwd", f"jobs/{uuid.uuid4()}/0.png", reference.replace(".png", ".jpg")):
        response = client.post(
            "/v1/jobs", headers=auth, json={"items": [{"image": reference, "instruction": "x", "mask": bogus}]}
        )
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "unknown_upload"


def test_cancel_then_cancel_again_conflicts(client: TestClient, auth: dict[str, str]) -> None:
    job_id = submit(client, auth, upload(client, auth), count=2).json()["id"]
    response = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth)
    assert response.status_code == 200
    assert response.json()["status"] == "canceled"
    assert response.json()["counts"]["canceled"] == 2
    again = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "job_already_terminal"
    assert client.post(f"/v1/jobs/{uuid.uuid4()}/cancel", headers=auth).status_code == 404


def test_items_are_paged_by_cursor_and_filtered_by_status(
    client: TestClient, auth: dict[str, str], engine: Engine, settings: Settings
) -> None:
    job_id = submit(client, auth, upload(client, auth), count=5).json()["id"]
    _succeed(engine, settings, job_id, 1)
    _succeed(engine, settings, job_id, 3)

    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor is not None else {})
        page = client.get(f"/v1/jobs/{job_id}/items", headers=auth, params=params).json()
        pages += 1
        assert page["count"] == 5
        seen.extend(item["index"] for item in page["data"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == [0, 1, 2, 3, 4]

    succeeded = client.get(f"/v1/jobs/{job_id}/items", headers=auth, params={"status": "succeeded"}).json()
    assert [item["index"] for item in succeeded["data"]] == [1, 3] and succeeded["count"] == 2
    queued = client.get(f"/v1/jobs/{job_id}/items", headers=auth, params={"status": "queued", "limit": 2}).json()
    assert [item["index"] for item in queued["data"]] == [0, 2] and queued["next_cursor"] == 2
    bad = client.get(f"/v1/jobs/{job_id}/items", headers=auth, params={"status": "done"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"


def test_succeeded_item_has_a_result_url_and_job_shows_progress(
    client: TestClient, auth: dict[str, str], engine: Engine, settings: Settings
) -> None:
    job_id = submit(client, auth, upload(client, auth), count=2).json()["id"]
    _succeed(engine, settings, job_id, 0)

    items = client.get(f"/v1/jobs/{job_id}/items", headers=auth).json()["data"]
    assert items[0]["status"] == "succeeded" and items[0]["result_url"]
    assert items[0]["result_url"].endswith(output_key(job_id, 0))
    assert items[0]["edit_scope"] == "global" and items[0]["mask_fraction"] == 1.0
    assert items[1]["status"] == "queued" and items[1]["result_url"] is None
    assert items[1]["edit_scope"] is None and items[1]["mask_fraction"] is None
    job = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
    assert job["status"] == "running" and job["progress"] == 0.5 and job["started_at"]


def test_manifest_comes_from_the_database_until_one_is_stored(
    client: TestClient, auth: dict[str, str], settings: Settings
) -> None:
    job_id = submit(client, auth, upload(client, auth), count=2).json()["id"]
    built = client.get(f"/v1/jobs/{job_id}/manifest", headers=auth).json()
    assert built["source"] == "database"
    assert [record["index"] for record in built["records"]] == [0, 1]

    storage = LocalStorage(Path(settings.storage_url.removeprefix("file://")))
    lines = [{"index": 0, "output": "a.png"}, {"index": 1, "output": "b.png"}]
    storage.put_bytes(manifest_key(job_id), "\n".join(json.dumps(line) for line in lines).encode() + b"\n")
    stored = client.get(f"/v1/jobs/{job_id}/manifest", headers=auth).json()
    assert stored["source"] == "storage" and stored["records"] == lines


def test_invalid_option_names_the_item(client: TestClient, auth: dict[str, str]) -> None:
    reference = upload(client, auth)
    items = [
        {"image": reference, "instruction": "ok"},
        {"image": reference, "instruction": "ok", "options": {"pfb": {"latent_blend_fraction": 2.0}}},
    ]
    response = client.post("/v1/jobs", headers=auth, json={"items": items})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_option" and error["item"] == 1 and "item 1" in error["message"]

    # Job options are merged under item options: a bad job-level option fails the first item.
    response = client.post("/v1/jobs", headers=auth, json={"items": items[:1], "options": {"warp_speed": 9}})
    assert response.json()["error"] == {
        "code": "invalid_option",
        "message": response.json()["error"]["message"],
        "item": 0,
    }


def test_instructions_are_checked(client: TestClient, auth: dict[str, str]) -> None:
    reference = upload(client, auth)
    for instruction, code in (("   ", "empty_instruction"), ("x" * 201, "instruction_too_long")):
        response = client.post(
            "/v1/jobs", headers=auth, json={"items": [{"image": reference, "instruction": instruction}]}
        )
        assert response.status_code == 422
        assert response.json()["error"]["code"] == code


def test_too_many_items_is_refused(client: TestClient, auth: dict[str, str], dispatched: Dispatched) -> None:
    response = submit(client, auth, upload(client, auth), count=MAX_ITEMS + 1)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "too_many_items"
    assert dispatched.calls == []


def test_malformed_body_is_an_invalid_request(client: TestClient, auth: dict[str, str]) -> None:
    response = client.post("/v1/jobs", headers=auth, json={"items": []})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"


def test_uploads_are_checked(client: TestClient, auth: dict[str, str]) -> None:
    response = client.post("/v1/uploads", headers=auth, files={"file": ("a.png", b"hello, not an image", "image/png")})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "not_an_image"

    big = b"\x89PNG" + b"\0" * MAX_UPLOAD_BYTES
    response = client.post("/v1/uploads", headers=auth, files={"file": ("a.png", big, "image/png")})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "upload_too_large"

    response = client.post("/v1/uploads", headers=auth, files={"file": ("a.png", png_bytes(300, 300), "image/png")})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "image_too_large"

    stored = client.post("/v1/uploads", headers=auth, files={"file": ("a.png", png_bytes(), "image/png")}).json()
    assert (stored["width"], stored["height"], stored["format"]) == (32, 24, "PNG")
    assert stored["reference"].startswith("uploads/") and stored["reference"].endswith(".png")


def test_probes(client: TestClient, settings: Settings, tmp_path: Path) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "storage": "ok", "broker": "skipped"}

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the storage folder should be")
    broken = settings.model_copy(update={"storage_url": f"file://{blocker}"})
    with TestClient(create_app(broken)) as broken_client:
        response = broken_client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["checks"]["database"] == "ok" and body["checks"]["storage"].startswith("error")
    assert body["error"]["code"] == "not_ready" and "storage" in body["error"]["message"]


def test_openapi_describes_the_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/uploads", "/v1/jobs", "/v1/jobs/{job_id}/items", "/healthz", "/readyz"} <= set(paths)


def test_readiness_names_an_unreachable_broker(settings: Settings) -> None:
    unreachable = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(unreachable)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["broker"].startswith("error")
    assert "broker" in response.json()["error"]["message"]


def _frozen_s3(tmp_path: Path, port: int, **update: object) -> Settings:
    """Settings of an API on a migrated SQLite file whose S3 endpoint is the silent server at ``port``."""
    database_url = f"sqlite:///{tmp_path / 'frozen.db'}"
    upgrade_database(database_url)
    return Settings(
        data_dir=tmp_path,
        database_url=database_url,
        storage_url="s3://frozen",
        s3_endpoint_url=f"http://127.0.0.1:{port}",
        s3_access_key_id="testing",
        s3_secret_access_key="testing",
        **update,
    )


def test_readiness_answers_not_ready_in_time_when_the_storage_accepts_and_never_replies(tmp_path: Path) -> None:
    with silent_server() as port, TestClient(create_app(_frozen_s3(tmp_path, port))) as client:
        started = time.monotonic()
        response = client.get("/readyz")
        elapsed = time.monotonic() - started

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable" and body["error"]["code"] == "not_ready"
    assert body["checks"]["database"] == "ok" and body["checks"]["storage"].startswith("error")
    assert body["error"]["message"] == "not ready: storage failed"
    # It answered instead of waiting out a 60 s read timeout (the probe timeout is 1 s by default).
    assert elapsed < 10


def test_readiness_answers_in_time_when_every_service_accepts_and_never_replies(tmp_path: Path) -> None:
    with silent_server() as s3_port, silent_server() as database_port, silent_server() as broker_port:
        frozen = _frozen_s3(
            tmp_path, s3_port, broker_url=f"redis://127.0.0.1:{broker_port}/0", probe_timeout_seconds=0.5
        )
        # Connecting to a PostgreSQL server that never answers waits for as long as the driver lets it.
        frozen = frozen.model_copy(update={"database_url": f"postgresql://postgres@127.0.0.1:{database_port}/xmgie"})
        with TestClient(create_app(frozen)) as client:
            started = time.monotonic()
            response = client.get("/readyz")
            elapsed = time.monotonic() - started

    assert response.status_code == 503
    checks = response.json()["checks"]
    assert all(checks[part].startswith("error") for part in ("database", "storage", "broker")), checks
    assert response.json()["error"]["message"] == "not ready: database, storage, broker failed"
    assert elapsed < 10


def test_an_upload_to_a_storage_that_never_replies_fails_with_storage_unavailable(tmp_path: Path) -> None:
    timeouts = {"storage_connect_timeout_seconds": 0.3, "storage_read_timeout_seconds": 0.3}
    with silent_server() as port, TestClient(create_app(_frozen_s3(tmp_path, port, **timeouts))) as client:
        with session_scope(client.app.state.engine) as session:
            key = create_api_key(session=session, tenant_name="frozen-storage")
        started = time.monotonic()
        response = client.post(
            "/v1/uploads",
            headers={"Authorization": f"Bearer {key}"},
            files={"file": ("in.png", png_bytes(), "image/png")},
        )
        elapsed = time.monotonic() - started

    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "storage_unavailable"
    # Three attempts of XMGIE_STORAGE_READ_TIMEOUT_SECONDS each, not of a 60 s read timeout.
    assert elapsed < 10


def test_uploads_with_a_path_go_to_the_tenants_data_space(
    client: TestClient, auth: dict[str, str], new_key, settings: Settings
) -> None:
    response = client.post(
        "/v1/uploads",
        headers=auth,
        data={"path": "photos/cat.png"},
        files={"file": ("c.png", png_bytes(), "image/png")},
    )
    assert response.status_code == 201, response.text
    reference = response.json()["reference"]
    tenant = reference.split("/")[1]
    assert reference == f"data/{tenant}/photos/cat.png"
    assert (settings.data_dir / "storage" / reference).read_bytes() == png_bytes()

    job = submit(client, auth, reference)
    assert job.status_code == 202, job.text
    assert client.get(f"/v1/jobs/{job.json()['id']}/items", headers=auth).json()["data"][0]["image"] == reference

    other = new_key()
    refused = submit(client, other, reference)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "unknown_upload"
    missing = submit(client, auth, f"data/{tenant}/photos/dog.png")
    assert missing.status_code == 422 and missing.json()["error"]["code"] == "unknown_upload"
    for bad_path in (
        "../escape.png",
        "/abs.png",
        "a//b.png",
        "folder/",
        "%2e%2e/escape.png",
        "a/%2E%2e/%252e%252e/x.png",
    ):
        response = client.post(
            "/v1/uploads", headers=auth, data={"path": bad_path}, files={"file": ("c.png", png_bytes(), "image/png")}
        )
        assert response.status_code == 422, bad_path
        assert response.json()["error"]["code"] == "invalid_path"
    # Nothing was stored under a literal '%2e%2e' folder, and no job can refer to one.
    assert not [path for path in (settings.data_dir / "storage").rglob("*") if "%" in path.name]
    encoded = submit(client, auth, f"data/{tenant}/%2e%2e/{tenant}/photos/cat.png")
    assert encoded.status_code == 422 and encoded.json()["error"]["code"] == "unknown_upload"
