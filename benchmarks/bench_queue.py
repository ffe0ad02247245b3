"""Queue benchmark of the job service: the whole API → Redis → Celery worker → storage → PostgreSQL path.

Starts real processes on a throw-away PostgreSQL database, a Redis database and a local storage folder (or, with
``--storage s3``, a bucket on a ``python -m moto.server`` process): one ``xmgie api`` per micro-batch size
(``XMGIE_MICRO_BATCH_SIZE`` cuts the API's messages) and, once the accept and poll measurements are done, one
``xmgie worker --pool=solo`` with the no-op editor. A worker edits each message's ids as one micro-batch, so one
worker serves both rows (its own micro-batch setting only sizes re-published retries). Measured side by side in one
run:

1. items/s of a job from ``POST /v1/jobs`` to its ``finished_at`` (polled with ``GET /v1/jobs/{id}``) against the
   same number of items created with ``create_job`` and processed by ``process_items`` with ``NoOpEditor`` in this
   process (no API, no broker), for micro-batch 1 and ``--micro-batch``; the queue path's added time per item;
2. the time to accept a ``--accept-items`` job (no worker running: the broker only receives the messages), with
   the same submission code timed step by step in this process;
3. the median cost of a poll (``GET /v1/jobs/{id}`` over one keep-alive connection) of a 10-item and of the big job.

    python benchmarks/bench_queue.py
    python benchmarks/bench_queue.py --items 500 --micro-batch 8 --json queue.json --keep-logs queue-logs
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from PIL import Image
from sqlalchemy import select

from api.schemas import JobCreate, JobPublic
from api.submissions import item_specs
from xmgie.jobs.db import make_engine, make_session_factory
from xmgie.jobs.dispatch import DEFAULT_QUEUE, GPU_QUEUE, celery_dispatcher
from xmgie.jobs.editor import NoOpEditor
from xmgie.jobs.models import Item, Tenant
from xmgie.jobs.processing import process_items
from xmgie.jobs.settings import Settings
from xmgie.jobs.storage import LocalStorage, Storage, storage_from_settings
from xmgie.jobs.transitions import create_job

REPO_ROOT = Path(__file__).resolve().parents[1]

POSTGRES_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TENANT = "bench"
S3_BUCKET = "xmgie-bench"
TERMINAL = {"succeeded", "failed", "partial", "canceled"}
ADDED_MS_TARGET = 20.0
ACCEPT_S_TARGET = 3.0
POLL_RATIO_TOLERANCE = 1.25
"""The poll target ("the same cost") counts as met when big/small is at most this."""
TASK_LINE = re.compile(
    r"^\[(?P<at>[\d-]+ [\d:]+,\d{3}): \w+/MainProcess\] Task xmgie\.edit_items\[(?P<id>[^\]]+)\] "
    r"(?:(?P<received>received)|succeeded in (?P<runtime>[0-9.eE+-]+)s)",
    re.MULTILINE,
)
"""Celery's log lines of an ``xmgie.edit_items`` task: received, and succeeded with its run time."""
START_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 300.0


def log(message: str) -> None:
    """Progress on stderr; the figures go to stdout at the end."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- Processes ----------------------------------------------------------------------------------------------------


class Service:
    """One process (``command``), leader of its own process group, logging to a file."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with self.log_path.open("wb") as sink:
            self.process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"--- {self.name} ({self.log_path})\n{text[-chars:]}"

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the group, then SIGKILL to whatever of the group is left after ``grace_s``."""
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=grace_s)
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=grace_s)


def run_cli(args: list[str], env: dict[str, str]) -> str:
    """Run ``python -m xmgie.cli ARGS`` to completion; its stdout (raises with the output on failure)."""
    done = subprocess.run(
        [sys.executable, "-m", "xmgie.cli", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"xmgie {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc), or None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def task_log(worker: Service, offset: int) -> list[tuple[datetime, datetime | None, float]]:
    """``(received, finished or None, run seconds)`` of each ``xmgie.edit_items`` task in the worker's log after
    ``offset``, in order (log timestamps are local time, to the millisecond)."""
    with worker.log_path.open("rb") as worker_log:
        worker_log.seek(offset)
        text = worker_log.read().decode(errors="replace")
    tasks: dict[str, list[Any]] = {}
    for match in TASK_LINE.finditer(text):
        at = datetime.strptime(match["at"], "%Y-%m-%d %H:%M:%S,%f")
        if match["received"]:
            tasks[match["id"]] = [at, None, 0.0]
        elif match["id"] in tasks:
            tasks[match["id"]][1:] = [at, float(match["runtime"])]
    return [(received, finished, runtime) for received, finished, runtime in tasks.values()]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def throwaway_database(server_url: str) -> Iterator[str]:
    """A new empty PostgreSQL database on ``server_url``'s server, dropped (with its connections) afterwards."""
    import psycopg

    name = f"xmgie_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(server_url, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- HTTP ---------------------------------------------------------------------------------------------------------


