"""Faults in the middle of a job, on a stack of the suite's own: a PostgreSQL cluster, a Redis server, a moto S3
server behind a TCP gate that can refuse or freeze connections, ``xmgie api``, two ``xmgie worker`` processes on
the ``gpu`` queue (no-op editor), a bookkeeping worker and ``xmgie beat`` (short lease and reconcile interval).

After each fault: every item succeeded exactly once (one success transition in the workers' logs, the attempts
expected, one stored version of its output whose sha256 is the recorded one), nothing lost, no 5xx answer without
the JSON envelope while it lasted, ``/readyz`` not ready while it lasted. The outage length and the recovery
times are printed (``pytest -m faults``); the README's "Guarantees under faults" quotes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from tests.services import (
    S3_CREDENTIALS,
    PostgresCluster,
    RedisServer,
    TcpGate,
    WorkerProcess,
    WorkerStarter,
    api_server,
    moto_server,
    postgres_cluster,
    redis_server,
    s3_settings,
    service_env,
)
from xmgie.jobs.auth import create_api_key
from xmgie.jobs.db import make_engine, make_session_factory, session_scope
from xmgie.jobs.migrate import upgrade_database
from xmgie.jobs.models import Item, Job
from xmgie.jobs.storage import S3Storage

pytestmark = pytest.mark.faults

BUCKET = "xmgie-faults"
ITEMS = 30
LEASE_SECONDS = 30
"""Long enough that only the broker-restart detection, not the lease-long sweep, can resume a job within 15 s."""
RECONCILE_SECONDS = 2
REDIS_RESUME_LIMIT_SECONDS = 15.0
"""The job resumes within this long of Redis answering again."""
JOB_TIMEOUT_SECONDS = 240.0
SUCCESS_LINE = re.compile(r"edit_items \['([0-9a-f-]{36})'\]: \{[^}]*'succeeded': 1")


@dataclass
class Stack:
    """The running services and what the tests need to drive and inspect them."""

    tmp: Path
    postgres: PostgresCluster
    redis: RedisServer
    gate: TcpGate
    s3: Any
    """A boto3 client of the moto server itself (not through the gate)."""
    session_factory: sessionmaker[Session]
    base_url: str
    headers: dict[str, str]
    references: list[str]
    workers: WorkerStarter
    gpu_workers: list[WorkerProcess]

    def logs(self) -> str:
        return "\n".join(worker.log() for worker in self.workers.started)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("faults")
    with contextlib.ExitStack() as services:
        postgres = services.enter_context(postgres_cluster())
        redis = services.enter_context(redis_server(tmp))
        moto_port = services.enter_context(moto_server())
        gate = TcpGate(moto_port)
        services.callback(gate.close)
        S3Storage(BUCKET, endpoint_url=f"http://127.0.0.1:{moto_port}", create_bucket=True, **S3_CREDENTIALS)
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{moto_port}",
            region_name="us-east-1",
            aws_access_key_id=S3_CREDENTIALS["access_key_id"],
            aws_secret_access_key=S3_CREDENTIALS["secret_access_key"],
        )
        # Every write of an output is kept as a version: a second write of an item would show.
        s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})

        upgrade_database(postgres.url)
        engine = make_engine(postgres.url)
        services.callback(engine.dispose)
        with session_scope(engine) as session:
            key = create_api_key(session=session, tenant_name="faults")
        env = service_env(
            XMGIE_DATABASE_URL=postgres.url,
            XMGIE_BROKER_URL=redis.url,
            XMGIE_DATA_DIR=str(tmp / "data"),
            XMGIE_EDITOR="noop",
            XMGIE_NOOP_DELAY="0.2",
            XMGIE_LEASE_SECONDS=str(LEASE_SECONDS),
            XMGIE_RECONCILE_SECONDS=str(RECONCILE_SECONDS),
            XMGIE_MAX_ATTEMPTS="3",
            XMGIE_MICRO_BATCH_SIZE="1",
            XMGIE_STORAGE_CONNECT_TIMEOUT_SECONDS="1",
            XMGIE_STORAGE_READ_TIMEOUT_SECONDS="2",
            XMGIE_PROBE_TIMEOUT_SECONDS="1",
            **s3_settings(gate.port, BUCKET),
        )
        workers = WorkerStarter(tmp, env)
        services.callback(workers.stop_all)
        gpu_workers = [workers("--queues=gpu") for _ in range(2)]
        workers("--queues=default")
        workers(command="beat")
        base_url = services.enter_context(api_server(env, tmp / "api.log"))
        headers = {"Authorization": f"Bearer {key}"}
        references = []
        with httpx2.Client(base_url=base_url, headers=headers, timeout=30) as client:
            for seed in range(4):
                files = {"file": (f"{seed}.png", _png(seed), "image/png")}
                answer = client.post("/v1/uploads", files=files)
                assert answer.status_code == 201, answer.text
                references.append(answer.json()["reference"])
        yield Stack(
            tmp=tmp,
            postgres=postgres,
            redis=redis,
            gate=gate,
            s3=s3,
            session_factory=make_session_factory(engine),
            base_url=base_url,
            headers=headers,
            references=references,
            workers=workers,
            gpu_workers=gpu_workers,
        )


def _png(seed: int) -> bytes:
    image = Image.new("RGB", (32, 24), (30 + 50 * seed, 90, 200 - 40 * seed))
    image.putpixel((seed, 3), (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Answer:
    """One request made while the fault was on."""

    started: float
    ended: float
    path: str
    status: int
    enveloped: bool
    body: str


@dataclass
class Prober:
    """Polls ``/readyz`` and the job in a thread, recording every answer (a failed connection as status 0)."""

    base_url: str
    headers: dict[str, str]
    job_id: str
    answers: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx2.Client(base_url=self.base_url, headers=self.headers, timeout=10) as client:
            while not self.stop.is_set():
                for path in ("/readyz", f"/v1/jobs/{self.job_id}"):
                    self.answers.append(request(client, "GET", path))
                time.sleep(0.2)


def request(client: httpx2.Client, method: str, path: str, **kwargs: Any) -> Answer:
    started = time.monotonic()
    try:
        response = client.request(method, path, **kwargs)
    except httpx2.HTTPError as error:
        return Answer(started, time.monotonic(), path, 0, False, repr(error))
    try:
        enveloped = isinstance(response.json().get("error", {}).get("code"), str)
    except ValueError:
        enveloped = False
    return Answer(started, time.monotonic(), path, response.status_code, enveloped, response.text)


def submit(stack: Stack, client: httpx2.Client, count: int) -> Answer:
    items = [
        {"image": stack.references[index % len(stack.references)], "instruction": f"make it snowy {index}"}
        for index in range(count)
    ]
    return request(client, "POST", "/v1/jobs", json={"items": items})


def succeeded_count(stack: Stack, job_id: str) -> int | None:
    """The job's succeeded items, or None while the database does not answer."""
    try:
        with stack.session_factory() as session:
            job = session.get(Job, uuid.UUID(job_id))
            return None if job is None else job.succeeded_count
    except Exception:  # noqa: BLE001 - the database may be the fault being injected
        return None


