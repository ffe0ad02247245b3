"""``xmgie submit`` and ``xmgie status`` against a real ``xmgie api`` process on a SQLite file and a storage folder.

The API runs without a broker, so submitted items stay queued until a test processes them itself with
``process_items`` and the no-op editor, on the same database and storage folder, as a worker would.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import select

from xmgie.cli import main
from xmgie.jobs.auth import create_api_key, tenant_for_key
from xmgie.jobs.db import make_engine, make_session_factory, session_scope
from xmgie.jobs.editor import NoOpEditor
from xmgie.jobs.models import Item, Job
from xmgie.jobs.processing import process_items
from xmgie.jobs.settings import Settings
from xmgie.jobs.storage import LocalStorage

REPO_ROOT = Path(__file__).resolve().parents[1]
START_SECONDS = 180.0


@dataclass
class ApiServer:
    """A running ``xmgie api`` process: its URL, database, storage folder and the key issued by the CLI."""

    url: str
    database_url: str
    storage_dir: Path
    cli_key: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group, then SIGKILL if it has not exited within 10 s."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """``xmgie migrate``, ``xmgie admin create-key --tenant t1`` and ``xmgie api`` as processes, for this module."""
    folder = tmp_path_factory.mktemp("client-api")
    database_url = f"sqlite:///{folder / 'xmgie.db'}"
    storage_dir = folder / "storage"
    env = {key: value for key, value in os.environ.items() if not key.startswith("XMGIE_")}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
        XMGIE_DATABASE_URL=database_url,
        XMGIE_STORAGE_URL=storage_dir.as_uri(),
        XMGIE_DATA_DIR=str(folder / "data"),
        HF_HUB_OFFLINE="1",
    )
    command = [sys.executable, "-m", "xmgie.cli"]
    subprocess.run([*command, "migrate"], cwd=REPO_ROOT, env=env, check=True, capture_output=True)
    created = subprocess.run(
        [*command, "admin", "create-key", "--tenant", "t1"], cwd=REPO_ROOT, env=env, check=True, capture_output=True
    )
    cli_key = created.stdout.decode().strip()
    port = _free_port()
    log_path = folder / "api.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*command, "api", "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    api = ApiServer(f"http://127.0.0.1:{port}", database_url, storage_dir, cli_key, process, log_path)
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"xmgie api exited with code {process.returncode}\n{api.log()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{api.url}/healthz", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"xmgie api did not answer within {START_SECONDS:.0f} s\n{api.log()[-4000:]}")
                time.sleep(0.25)
        yield api
    finally:
        _stop(process)


@dataclass
class Tenant:
    """A tenant of its own for one test, so tests sharing the server never see each other's jobs and uploads."""

    id: uuid.UUID
    key: str


@pytest.fixture
def tenant(server: ApiServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Tenant]:
    """A new tenant and its key; ``XMGIE_API_URL`` and ``XMGIE_API_KEY`` name the server and that key."""
    engine = make_engine(server.database_url)
    try:
        with session_scope(engine) as session:
            key = create_api_key(session=session, tenant_name=f"tenant-{uuid.uuid4().hex}")
        with session_scope(engine) as session:
            found = tenant_for_key(session=session, key=key)
            assert found is not None
            tenant_id = found.id
    finally:
        engine.dispose()
    monkeypatch.setenv("XMGIE_API_URL", server.url)
    monkeypatch.setenv("XMGIE_API_KEY", key)
    yield Tenant(tenant_id, key)


