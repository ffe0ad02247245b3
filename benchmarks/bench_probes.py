"""How long the API takes to answer while its services are frozen: they accept connections and never reply.

Each frozen service is a TCP listener on 127.0.0.1 that accepts and stays silent (what a SIGSTOPped MinIO,
PostgreSQL or Redis looks like from outside: the kernel still completes the connection). The API runs in this
process (``fastapi.testclient``) on a migrated SQLite file, with the settings' defaults unless given, and prints
the seconds of:

1. ``GET /readyz`` with the S3 endpoint frozen (database and broker fine or absent);
2. ``GET /readyz`` with S3, the database (a ``postgresql://`` URL) and the broker all frozen;
3. ``POST /v1/uploads`` with the S3 endpoint frozen (every attempt waits ``XMGIE_STORAGE_READ_TIMEOUT_SECONDS``).

    python benchmarks/bench_probes.py
    python benchmarks/bench_probes.py --probe-timeout 0.5 --read-timeout 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from PIL import Image

from api.main import create_app
from xmgie.jobs.auth import create_api_key
from xmgie.jobs.db import session_scope
from xmgie.jobs.migrate import upgrade_database
from xmgie.jobs.settings import Settings


@contextlib.contextmanager
def frozen_service() -> Iterator[int]:
    """A listener that accepts every connection and never sends a byte; its port."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    listener.settimeout(0.1)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                accepted.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        for connection in accepted:
            connection.close()
        listener.close()


def timed(call: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    response = call()
    return time.perf_counter() - started, response


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--probe-timeout", type=float, help="XMGIE_PROBE_TIMEOUT_SECONDS (default: the settings')")
    parser.add_argument("--read-timeout", type=float, help="XMGIE_STORAGE_READ_TIMEOUT_SECONDS (default: settings')")
    args = parser.parse_args()
    overrides: dict[str, float] = {}
    if args.probe_timeout is not None:
        overrides["probe_timeout_seconds"] = args.probe_timeout
    if args.read_timeout is not None:
        overrides["storage_read_timeout_seconds"] = args.read_timeout

    with (
        tempfile.TemporaryDirectory() as folder,
        frozen_service() as s3,
        frozen_service() as db,
        frozen_service() as br,
    ):
        database_url = f"sqlite:///{Path(folder) / 'bench.db'}"
        upgrade_database(database_url)
        settings = Settings(
            data_dir=Path(folder),
            database_url=database_url,
            storage_url="s3://frozen",
            s3_endpoint_url=f"http://127.0.0.1:{s3}",
            s3_access_key_id="bench",
            s3_secret_access_key="bench",
            **overrides,
        )
        print(
            f"probe timeout {settings.probe_timeout_seconds:g} s, storage connect/read timeouts "
            f"{settings.storage_connect_timeout_seconds:g}/{settings.storage_read_timeout_seconds:g} s"
        )
        rows = []
        with TestClient(create_app(settings)) as client:
            seconds, response = timed(lambda: client.get("/readyz"))
            rows.append(("GET /readyz, S3 frozen", seconds, response.status_code, response.json()["checks"]))
            with session_scope(client.app.state.engine) as session:
                key = create_api_key(session=session, tenant_name="bench")
            image = io.BytesIO()
            Image.new("RGB", (32, 24), (200, 40, 40)).save(image, format="PNG")
            files = {"file": ("in.png", image.getvalue(), "image/png")}
            headers = {"Authorization": f"Bearer {key}"}
            seconds, response = timed(lambda: client.post("/v1/uploads", headers=headers, files=files))
            rows.append(
                ("POST /v1/uploads, S3 frozen", seconds, response.status_code, response.json()["error"]["code"])
            )
        everything = settings.model_copy(
            update={
                "database_url": f"postgresql://postgres@127.0.0.1:{db}/bench",
                "broker_url": f"redis://127.0.0.1:{br}/0",
            }
        )
        with TestClient(create_app(everything)) as client:
            seconds, response = timed(lambda: client.get("/readyz"))
            rows.insert(
                1,
                (
                    "GET /readyz, S3 + database + broker frozen",
                    seconds,
                    response.status_code,
                    response.json()["checks"],
                ),
            )
    for what, seconds, status, detail in rows:
        print(f"{what:<45} {seconds:6.2f} s  {status}  {detail}")


if __name__ == "__main__":
    main()
