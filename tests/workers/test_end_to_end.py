"""The whole service as processes: ``xmgie api``, an ``xmgie worker`` with the tiny model, moto's S3 server,
Redis and PostgreSQL; a 20-item job with two bad images ends ``partial`` with everything else done once."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx2
import pytest
from PIL import Image

from tests.services import S3_CREDENTIALS, api_server, moto_server, s3_settings, webhook_receiver
from tests.workers.conftest import REPO_ROOT
from xmgie.jobs.storage import S3Storage

BUCKET = "xmgie-e2e"
MAX_PIXELS = 200 * 200


def _png(seed: int, width: int = 64, height: int = 48) -> bytes:
    image = Image.new("RGB", (width, height), (40 + seed * 9 % 200, 120, 200 - seed * 7 % 150))
    for x in range(0, width, 8):
        image.putpixel((x, seed % height), (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def moto_port() -> Iterator[int]:
    with moto_server() as port:
        yield port


def _wait_for_job(client: httpx2.Client, job_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "partial", "failed", "canceled"):
            return job
        time.sleep(0.5)
    pytest.fail(f"job {job_id} did not finish within {timeout:.0f} s: {job}")


def test_a_job_with_bad_items_ends_partial_with_every_good_output_stored_once(
    database_url, redis_db, start_worker, worker_env, moto_port, tiny_dir, tmp_path
):
    endpoint = f"http://127.0.0.1:{moto_port}"
    s3 = S3Storage(BUCKET, endpoint_url=endpoint, create_bucket=True, **S3_CREDENTIALS)
    service = {
        **worker_env,
        **s3_settings(moto_port, BUCKET),
        "XMGIE_MAX_IMAGE_PIXELS": str(MAX_PIXELS),
        "XMGIE_MICRO_BATCH_SIZE": "4",
        # The webhook receiver of this test listens on 127.0.0.1.
        "XMGIE_WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true",
    }
    key = subprocess.run(
        [sys.executable, "-m", "xmgie.cli", "admin", "create-key", "--tenant", "e2e"],
        cwd=REPO_ROOT,
        env=service,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    worker = start_worker(
        "--pool=prefork",
        "--concurrency=1",
        **{
            **{name: value for name, value in service.items() if name.startswith("XMGIE_")},
            "XMGIE_EDITOR": "pipeline",
            "XMGIE_MODEL": str(tiny_dir),
            "XMGIE_MODEL_CACHE_DIR": str(tiny_dir.parent),
            "XMGIE_DEVICE": "cpu",
            "XMGIE_DTYPE": "float32",
        },
    )

    with (
        api_server({**service, "XMGIE_EDITOR": "noop"}, tmp_path / "api.log") as base_url,
        webhook_receiver() as receiver,
        httpx2.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client,
    ):
        references = []
        for seed in range(6):
            response = client.post("/v1/uploads", files={"file": (f"{seed}.png", _png(seed), "image/png")})
            assert response.status_code == 201, response.text
            references.append(response.json()["reference"])
        tenant = references[0].split("/")[1]
        # Images a tenant keeps in its data space are only checked when a worker reads them.
        truncated, oversized = f"data/{tenant}/bad/truncated.png", f"data/{tenant}/bad/oversized.png"
        s3.put_bytes(truncated, _png(99)[: len(_png(99)) // 2], "image/png")
        s3.put_bytes(oversized, _png(98, 300, 300), "image/png")
        images = [references[index % len(references)] for index in range(18)]
        images[5:5] = [truncated]
        images[13:13] = [oversized]
        items = [{"image": image, "instruction": f"make it snowy {index}"} for index, image in enumerate(images)]
        body = {
            "items": items,
            "options": {"max_side": 64, "num_inference_steps": 2, "max_new_tokens": 9},
            "idempotency_key": "e2e-1",
            "webhook_url": receiver.url,
        }

        submitted = client.post("/v1/jobs", json=body)
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        assert client.post("/v1/jobs", json=body).json()["id"] == job_id

        job = _wait_for_job(client, job_id, timeout=240)

        assert job["status"] == "partial", (job, worker.log()[-3000:])
        assert job["counts"] == {"queued": 0, "running": 0, "succeeded": 18, "failed": 2, "canceled": 0}
        listed = client.get(f"/v1/jobs/{job_id}/items", params={"limit": 50}).json()["data"]
        assert len(listed) == 20
        failed = {item["index"]: item["error"]["code"] for item in listed if item["status"] == "failed"}
        assert failed == {5: "truncated_image", 13: "image_too_large"}
        stored = sorted(name for name in s3.list_keys(f"jobs/{job_id}/") if not name.endswith(".mask.png"))
        succeeded = [item for item in listed if item["status"] == "succeeded"]
        assert stored == sorted(
            [f"jobs/{job_id}/{item['index']}.png" for item in succeeded] + [f"jobs/{job_id}/manifest.jsonl"]
        )
        for item in succeeded:
            assert item["attempts"] == 1
            downloaded = httpx2.get(item["result_url"], timeout=30).content
            assert hashlib.sha256(downloaded).hexdigest() == item["output_sha256"]
            assert Image.open(io.BytesIO(downloaded)).size == (64, 48)
            assert item["expressive_instruction"]
        manifest = client.get(f"/v1/jobs/{job_id}/manifest").json()
        assert manifest["source"] == "storage" and len(manifest["records"]) == 20
        lines = s3.get_bytes(f"jobs/{job_id}/manifest.jsonl").decode().splitlines()
        assert [json.loads(line)["status"] for line in lines].count("succeeded") == 18

        deadline = time.monotonic() + 30
        while not receiver.requests and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        assert len(receiver.requests) == 1, worker.log()[-3000:]
        payload = json.loads(receiver.requests[0][1])
        assert payload["job"]["id"] == job_id and payload["job"]["status"] == "partial"
        assert client.get(f"/v1/jobs/{job_id}").json()["webhook"] == {
            "status": "delivered",
            "attempts": 1,
            "error": None,
        }