def png(path: Path, size: tuple[int, int] = (32, 24), colour: tuple[int, int, int] = (200, 40, 40)) -> Path:
    """Write a small PNG of one colour with a marker pixel, distinct for each colour."""
    image = Image.new("RGB", size, colour)
    image.putpixel((0, 0), (colour[2], colour[0], colour[1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def write_manifest(path: Path, lines: list[dict[str, Any] | str]) -> Path:
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines), encoding="utf-8"
    )
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``main(argv)`` in this process; its exit status, stdout and stderr."""
    capsys.readouterr()
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def jobs_of(server: ApiServer, tenant_id: uuid.UUID) -> list[Job]:
    engine = make_engine(server.database_url)
    try:
        with make_session_factory(engine)() as session:
            return list(session.scalars(select(Job).where(Job.tenant_id == tenant_id)))
    finally:
        engine.dispose()


def items_of(server: ApiServer, job_id: str) -> list[Item]:
    engine = make_engine(server.database_url)
    try:
        with make_session_factory(engine)() as session:
            return list(session.scalars(select(Item).where(Item.job_id == uuid.UUID(job_id)).order_by(Item.index)))
    finally:
        engine.dispose()


def uploads_of(server: ApiServer, tenant_id: uuid.UUID) -> list[bytes]:
    """The bytes of every upload stored for the tenant."""
    storage = LocalStorage(server.storage_dir)
    return [storage.get_bytes(key) for key in storage.list_keys(f"uploads/{tenant_id}/")]


def api_get(server: ApiServer, key: str, path: str) -> Any:
    request = urllib.request.Request(server.url + path, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def process_queued(server: ApiServer, tenant_id: uuid.UUID) -> int:
    """Edit the tenant's queued items with the no-op editor, as a worker would; how many there were."""
    engine = make_engine(server.database_url)
    try:
        factory = make_session_factory(engine)
        with factory() as session:
            item_ids = list(
                session.scalars(
                    select(Item.id)
                    .join(Job, Item.job_id == Job.id)
                    .where(Job.tenant_id == tenant_id, Item.status == "queued")
                    .order_by(Item.index)
                )
            )
        if item_ids:
            process_items(
                session_factory=factory,
                storage=LocalStorage(server.storage_dir),
                editor=NoOpEditor(),
                item_ids=item_ids,
                worker="test-client",
                settings=Settings(database_url=server.database_url, storage_url=server.storage_dir.as_uri()),
            )
        return len(item_ids)
    finally:
        engine.dispose()


# --- Submitting ---------------------------------------------------------------------------------------------------


def test_submit_uploads_each_distinct_file_once_and_items_follow_the_manifest(
    server: ApiServer, tenant: Tenant, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = {
        "a.png": png(tmp_path / "a.png", colour=(200, 40, 40)),
        "b.png": png(tmp_path / "pictures" / "b.png", colour=(40, 200, 40)),
        "m.png": png(tmp_path / "m.png", colour=(255, 255, 255)),
        "id.png": png(tmp_path / "id.png", size=(20, 20), colour=(10, 10, 90)),
    }
    manifest = write_manifest(
        tmp_path / "manifest.jsonl",
        [
            {"image": "a.png", "instruction": "make it blue", "seed": 7, "options": {"num_inference_steps": 3}},
            {"image": "./a.png", "instruction": "add a hat", "mask": "m.png"},
            "",
            {"image": "pictures/b.png", "instruction": "make it night", "seed": 0, "options": {"max_side": 256}},
            {
                "image": "pictures/../pictures/b.png",
                "instruction": "keep the face",
                "identity_image": "id.png",
                "seed": 2**40,
                "options": {"ie": {"reference": "image", "scale": 0.5}},
            },
        ],
    )

    status, out, err = run_cli(capsys, "submit", str(manifest), "--steps", "5")

    assert status == 0, err
    job_id = out.splitlines()[0]
    assert str(uuid.UUID(job_id)) == job_id
    assert "4 file(s) uploaded" in err
    stored = uploads_of(server, tenant.id)
    assert sorted(stored) == sorted(path.read_bytes() for path in files.values())

    items = api_get(server, tenant.key, f"/v1/jobs/{job_id}/items")["data"]
    assert [item["index"] for item in items] == [0, 1, 2, 3]
    assert [item["instruction"] for item in items] == ["make it blue", "add a hat", "make it night", "keep the face"]
    assert [item["seed"] for item in items] == [7, None, 0, 2**40]
    assert [item["options"] for item in items] == [
        {"num_inference_steps": 3},
        {"num_inference_steps": 5},
        {"max_side": 256, "num_inference_steps": 5},
        {"ie": {"reference": "image", "scale": 0.5}, "num_inference_steps": 5},
    ]
    assert items[0]["image"] == items[1]["image"] and items[2]["image"] == items[3]["image"]
    assert [item["mask"] is not None for item in items] == [False, True, False, False]
    assert [item["identity_image"] is not None for item in items] == [False, False, False, True]
    storage = LocalStorage(server.storage_dir)
    assert storage.get_bytes(items[0]["image"]) == files["a.png"].read_bytes()
    assert storage.get_bytes(items[2]["image"]) == files["b.png"].read_bytes()
    assert storage.get_bytes(items[1]["mask"]) == files["m.png"].read_bytes()
    assert storage.get_bytes(items[3]["identity_image"]) == files["id.png"].read_bytes()
    assert all(item["status"] == "queued" for item in items)

    (job,) = jobs_of(server, tenant.id)
    assert str(job.id) == job_id and job.item_count == 4 and job.idempotency_key


def test_submitting_the_same_command_again_returns_the_same_job(
    server: ApiServer, tenant: Tenant, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png(tmp_path / "a.png")
    manifest = write_manifest(tmp_path / "manifest.jsonl", [{"image": "a.png", "instruction": "make it blue"}])

    first_status, first, _ = run_cli(capsys, "submit", str(manifest))
    second_status, second, err = run_cli(capsys, "submit", str(manifest))

    assert first_status == second_status == 0
    assert first.splitlines()[0] == second.splitlines()[0]
    assert "already submitted" in err
    assert len(jobs_of(server, tenant.id)) == 1

    # Another --steps or other input bytes make another submission.
    _, third, _ = run_cli(capsys, "submit", str(manifest), "--steps", "4")
    png(tmp_path / "a.png", colour=(1, 2, 3))
    _, fourth, _ = run_cli(capsys, "submit", str(manifest))
    assert len({first.splitlines()[0], third.splitlines()[0], fourth.splitlines()[0]}) == 3
    assert len(jobs_of(server, tenant.id)) == 3

    # An explicit key wins, and --json prints the job.
    status, out, _ = run_cli(capsys, "submit", str(manifest), "--idempotency-key", "nightly-1", "--json")
    assert status == 0
    job = json.loads(out)
    assert job["idempotency_key"] == "nightly-1" and job["status"] == "queued" and job["item_count"] == 1


def test_the_command_prints_the_job_id_first_and_takes_the_url_and_key_as_options(
    server: ApiServer, tmp_path: Path
) -> None:
    png(tmp_path / "a.png", colour=(9, 99, 199))
    manifest = write_manifest(tmp_path / "manifest.jsonl", [{"image": "a.png", "instruction": "make it blue"}])
    env = {key: value for key, value in os.environ.items() if not key.startswith("XMGIE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "xmgie.cli"]
    options = ["--api", server.url, "--api-key", server.cli_key]

    submitted = subprocess.run(
        [*command, "submit", str(manifest), *options], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.splitlines()[0]
    job = api_get(server, server.cli_key, f"/v1/jobs/{job_id}")
    assert job["id"] == job_id and job["item_count"] == 1

    shown = subprocess.run(
        [*command, "status", job_id, *options], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    assert f"job {job_id}: queued" in shown.stdout
    assert "items: 1 (queued 1, running 0, succeeded 0, failed 0, canceled 0)" in shown.stdout


def test_an_invalid_manifest_line_is_reported_and_nothing_is_submitted(
    server: ApiServer, tenant: Tenant, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png(tmp_path / "a.png")
    manifest = write_manifest(
        tmp_path / "manifest.jsonl",
        [
            {"image": "a.png", "instruction": "make it blue"},
            {"image": "a.png", "instruction": "make it red", "seed": -1},
            "{not json",
        ],
    )

    status, out, err = run_cli(capsys, "submit", str(manifest))

    assert status == 2 and out == ""
    assert f"error: manifest {manifest} has 2 invalid line(s):" in err
    assert f"{manifest}:2: seed must be a non-negative integer, got -1" in err
    assert f"{manifest}:3: invalid JSON" in err
    assert jobs_of(server, tenant.id) == [] and uploads_of(server, tenant.id) == []


def test_a_missing_input_file_is_reported_and_nothing_is_submitted(
    server: ApiServer, tenant: Tenant, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png(tmp_path / "a.png")
    manifest = write_manifest(
        tmp_path / "manifest.jsonl",
        [
            {"image": "a.png", "instruction": "make it blue"},
            {"image": "a.png", "instruction": "make it red", "mask": "gone.png"},
        ],
    )

    status, out, err = run_cli(capsys, "submit", str(manifest))

    assert status == 2 and out == ""
    assert f"error: input_not_found: {manifest}:2: mask not found: {tmp_path / 'gone.png'}" in err
    assert jobs_of(server, tenant.id) == [] and uploads_of(server, tenant.id) == []


def test_an_upload_the_api_refuses_is_reported_with_its_code(
    server: ApiServer, tenant: Tenant, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.png").write_bytes(b"this is not an image")
    manifest = write_manifest(tmp_path / "manifest.jsonl", [{"image": "a.png", "instruction": "make it blue"}])

    status, out, err = run_cli(capsys, "submit", str(manifest))

    assert status == 2 and out == ""
    assert err.startswith("error: not_an_image: ") and f"{manifest}:1: image {tmp_path / 'a.png'}" in err
    assert jobs_of(server, tenant.id) == []


# --- Errors -------------------------------------------------------------------------------------------------------


def test_an_unknown_job_is_a_404(server: ApiServer, tenant: Tenant, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(uuid.uuid4())

    status, out, err = run_cli(capsys, "status", missing)

    assert status == 2 and out == ""
    assert err.strip() == f"error: job_not_found: no job {missing}"


def test_a_missing_or_invalid_key_is_a_401(
    server: ApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("XMGIE_API_KEY", raising=False)
    png(tmp_path / "a.png")
    manifest = write_manifest(tmp_path / "manifest.jsonl", [{"image": "a.png", "instruction": "make it blue"}])

    status, _, err = run_cli(capsys, "submit", str(manifest), "--api", server.url)
    assert status == 2
    assert err.strip() == "error: unauthorized: an API key is required (pass --api-key or set XMGIE_API_KEY)"

    status, _, err = run_cli(capsys, "status", str(uuid.uuid4()), "--api", server.url, "--api-key", "xmgie_wrong")
    assert status == 2
    assert err.strip() == "error: unauthorized: the API key is unknown or revoked"


def test_an_unreachable_api_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("XMGIE_API_URL", raising=False)
    url = f"http://127.0.0.1:{_free_port()}"

    status, out, err = run_cli(capsys, "status", str(uuid.uuid4()), "--api", url, "--api-key", "xmgie_x")

    assert status == 1 and out == ""
    assert err.startswith(f"error: api_unreachable: cannot reach the API at {url}: connection refused")

    status, _, err = run_cli(capsys, "status", str(uuid.uuid4()))
    assert status == 2 and "--api URL or XMGIE_API_URL" in err

    manifest = write_manifest(tmp_path / "manifest.jsonl", [{"image": "a.png", "instruction": "x"}])
    status, _, err = run_cli(capsys, "submit", str(manifest), "--api", url, "--output-dir", str(tmp_path / "out"))
    assert status == 2 and "--output-dir needs --wait" in err


# --- Status and waiting -------------------------------------------------------------------------------------------


def test_status_prints_the_counts_and_waiting_ends_with_the_jobs_outcome(
    server: ApiServer, tenant: Tenant, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png(tmp_path / "a.png", colour=(1, 100, 200))
    png(tmp_path / "b.png", colour=(100, 200, 1))
    manifest = write_manifest(
        tmp_path / "manifest.jsonl",
        [{"image": "a.png", "instruction": "make it blue"}, {"image": "b.png", "instruction": "make it red"}],
    )
    _, out, _ = run_cli(capsys, "submit", str(manifest))
    job_id = out.splitlines()[0]

    status, out, _ = run_cli(capsys, "status", job_id)
    assert status == 0
    assert f"job {job_id}: queued" in out
    assert "items: 2 (queued 2, running 0, succeeded 0, failed 0, canceled 0)" in out
    assert "progress: 0%" in out

    assert process_queued(server, tenant.id) == 2
    status, out, _ = run_cli(capsys, "status", job_id)
    assert status == 0
    assert f"job {job_id}: succeeded" in out
    assert "items: 2 (queued 0, running 0, succeeded 2, failed 0, canceled 0)" in out
    assert "progress: 100%" in out

    status, out, _ = run_cli(capsys, "status", job_id, "--json", "--wait")
    assert status == 0
    job = json.loads(out)
    assert job["id"] == job_id and job["status"] == "succeeded" and job["counts"]["succeeded"] == 2

    # The same command again, now waiting: the same (finished) job, its results downloaded, exit 0.
    output_dir = tmp_path / "out"
    status, out, err = run_cli(capsys, "submit", str(manifest), "--wait", "--output-dir", str(output_dir))
    assert status == 0, err
    assert out.splitlines()[0] == job_id
    stored = {
        item.index: LocalStorage(server.storage_dir).get_bytes(item.output_key) for item in items_of(server, job_id)
    }
    assert (output_dir / "0_a.png").read_bytes() == stored[0]
    assert (output_dir / "1_b.png").read_bytes() == stored[1]
    assert len((output_dir / "results.jsonl").read_text().splitlines()) == 2


def test_waiting_on_a_canceled_job_exits_4(
    server: ApiServer, tenant: Tenant, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png(tmp_path / "a.png", colour=(7, 7, 7))
    manifest = write_manifest(tmp_path / "manifest.jsonl", [{"image": "a.png", "instruction": "make it blue"}])
    _, out, _ = run_cli(capsys, "submit", str(manifest))
    job_id = out.splitlines()[0]

    status, _, err = run_cli(capsys, "status", job_id, "--wait", "--poll-interval", "0.1", "--timeout", "0.3")
    assert status == 1
    assert f"error: wait_timeout: job {job_id} is still queued after 0.3 s" in err

    request = urllib.request.Request(
        f"{server.url}/v1/jobs/{job_id}/cancel", method="POST", headers={"Authorization": f"Bearer {tenant.key}"}
    )
    urllib.request.urlopen(request, timeout=10).close()
    status, out, _ = run_cli(capsys, "status", job_id, "--wait")
    assert status == 4
    assert f"job {job_id}: canceled" in out and "canceled 1" in out


def test_submit_waits_downloads_the_results_and_exits_3_when_an_item_failed(
    server: ApiServer,
    tenant: Tenant,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import xmgie.client

    monkeypatch.setattr(xmgie.client, "ITEMS_PAGE_SIZE", 1)  # every page holds one item: the cursor is followed
    png(tmp_path / "in" / "a.png", colour=(250, 120, 0))
    png(tmp_path / "in" / "b.png", colour=(0, 120, 250))
    png(tmp_path / "in" / "m.png", colour=(255, 255, 255))
    png(tmp_path / "in" / "dot.png", size=(1, 1), colour=(255, 255, 255))  # aspect 1:1 against 4:3 images
    manifest = write_manifest(
        tmp_path / "in" / "manifest.jsonl",
        [
            {"image": "a.png", "instruction": "make it blue", "seed": 1},
            {"image": "b.png", "instruction": "make it red", "mask": "m.png", "seed": 2},
            {"image": "a.png", "instruction": "make it green", "mask": "dot.png", "seed": 3},
        ],
    )
    output_dir = tmp_path / "out"

    stop = threading.Event()
    failures: list[BaseException] = []

    def work() -> None:
        # Leave the job queued for a moment, so the client sees it unfinished first.
        try:
            while not stop.is_set() and not any(job.item_count for job in jobs_of(server, tenant.id)):
                time.sleep(0.05)
            time.sleep(0.5)
            while not stop.is_set() and process_queued(server, tenant.id) == 0:
                time.sleep(0.05)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            failures.append(error)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        status, out, err = run_cli(
            capsys,
            "submit",
            str(manifest),
            "--wait",
            "--poll-interval",
            "0.1",
            "--timeout",
            "60",
            "--output-dir",
            str(output_dir),
        )
    finally:
        stop.set()
        worker.join(timeout=30)
    assert not failures, failures

    assert status == 3, err
    lines = out.splitlines()
    job_id = lines[0]
    assert f"job {job_id}: queued" in err and f"job {job_id}: partial" in err
    assert "partial: 3/3 finished (2 succeeded, 1 failed, 0 canceled)" in out
    assert any(line.startswith("  item 2: mask_aspect_mismatch: ") for line in lines)

    items = items_of(server, job_id)
    assert [item.status for item in items] == ["succeeded", "succeeded", "failed"]
    storage = LocalStorage(server.storage_dir)
    assert (output_dir / "0_a.png").read_bytes() == storage.get_bytes(items[0].output_key)
    assert (output_dir / "1_b.png").read_bytes() == storage.get_bytes(items[1].output_key)
    assert (output_dir / "1_b_mask.png").read_bytes() == storage.get_bytes(items[1].mask_output_key)
    assert sorted(path.name for path in output_dir.iterdir()) == [
        "0_a.png",
        "1_b.png",
        "1_b_mask.png",
        "results.jsonl",
    ]

    records = [json.loads(line) for line in (output_dir / "results.jsonl").read_text().splitlines()]
    assert [record["index"] for record in records] == [0, 1, 2]
    assert [record["status"] for record in records] == ["succeeded", "succeeded", "failed"]
    assert [record["instruction"] for record in records] == ["make it blue", "make it red", "make it green"]
    assert [record["seed"] for record in records] == [1, 2, 3]
    assert [record["manifest_image"] for record in records] == ["a.png", "b.png", "a.png"]
    assert [record["output_file"] for record in records] == [
        str(output_dir / "0_a.png"),
        str(output_dir / "1_b.png"),
        None,
    ]
    assert records[1]["mask_file"] == str(output_dir / "1_b_mask.png")
    assert records[2]["error_code"] == "mask_aspect_mismatch"
    with Image.open(io.BytesIO((output_dir / "0_a.png").read_bytes())) as result:
        assert result.size == (32, 24)