class Client:
    """A keep-alive HTTP/1.1 connection to the API with the bench tenant's key (standard library only)."""

    def __init__(self, port: int, key: str | None = None, timeout_s: float = 120.0) -> None:
        self.port = port
        self.key = key
        self.timeout_s = timeout_s
        self.connection: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None):
        """``(status, body bytes)``; reconnects once if the server closed the idle connection."""
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        if content_type:
            headers["Content-Type"] = content_type
        for attempt in (1, 2):
            if self.connection is None:
                self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout_s)
            try:
                self.connection.request(method, path, body=body, headers=headers)
                response = self.connection.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, payload: Any = None, expect: tuple[int, ...] = (200,)) -> Any:
        body = None if payload is None else payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        status, data = self.request(method, path, body, "application/json" if body is not None else None)
        if status not in expect:
            raise RuntimeError(f"{method} {path}: HTTP {status}: {data[:2000]!r}")
        return json.loads(data)

    def upload(self, data: bytes, filename: str) -> dict[str, Any]:
        boundary = uuid.uuid4().hex
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        body = head + data + f"\r\n--{boundary}--\r\n".encode()
        status, reply = self.request("POST", "/v1/uploads", body, f"multipart/form-data; boundary={boundary}")
        if status != 201:
            raise RuntimeError(f"POST /v1/uploads: HTTP {status}: {reply[:2000]!r}")
        return json.loads(reply)


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float, services: list[Service]) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        dead = [service for service in services if not service.alive()]
        if dead or time.monotonic() > deadline:
            reason = f"{dead[0].name} exited" if dead else f"timed out after {timeout_s:.0f} s"
            logs = "\n".join(service.log_tail() for service in services)
            raise RuntimeError(f"waiting for {what}: {reason}\n{logs}")
        time.sleep(0.2)


def api_ready(port: int) -> bool:
    client = Client(port, timeout_s=2.0)
    try:
        return client.request("GET", "/healthz")[0] == 200
    except OSError:
        return False
    finally:
        client.close()


# --- The benchmark ------------------------------------------------------------------------------------------------


