"""Service processes for the tests: a moto S3 server and the HTTP API, each a real process on a free port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
S3_CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing"}


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that accepts every connection and never sends a byte, as a frozen service does
    (its kernel still completes connections); yields its port. Connections are closed when the block ends."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    listener.settimeout(0.1)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(connection)

    thread = threading.Thread(target=accept, name="silent-server", daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        for connection in accepted:
            connection.close()
        listener.close()


def wait_until_answering(url: str, process: subprocess.Popen[bytes], what: str, timeout: float = 30.0) -> None:
    """Poll ``url`` until it answers (any HTTP status); fail the test if ``process`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            pytest.fail(f"{what} exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                pytest.fail(f"{what} did not answer at {url} within {timeout:.0f} s")
            time.sleep(0.1)


def stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process' group, then SIGKILL it if it has not exited within 10 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None and sig == signal.SIGTERM:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)


@contextlib.contextmanager
def moto_server() -> Iterator[int]:
    """A moto S3 server as its own process on 127.0.0.1; yields its port."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until_answering(f"http://127.0.0.1:{port}/moto-api/", process, "moto server", timeout=20)
        yield port
    finally:
        stop_process_group(process)


def s3_settings(port: int, bucket: str) -> dict[str, str]:
    """The ``XMGIE_*`` settings that point a service process at ``bucket`` on the moto server at ``port``."""
    return {
        "XMGIE_STORAGE_URL": f"s3://{bucket}",
        "XMGIE_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "XMGIE_S3_ACCESS_KEY_ID": S3_CREDENTIALS["access_key_id"],
        "XMGIE_S3_SECRET_ACCESS_KEY": S3_CREDENTIALS["secret_access_key"],
        "XMGIE_S3_REGION": "us-east-1",
    }


def service_env(**settings: str) -> dict[str, str]:
    """This process' environment without any ``XMGIE_*`` variable, plus ``settings`` and the repository on the path."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("XMGIE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["HF_HUB_OFFLINE"] = "1"
    env.update(settings)
    return env


@contextlib.contextmanager
def api_server(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """``xmgie api`` as its own process with ``env``; yields its base URL (``http://127.0.0.1:<port>``)."""
    port = free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "xmgie.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(f"{base_url}/healthz", process, "the API", timeout=60)
        yield base_url
    finally:
        stop_process_group(process)


@dataclass
class Receiver:
    """A local webhook receiver: records every POST (lower-cased headers, body) and answers ``status``."""

    status: int = 204
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""


@contextlib.contextmanager
def webhook_receiver() -> Iterator[Receiver]:
    """An HTTP server on a free port in a thread of this process; yields its ``Receiver``."""
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.requests.append(({key.lower(): value for key, value in self.headers.items()}, body))
            self.send_response(state.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