def wait_for(condition: Callable[[], bool], what: str, stack: Stack, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{stack.logs()[-6000:]}")
        time.sleep(0.1)


@dataclass
class Fault:
    """What to inject: ``begin`` and ``end`` act on the stack; ``hold`` seconds in between."""

    name: str
    begin: Callable[[Stack], None]
    end: Callable[[Stack], None]
    hold: float
    refusal_code: str | None
    """The error code a submission made during the fault may get (its other possible answer is 202)."""
    unready: bool = True
    """Whether ``/readyz`` must say not ready while the fault lasts."""
    extra_attempts: int = 0
    """How many items may need one attempt more (those a killed worker was editing)."""


@dataclass
class Report:
    fault: str
    began: float
    outage_seconds: float
    resumed_after: float | None
    """Seconds from the fault's end until the next item succeeded."""
    done_after: float
    """Seconds from the fault's end until the job ended."""
    answers: list[Answer]
    jobs: list[str]


def inject(stack: Stack, fault: Fault) -> Report:
    """Submit a job, inject ``fault`` once a few items succeeded, and wait for every job accepted to end."""
    with httpx2.Client(base_url=stack.base_url, headers=stack.headers, timeout=30) as client:
        submitted = submit(stack, client, ITEMS)
        assert submitted.status == 202, submitted.body
        job_id = _job_id(submitted)
        wait_for(lambda: (succeeded_count(stack, job_id) or 0) >= 4, "the job to start", stack, timeout=60)

        prober = Prober(stack.base_url, stack.headers, job_id)
        thread = threading.Thread(target=prober.run, daemon=True)
        thread.start()
        began = time.monotonic()
        fault.begin(stack)
        time.sleep(fault.hold / 2)
        during = submit(stack, client, 2)
        time.sleep(max(0.0, began + fault.hold - time.monotonic()))
        ended_fault = time.monotonic()
        fault.end(stack)
        back = time.monotonic()
        count_at_end = succeeded_count(stack, job_id)
        resumed: float | None = None
        jobs = [job_id] + ([_job_id(during)] if during.status == 202 else [])

        def finished() -> bool:
            nonlocal resumed, count_at_end
            count = succeeded_count(stack, job_id)
            if count is not None and count_at_end is None:
                count_at_end = count
            if resumed is None and count is not None and count_at_end is not None and count > count_at_end:
                resumed = time.monotonic() - back
            return all(_job_status(stack, job) in ("succeeded", "partial", "failed", "canceled") for job in jobs)

        wait_for(finished, f"the jobs to end after {fault.name}", stack, timeout=JOB_TIMEOUT_SECONDS)
        done = time.monotonic() - back
        prober.stop.set()
        thread.join(timeout=15)
    answers = [answer for answer in prober.answers if answer.started >= began and answer.ended <= ended_fault]
    answers.append(during)
    return Report(fault.name, began, ended_fault - began, resumed, done, answers, jobs)


def _job_id(answer: Answer) -> str:
    return json.loads(answer.body)["id"]


def _job_status(stack: Stack, job_id: str) -> str | None:
    try:
        with stack.session_factory() as session:
            job = session.get(Job, uuid.UUID(job_id))
            return None if job is None else job.status
    except Exception:  # noqa: BLE001 - not answering yet
        return None


def _logged_successes(stack: Stack, job_ids: list[str], patience: float = 10.0) -> Counter[str]:
    """Success lines per item id in the workers' logs, waiting up to ``patience`` seconds for every item's line: a
    worker logs its success after committing it, so a finished job can be read before its last line is written."""
    with stack.session_factory() as session:
        wanted = {
            str(item_id)
            for item_id in session.scalars(select(Item.id).where(Item.job_id.in_(map(uuid.UUID, job_ids))))
        }
    deadline = time.monotonic() + patience
    while True:
        successes = Counter(SUCCESS_LINE.findall(stack.logs()))
        if wanted <= set(successes) or time.monotonic() > deadline:
            return successes
        time.sleep(0.2)


def check_exactly_once(stack: Stack, report: Report, fault: Fault) -> dict[str, int]:
    """Assert what every fault must leave behind; the attempts per item, counted."""
    successes = _logged_successes(stack, report.jobs)
    attempts: Counter[int] = Counter()
    unlogged = 0
    for job_id in report.jobs:
        with stack.session_factory() as session:
            job = session.get(Job, uuid.UUID(job_id))
            items = list(session.scalars(select(Item).where(Item.job_id == job.id).order_by(Item.index)))
        assert job.status == "succeeded", (job.status, [(item.index, item.status, item.error_code) for item in items])
        assert job.succeeded_count == job.item_count == len(items)
        # A PUT resent after a timeout (botocore's own retry, or the write retried in place) may be stored more
        # than once by a frozen server that wakes up: then every stored version must be the same bytes.
        versions: dict[str, set[str]] = {}
        for page in stack.s3.get_paginator("list_object_versions").paginate(Bucket=BUCKET, Prefix=f"jobs/{job_id}/"):
            for version in page.get("Versions", []):
                versions.setdefault(version["Key"], set()).add(version["ETag"])
        sha_by_input: dict[str, set[str]] = {}
        for item in items:
            attempts[item.attempts] += 1
            assert item.status == "succeeded" and item.error_code is None, (item.index, item.error_code)
            assert successes[str(item.id)] <= 1, f"item {item.index}: {successes[str(item.id)]} success transitions"
            unlogged += successes[str(item.id)] == 0
            assert 1 <= item.attempts <= 1 + fault.extra_attempts, (item.index, item.attempts)
            assert len(versions.get(item.output_key, ())) == 1, (item.index, versions.get(item.output_key))
            stored = stack.s3.get_object(Bucket=BUCKET, Key=item.output_key)["Body"].read()
            assert hashlib.sha256(stored).hexdigest() == item.output_sha256
            sha_by_input.setdefault(item.input_key, set()).add(item.output_sha256)
        # The no-op editor's output depends on the input only: one digest per input image.
        assert all(len(digests) == 1 for digests in sha_by_input.values()), sha_by_input
    assert sum(count for value, count in attempts.items() if value > 1) <= fault.extra_attempts, attempts
    # A worker killed between recording a success and logging it leaves the one success unlogged.
    assert unlogged <= fault.extra_attempts, f"{unlogged} succeeded items without a logged success"

    bare_errors = [answer for answer in report.answers if answer.status >= 500 and not answer.enveloped]
    assert not bare_errors, bare_errors[:3]
    submission = report.answers[-1]
    assert submission.status == 202 or (
        submission.status == 503 and fault.refusal_code is not None and fault.refusal_code in submission.body
    ), submission
    # A probe started in the fault's first second may have been answered before the fault took hold.
    readiness = [
        answer.status
        for answer in report.answers[:-1]
        if answer.path == "/readyz" and answer.started >= report.began + 1.0
    ]
    assert readiness and all(status == (503 if fault.unready else 200) for status in readiness), readiness
    return dict(attempts)


def print_report(capsys: pytest.CaptureFixture[str], report: Report, attempts: dict[str, int]) -> None:
    resumed = "n/a" if report.resumed_after is None else f"{report.resumed_after:.1f} s"
    with capsys.disabled():
        print(
            f"\nFAULT {report.fault}: outage {report.outage_seconds:.1f} s; first item succeeded {resumed} after it "
            f"ended; job done {report.done_after:.1f} s after it ended; items by attempts {attempts}; "
            f"answers during it {Counter(answer.status for answer in report.answers)}"
        )


def test_a_postgresql_restart_mid_job(stack: Stack, capsys: pytest.CaptureFixture[str]):
    fault = Fault(
        "postgresql restart",
        begin=lambda s: s.postgres.stop(),
        end=lambda s: s.postgres.start(),
        hold=5.0,
        refusal_code="database_unavailable",
    )
    report = inject(stack, fault)
    print_report(capsys, report, check_exactly_once(stack, report, fault))


def test_a_redis_restart_mid_job(stack: Stack, capsys: pytest.CaptureFixture[str]):
    fault = Fault(
        "redis restart",
        begin=lambda s: s.redis.stop(),
        end=lambda s: s.redis.start(),
        hold=5.0,
        refusal_code="broker_unavailable",
    )
    report = inject(stack, fault)
    print_report(capsys, report, check_exactly_once(stack, report, fault))
    assert report.resumed_after is not None and report.resumed_after <= REDIS_RESUME_LIMIT_SECONDS, report


def test_s3_refusing_connections_for_30_seconds(stack: Stack, capsys: pytest.CaptureFixture[str]):
    fault = Fault(
        "s3 refusing connections",
        begin=lambda s: s.gate.refuse(),
        end=lambda s: s.gate.open(),
        hold=30.0,
        refusal_code="storage_unavailable",
    )
    report = inject(stack, fault)
    print_report(capsys, report, check_exactly_once(stack, report, fault))


def test_s3_frozen_for_15_seconds(stack: Stack, capsys: pytest.CaptureFixture[str]):
    fault = Fault(
        "s3 frozen",
        begin=lambda s: s.gate.freeze(),
        end=lambda s: s.gate.open(),
        hold=15.0,
        refusal_code="storage_unavailable",
    )
    report = inject(stack, fault)
    print_report(capsys, report, check_exactly_once(stack, report, fault))


def test_a_worker_killed_mid_job(stack: Stack, capsys: pytest.CaptureFixture[str]):
    def kill(s: Stack) -> None:
        victim = s.gpu_workers.pop(0)
        victim.kill(signal.SIGKILL)
        # A supervisor starts a new worker; the killed one's item waits for its lease to expire.
        s.gpu_workers.append(s.workers("--queues=gpu"))

    fault = Fault(
        "worker SIGKILL",
        begin=kill,
        end=lambda s: None,
        hold=3.0,
        refusal_code=None,
        unready=False,
        extra_attempts=1,
    )
    report = inject(stack, fault)
    print_report(capsys, report, check_exactly_once(stack, report, fault))