def png_bytes(index: int, size: int) -> bytes:
    """A small distinct RGB PNG."""
    image = Image.new("RGB", (size, size), (index * 37 % 256, index * 91 % 256, 160))
    image.putpixel((index % size, (index // size) % size), (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def job_payload(references: list[str], count: int, label: str) -> dict[str, Any]:
    """A job of ``count`` items cycling over ``references``; a fresh idempotency key makes a retried POST harmless."""
    items = [
        {"image": references[index % len(references)], "instruction": f"{label} item {index}", "seed": index}
        for index in range(count)
    ]
    return {"items": items, "idempotency_key": f"{label}-{uuid.uuid4().hex}"}


class CountingStorage:
    """A storage proxy counting ``exists`` calls (the per-reference check of ``resolve_upload``)."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self.exists_calls = 0

    def exists(self, key: str) -> bool:
        self.exists_calls += 1
        return self._storage.exists(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


class Bench:
    """Everything one run starts, and the measurements; ``close()`` stops and removes it all."""

    def __init__(self, args: argparse.Namespace, workdir: Path, database_url: str) -> None:
        self.args = args
        self.workdir = workdir
        self.database_url = database_url
        self.storage_dir = workdir / "storage"
        self.s3_port: int | None = None
        self.broker_url = f"redis://{args.redis_host}:{args.redis_port}/{args.redis_db}"
        self.redis = redis.Redis(host=args.redis_host, port=args.redis_port, db=args.redis_db)
        self.services: list[Service] = []
        self.clients: list[Client] = []
        self.engine = make_engine(database_url)
        self.session_factory = make_session_factory(self.engine)
        self.storage: Storage = LocalStorage(self.storage_dir)
        self.apis: dict[int, int] = {}
        self.key = ""
        self.tenant_id: uuid.UUID | None = None
        self.references: list[str] = []

    def env(self, micro_batch: int) -> dict[str, str]:
        environment = {name: value for name, value in os.environ.items() if not name.startswith("XMGIE_")}
        environment.update(
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")])),
            HF_HUB_OFFLINE="1",
            XMGIE_DATA_DIR=str(self.workdir / "data"),
            XMGIE_DATABASE_URL=self.database_url,
            XMGIE_BROKER_URL=self.broker_url,
            XMGIE_EDITOR="noop",
            XMGIE_MICRO_BATCH_SIZE=str(micro_batch),
            XMGIE_MAX_ITEMS_PER_JOB=str(max(self.args.accept_items, self.args.items, 10_000)),
        )
        environment.update({f"XMGIE_{name.upper()}": value for name, value in self.storage_settings().items()})
        return environment

    def storage_settings(self) -> dict[str, str]:
        """The storage part of the settings: the local folder, or the bucket on the moto server."""
        if self.s3_port is None:
            return {"storage_url": self.storage_dir.as_uri()}
        return {
            "storage_url": f"s3://{S3_BUCKET}",
            "s3_endpoint_url": f"http://127.0.0.1:{self.s3_port}",
            "s3_region": "us-east-1",
            "s3_access_key_id": "testing",
            "s3_secret_access_key": "testing",
        }

    def start_s3(self) -> float:
        """Start a moto S3 server and create the bucket; the seconds it took."""
        started = time.perf_counter()
        self.s3_port = free_port()
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.s3_port)]
        moto = Service("moto", command, self.env(1), self.workdir)
        self.services.append(moto)
        probe = Client(self.s3_port, timeout_s=2.0)

        def answering() -> bool:
            try:
                probe.request("GET", "/moto-api/")
            except OSError:
                probe.close()
                return False
            return True

        wait_until(answering, f"moto server on port {self.s3_port}", START_TIMEOUT_S, [moto])
        probe.close()
        self.storage = storage_from_settings(self.settings(1), create_bucket=True)
        return time.perf_counter() - started

    def settings(self, micro_batch: int) -> Settings:
        return Settings(
            data_dir=self.workdir / "data",
            database_url=self.database_url,
            broker_url=self.broker_url,
            micro_batch_size=micro_batch,
            max_items_per_job=max(self.args.accept_items, self.args.items, 10_000),
            **self.storage_settings(),
        )

    def client(self, micro_batch: int) -> Client:
        client = Client(self.apis[micro_batch], self.key)
        self.clients.append(client)
        return client

    def start(self, name: str, args: list[str], micro_batch: int) -> Service:
        """``python -m xmgie.cli ARGS`` with the environment of ``micro_batch``."""
        service = Service(name, [sys.executable, "-m", "xmgie.cli", *args], self.env(micro_batch), self.workdir)
        self.services.append(service)
        return service

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for service in self.services:
            if service.alive():
                log(f"stopping {service.name}")
            service.stop()
        self.engine.dispose()
        with contextlib.suppress(redis.RedisError):
            self.redis.flushdb()
        self.redis.close()

    # --- setup

    def setup(self, micro_batches: list[int]) -> dict[str, float]:
        """Start the API processes, and meanwhile migrate the database and create the key; wait until they answer.

        (The APIs touch the database only per request, so they may start before the schema exists.)
        """
        started = time.perf_counter()
        apis = []
        for micro_batch in micro_batches:
            port = free_port()
            self.apis[micro_batch] = port
            apis.append(self.start(f"api-mb{micro_batch}", ["api", "--port", str(port)], micro_batch))
        run_cli(["migrate"], self.env(1))
        migrated = time.perf_counter()
        self.key = run_cli(["admin", "create-key", "--tenant", TENANT], self.env(1)).strip().splitlines()[-1]
        with self.session_factory() as session:
            self.tenant_id = session.execute(select(Tenant.id).where(Tenant.name == TENANT)).scalar_one()
        keyed = time.perf_counter()
        for micro_batch, service in zip(micro_batches, apis, strict=True):
            port = self.apis[micro_batch]
            wait_until(lambda port=port: api_ready(port), f"{service.name} on port {port}", START_TIMEOUT_S, apis)
        ready = time.perf_counter()
        return {"migrate_s": migrated - started, "create_key_s": keyed - migrated, "apis_ready_s": ready - started}

    def upload_inputs(self, count: int, size: int) -> dict[str, float]:
        client = self.client(min(self.apis))
        images = [png_bytes(index, size) for index in range(count)]
        started = time.perf_counter()
        self.references = [client.upload(data, f"in{index}.png")["reference"] for index, data in enumerate(images)]
        seconds = time.perf_counter() - started
        return {"count": count, "image_size": size, "bytes_each": len(images[0]), "total_s": seconds}

    def purge_gpu_queue(self) -> int:
        """Drop the messages waiting on the ``gpu`` and ``default`` queues (kombu's bindings stay): a large
        submission is one ``xmgie.publish_edits`` message on ``default``; how many messages there were."""
        waiting = 0
        for queue in (GPU_QUEUE, DEFAULT_QUEUE):
            waiting += int(self.redis.llen(queue))
            for key in self.redis.scan_iter(match=f"{queue}*"):
                if self.redis.type(key) == b"list":
                    self.redis.delete(key)
        return waiting

    # --- 2. accepting a big job

    def accept(self, micro_batch: int, count: int, handful: int) -> dict[str, Any]:
        """Time ``POST /v1/jobs`` of ``count`` items over ``handful`` uploads (after a 1-item warm-up job that
        connects the API to the broker); the messages it published are counted and dropped."""
        client = self.client(micro_batch)
        client.json("POST", "/v1/jobs", job_payload(self.references[:1], 1, "warmup"), expect=(202,))  # connect broker
        self.purge_gpu_queue()
        body = json.dumps(job_payload(self.references[:handful], count, f"accept-mb{micro_batch}")).encode()
        started = time.perf_counter()
        job = client.json("POST", "/v1/jobs", body, expect=(202,))
        seconds = time.perf_counter() - started
        published = self.purge_gpu_queue()
        return {
            "micro_batch": micro_batch,
            "items": count,
            "distinct_uploads": min(handful, len(self.references)),
            "body_bytes": len(body),
            "seconds": seconds,
            "items_per_s": count / seconds,
            "messages_on_queue": published,
            "job_id": job["id"],
            "job_status": job["status"],
        }

    def accept_breakdown(self, micro_batch: int, count: int, handful: int) -> dict[str, Any]:
        """The API's submission steps for the same body, timed one by one in this process (same database, storage
        and broker)."""
        settings = self.settings(micro_batch)
        storage = CountingStorage(self.storage)
        dispatch = celery_dispatcher(self.broker_url, micro_batch, settings.lease_seconds)
        dispatch([uuid.uuid4()])  # connects to the broker, as the API's warm-up job did (purged below)
        body = json.dumps(job_payload(self.references[:handful], count, f"breakdown-mb{micro_batch}")).encode()
        steps: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            steps[name] = now - clock
            clock = now

        job_in = JobCreate.model_validate_json(body)
        lap("parse_validate")
        specs = item_specs(job_in=job_in, tenant_id=self.tenant_id, storage=storage, settings=settings)
        lap("item_specs")
        with self.session_factory() as session:
            job, _ = create_job(
                session=session,
                tenant_id=self.tenant_id,
                items=specs,
                options=job_in.options,
                idempotency_key=job_in.idempotency_key,
            )
            lap("create_job")
            session.commit()
            lap("commit")
            item_ids = list(session.scalars(select(Item.id).where(Item.job_id == job.id).order_by(Item.index)))
            lap("item_ids")
            dispatch(item_ids)
            lap("publish")
            JobPublic.from_job(job).model_dump_json()
            lap("response")
        messages = self.purge_gpu_queue()
        return {
            "micro_batch": micro_batch,
            "steps_s": steps,
            "total_s": sum(steps.values()),
            "storage_exists_calls": storage.exists_calls,
            "messages": messages,
        }

    # --- 3. polls

    def polls(self, big_job_id: str, requests: int) -> dict[str, Any]:
        """Median GET times of a 10-item job, the big job and ``/healthz``, interleaved on one connection."""
        client = self.client(min(self.apis))
        small = client.json("POST", "/v1/jobs", job_payload(self.references, 10, "poll"), expect=(202,))
        self.purge_gpu_queue()
        paths = {"healthz": "/healthz", "small": f"/v1/jobs/{small['id']}", "big": f"/v1/jobs/{big_job_id}"}
        seconds: dict[str, list[float]] = {name: [] for name in paths}
        for round_number in range(requests + 5):  # 5 warm-up rounds, interleaved like the measured ones
            order = list(paths) if round_number % 2 == 0 else list(paths)[::-1]
            for name in order:
                started = time.perf_counter()
                status, _ = client.request("GET", paths[name])
                elapsed = time.perf_counter() - started
                if status != 200:
                    raise RuntimeError(f"GET {paths[name]}: HTTP {status}")
                if round_number >= 5:
                    seconds[name].append(elapsed)
        medians = {name: statistics.median(values) * 1000 for name, values in seconds.items()}
        return {
            "requests": requests,
            "median_ms": medians,
            "p90_ms": {name: statistics.quantiles(values, n=10)[-1] * 1000 for name, values in seconds.items()},
            "ratio_big_small": medians["big"] / medians["small"],
        }

    # --- 1. throughput

    def start_worker(self, micro_batch: int) -> Service:
        """The one worker of the throughput runs (``--pool=solo``, no-op editor)."""
        return self.start(f"worker-mb{micro_batch}", ["worker", "--pool=solo", "--loglevel=INFO"], micro_batch)

    def queue_run(self, micro_batch: int, count: int, label: str, worker: Service) -> dict[str, Any]:
        """Submit ``count`` items to the API of ``micro_batch`` and poll until the job has finished.

        The time is from just before the POST to the job's ``finished_at`` (set by the worker's last transaction;
        same machine, same clock), so the poll interval adds no granularity; the client's own observation is kept
        too. The worker's log gives its tasks' run times and the gaps between them; /proc gives CPU seconds.
        """
        client, poller = self.client(micro_batch), self.client(min(self.apis))
        apis = [service for service in self.services if service.name.startswith("api-")]
        services = [worker, *apis]
        body = json.dumps(job_payload(self.references, count, label)).encode()
        log_offset = worker.log_path.stat().st_size
        cpu_before = {service.name: process_cpu_s(service.process.pid) for service in services}
        submitted = datetime.now(UTC)
        started = time.perf_counter()
        job = client.json("POST", "/v1/jobs", body, expect=(202,))
        accepted = time.perf_counter()
        accepted_local = datetime.now()  # Celery's log timestamps are local time
        deadline = started + JOB_TIMEOUT_S
        polls = 0
        while job["status"] not in TERMINAL:
            if time.perf_counter() > deadline or not all(service.alive() for service in services):
                logs = "\n".join(service.log_tail() for service in services)
                raise RuntimeError(f"job {job['id']} still {job['status']} ({job['counts']})\n{logs}")
            time.sleep(self.args.poll_interval)
            job = poller.json("GET", f"/v1/jobs/{job['id']}")
            polls += 1
        observed = time.perf_counter()
        if job["status"] != "succeeded":
            raise RuntimeError(f"job {job['id']} ended {job['status']}: {job['counts']}")
        finished = datetime.fromisoformat(job["finished_at"])
        # The job finishes inside the last task (which then writes the manifest): wait for its log line too.
        messages = -(-count // micro_batch)
        tasks = task_log(worker, log_offset)
        deadline = time.perf_counter() + 30.0
        while sum(1 for task in tasks if task[1] is not None) < messages and time.perf_counter() < deadline:
            time.sleep(0.05)
            tasks = task_log(worker, log_offset)
        cpu_after = {service.name: process_cpu_s(service.process.pid) for service in services}
        cpu = {
            name: cpu_after[name] - cpu_before[name]
            for name in cpu_before
            if cpu_before[name] is not None and cpu_after[name] is not None
        }
        done = [task for task in tasks if task[1] is not None]
        first_received = min((task[0] for task in tasks), default=accepted_local)
        gaps = [(later[0] - earlier[1]).total_seconds() for earlier, later in zip(done, done[1:], strict=False)]
        return {
            "seconds": (finished - submitted).total_seconds(),
            "observed_s": observed - started,
            "accept_s": accepted - started,
            "polls": polls,
            "tasks": len(done),
            "to_first_task_s": max((first_received - accepted_local).total_seconds(), 0.0),
            "task_s": sum(task[2] for task in done),
            "between_tasks_s": sum(gaps),
            "cpu_s": cpu,
        }

    def inprocess_run(self, count: int, micro_batch: int, label: str) -> dict[str, Any]:
        """``create_job`` (committed, ids read back, as the API does) then ``process_items`` per micro-batch."""
        settings = self.settings(micro_batch)
        editor = NoOpEditor()
        specs = [
            {"input_key": self.references[index % len(self.references)], "instruction": f"{label} item {index}"}
            | {"seed": index}
            for index in range(count)
        ]
        cpu_started = time.process_time()
        started = time.perf_counter()
        with self.session_factory() as session:
            job, _ = create_job(session=session, tenant_id=self.tenant_id, items=specs, options={})
            job_id = job.id
            session.commit()
            item_ids = list(session.scalars(select(Item.id).where(Item.job_id == job_id).order_by(Item.index)))
        created = time.perf_counter()
        statuses: dict[str, int] = {}
        worker = f"bench:{os.getpid()}"
        for start in range(0, count, micro_batch):
            outcomes = process_items(
                session_factory=self.session_factory,
                storage=self.storage,
                editor=editor,
                item_ids=item_ids[start : start + micro_batch],
                worker=worker,
                settings=settings,
            )
            for outcome in outcomes:
                statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
        finished = time.perf_counter()
        if statuses != {"succeeded": count}:
            raise RuntimeError(f"in-process job {job_id}: {statuses}")
        return {
            "seconds": finished - started,
            "create_s": created - started,
            "process_s": finished - created,
            "cpu_s": time.process_time() - cpu_started,
        }

    def throughput_row(self, micro_batch: int, count: int, repeats: int, worker: Service) -> dict[str, Any]:
        """In-process and queue runs of ``count`` items at ``micro_batch``, alternating, after one warm-up each."""
        self.queue_run(micro_batch, 2 * micro_batch, f"warmup-mb{micro_batch}", worker)
        self.inprocess_run(2 * micro_batch, micro_batch, f"warmup-inproc-mb{micro_batch}")
        runs: dict[str, list[dict[str, Any]]] = {"inprocess": [], "queue": []}
        for repeat in range(repeats):
            order = ("inprocess", "queue") if repeat % 2 == 0 else ("queue", "inprocess")
            for kind in order:
                label = f"{kind}-mb{micro_batch}-{repeat}"
                log(f"micro-batch {micro_batch}: {kind} run {repeat + 1}/{repeats} ({count} items)")
                if kind == "queue":
                    runs[kind].append(self.queue_run(micro_batch, count, label, worker))
                else:
                    runs[kind].append(self.inprocess_run(count, micro_batch, label))
        inprocess_s = statistics.median(run["seconds"] for run in runs["inprocess"])
        queue_s = statistics.median(run["seconds"] for run in runs["queue"])
        paired = list(zip(runs["queue"], runs["inprocess"], strict=True))
        return {
            "micro_batch": micro_batch,
            "items": count,
            "repeats": repeats,
            "inprocess_s": inprocess_s,
            "queue_s": queue_s,
            "inprocess_items_per_s": count / inprocess_s,
            "queue_items_per_s": count / queue_s,
            "added_ms_per_item": statistics.median((q["seconds"] - i["seconds"]) / count * 1000 for q, i in paired),
            "split_ms_per_item": split_ms_per_item(paired, count),
            "runs": runs,
        }


def split_ms_per_item(paired: list[tuple[dict[str, Any], dict[str, Any]]], count: int) -> dict[str, float]:
    """Where the time went, in ms per item (medians over the repeats).

    Queue run: the POST, the wait from its reply until the worker received the first message, the worker's task run
    times, and the gaps between one task's end and the next message's receipt (ack, fetch, Celery's bookkeeping);
    CPU of the worker and of the API processes (polls included). In-process run: create_job, process_items, CPU.
    """

    def median(values: Iterator[float]) -> float:
        return statistics.median(values) / count * 1000

    split = {
        "post": median(q["accept_s"] for q, _ in paired),
        "to_first_task": median(q["to_first_task_s"] for q, _ in paired),
        "worker_tasks": median(q["task_s"] for q, _ in paired),
        "between_tasks": median(q["between_tasks_s"] for q, _ in paired),
        "inprocess_create": median(i["create_s"] for _, i in paired),
        "inprocess_process": median(i["process_s"] for _, i in paired),
        "inprocess_cpu": median(i["cpu_s"] for _, i in paired),
    }
    for name in paired[0][0]["cpu_s"]:
        split[f"cpu_{name.split('-')[0]}"] = split.get(f"cpu_{name.split('-')[0]}", 0.0) + median(
            q["cpu_s"].get(name, 0.0) for q, _ in paired
        )
    return split


# --- Report -------------------------------------------------------------------------------------------------------


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def print_report(figures: dict[str, Any]) -> None:
    args = figures["config"]
    setup, uploads = figures["setup"], figures["uploads"]
    print(
        f"queue benchmark: {args['items']} items per run (no-op editor), {args['accept_items']}-item accept, "
        f"micro-batch {' and '.join(map(str, args['micro_batches']))}; PostgreSQL {args['database']}, "
        f"{args['storage']} storage, Redis db {args['redis_db']}; {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}"
    )
    print(
        f"setup: migrate {setup['migrate_s']:.1f} s, create-key {setup['create_key_s']:.1f} s, "
        f"API processes (started alongside) answering after {setup['apis_ready_s']:.1f} s"
    )
    print(
        f"uploads (not in the throughput): {uploads['count']} PNGs of {uploads['image_size']}x{uploads['image_size']} "
        f"({uploads['bytes_each']} B) in {uploads['total_s']:.2f} s = "
        f"{1000 * uploads['total_s'] / uploads['count']:.1f} ms each"
    )

    print(
        "\n1. throughput, submission until the job's finished_at (in-process: create_job + process_items, NoOpEditor)"
    )
    print(
        f"  {'micro-batch':>11} {'in-process/s':>13} {'queue/s':>9} {'in-process s':>13} {'queue s':>8} "
        f"{'added ms/item':>14}  target"
    )
    for row in figures["throughput"]:
        print(
            f"  {row['micro_batch']:>11} {row['inprocess_items_per_s']:>13.1f} {row['queue_items_per_s']:>9.1f} "
            f"{row['inprocess_s']:>13.2f} {row['queue_s']:>8.2f} {row['added_ms_per_item']:>14.2f}  "
            f"≤ {ADDED_MS_TARGET:.0f} ms per item: {verdict(row['added_ms_per_item'] <= ADDED_MS_TARGET)}"
        )
    print(
        "  ms per item: queue = POST + worker tasks + gaps between tasks (CPU: worker, APIs); "
        "in-process = create_job + process_items (CPU)"
    )
    for row in figures["throughput"]:
        split = row["split_ms_per_item"]
        print(
            f"  {row['micro_batch']:>11}  queue {split['post']:.2f} + "
            f"{split['worker_tasks']:.2f} + {split['between_tasks']:.2f} (CPU {split.get('cpu_worker', 0):.2f}, "
            f"{split.get('cpu_api', 0):.2f});  in-process {split['inprocess_create']:.2f} + "
            f"{split['inprocess_process']:.2f} (CPU {split['inprocess_cpu']:.2f})"
        )

    print(f"\n2. accepting a {args['accept_items']}-item job (POST /v1/jobs, no worker running)")
    for accept, breakdown in zip(figures["accept"], figures["accept_breakdown"], strict=True):
        print(
            f"  micro-batch {accept['micro_batch']}: {accept['seconds']:.2f} s ({accept['items_per_s']:.0f} items/s, "
            f"{accept['body_bytes'] / 2**20:.1f} MiB body, {accept['distinct_uploads']} distinct uploads, "
            f"{accept['messages_on_queue']} messages on the queue)  target < {ACCEPT_S_TARGET:.0f} s: "
            f"{verdict(accept['seconds'] < ACCEPT_S_TARGET)}"
        )
        steps = ", ".join(f"{name} {seconds:.2f}" for name, seconds in breakdown["steps_s"].items())
        print(
            f"    same steps in this process (s): {steps}; sum {breakdown['total_s']:.2f} "
            f"({breakdown['storage_exists_calls']} storage.exists calls, {breakdown['messages']} messages)"
        )

    polls = figures["polls"]
    medians, p90 = polls["median_ms"], polls["p90_ms"]
    ratio = polls["ratio_big_small"]
    print(f"\n3. poll cost (GET, median of {polls['requests']} over one keep-alive connection, interleaved)")
    print(f"  10-item job      {medians['small']:.2f} ms (p90 {p90['small']:.2f})")
    print(f"  {args['accept_items']}-item job  {medians['big']:.2f} ms (p90 {p90['big']:.2f})")
    print(f"  /healthz         {medians['healthz']:.2f} ms (p90 {p90['healthz']:.2f}; no database, no key)")
    print(
        f"  ratio big/small  {ratio:.2f}  target ≈ 1 (≤ {POLL_RATIO_TOLERANCE}): "
        f"{verdict(ratio <= POLL_RATIO_TOLERANCE)}"
    )


# --- Main ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=200, help="items per throughput run")
    parser.add_argument("--accept-items", type=int, default=10_000, help="items of the job whose acceptance is timed")
    parser.add_argument("--micro-batch", type=int, default=8, help="micro-batch of the second row (1: one row only)")
    parser.add_argument("--repeats", type=int, default=2, help="throughput runs per path and row (order alternates)")
    parser.add_argument("--polls", type=int, default=50, help="measured GETs per job")
    parser.add_argument("--handful", type=int, default=8, help="distinct uploads the big job refers to")
    parser.add_argument("--image-size", type=int, default=64, help="side of the uploaded PNGs")
    parser.add_argument("--poll-interval", type=float, default=0.25, help="seconds between polls of a running job")
    parser.add_argument("--storage", choices=("local", "s3"), default="local", help="s3: a bucket on moto's server")
    parser.add_argument("--database-url", help="a PostgreSQL database to use (default: a throw-away one, dropped)")
    parser.add_argument("--postgres-server-url", default=POSTGRES_SERVER_URL, help="where throw-away databases go")
    parser.add_argument("--redis-host", default="127.0.0.1")
    parser.add_argument("--redis-port", type=int, default=6379)
    parser.add_argument("--redis-db", type=int, default=11, help="flushed at start and end (not 0)")
    parser.add_argument("--keep-logs", type=Path, help="copy the processes' logs into this folder")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.redis_db == 0:
        parser.error("--redis-db 0 is refused: the benchmark flushes its Redis database")
    if args.items < 1 or args.accept_items < 1 or args.micro_batch < 1 or args.repeats < 1 or args.polls < 2:
        parser.error("--items, --accept-items, --micro-batch, --repeats must be positive, --polls at least 2")
    return args


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # so the cleanup below also runs on SIGTERM
    micro_batches = sorted({1, args.micro_batch})
    probe = redis.Redis(host=args.redis_host, port=args.redis_port, db=args.redis_db)
    probe.flushdb()
    probe.close()
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="xmgie-bench-queue-")))
        if args.database_url:
            database_url, database = args.database_url, "(given)"
        else:
            database_url = stack.enter_context(throwaway_database(args.postgres_server_url))
            database = f"{database_url.rsplit('/', 1)[1]} (throw-away)"
        bench = Bench(args, workdir, database_url)
        if args.keep_logs:  # registered first, so it runs after the processes have stopped
            stack.callback(lambda: [copy_logs(service, args.keep_logs) for service in bench.services])
        stack.callback(bench.close)
        s3_start_s = bench.start_s3() if args.storage == "s3" else None
        storage = bench.storage_settings()["storage_url"]
        log(f"database {database}, storage {storage}, broker {bench.broker_url}")
        setup = bench.setup(micro_batches)
        if s3_start_s is not None:
            setup["s3_start_s"] = s3_start_s
        log(f"APIs up: {bench.apis}; uploading {args.items} inputs")
        uploads = bench.upload_inputs(args.items, args.image_size)
        accepts, breakdowns = [], []
        for micro_batch in micro_batches:
            log(f"accepting a {args.accept_items}-item job (micro-batch {micro_batch})")
            accepts.append(bench.accept(micro_batch, args.accept_items, args.handful))
            log(f"  {accepts[-1]['seconds']:.2f} s; the same steps in this process")
            breakdowns.append(bench.accept_breakdown(micro_batch, args.accept_items, args.handful))
        log("polls")
        polls = bench.polls(accepts[0]["job_id"], args.polls)
        # One worker for both rows: a worker edits each message's ids as one micro-batch (the API's setting cuts
        # them); its own XMGIE_MICRO_BATCH_SIZE only sizes re-published retries.
        log("starting the worker")
        worker = bench.start_worker(args.micro_batch)
        rows = [bench.throughput_row(micro_batch, args.items, args.repeats, worker) for micro_batch in micro_batches]
        worker.stop()
        figures = {
            "config": {
                "items": args.items,
                "accept_items": args.accept_items,
                "micro_batches": micro_batches,
                "repeats": args.repeats,
                "database": database,
                "storage": args.storage,
                "redis_db": args.redis_db,
                "cpus": os.cpu_count(),
                "poll_interval_s": args.poll_interval,
            },
            "setup": setup,
            "uploads": uploads,
            "throughput": rows,
            "accept": accepts,
            "accept_breakdown": breakdowns,
            "polls": polls,
            "targets": {
                "added_ms_per_item_max": ADDED_MS_TARGET,
                "accept_s_max": ACCEPT_S_TARGET,
                "poll_ratio_max": POLL_RATIO_TOLERANCE,
            },
        }
    print_report(figures)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


def copy_logs(service: Service, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if service.log_path.exists():
        (folder / service.log_path.name).write_bytes(service.log_path.read_bytes())


if __name__ == "__main__":
    sys.exit(main())
