"""Service processes for the tests, each a real process on a free port: a moto S3 server, the HTTP API, Celery
workers, and for the fault tests a PostgreSQL cluster and a Redis server of their own, and a TCP gate in front of a
server that can refuse or freeze connections on command."""

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


@dataclass
class WorkerProcess:
    """One ``xmgie worker`` process (leader of its own process group) and its log file."""

    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the worker's whole process group (the worker and its pool children)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def stop(self) -> None:
        """Warm shutdown, then SIGKILL of the group if it does not exit within 10 s."""
        if self.process.poll() is None:
            self.kill(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
        self.kill(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


@dataclass
class WorkerStarter:
    """Starts worker processes for one test and stops them all at its end."""

    tmp_path: Path
    base_env: dict[str, str]
    started: list[WorkerProcess] = field(default_factory=list)

    def __call__(self, *args: str, command: str = "worker", **env: str) -> WorkerProcess:
        """Start ``xmgie <command> --loglevel=INFO *args`` (``worker`` or ``beat``) with the base environment and
        ``env``."""
        log_path = self.tmp_path / f"{command}-{len(self.started)}.log"
        environment = {**self.base_env, **env}
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "xmgie.cli", command, "--loglevel=INFO", *args],
                cwd=REPO_ROOT,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = WorkerProcess(process, log_path)
        self.started.append(worker)
        return worker

    def stop_all(self) -> None:
        for worker in self.started:
            worker.stop()


POSTGRES_BIN_GLOB = "/usr/lib/postgresql/*/bin"
"""Where Debian's PostgreSQL packages keep ``initdb`` and ``pg_ctl``."""


def _as_postgres_user(command: list[str]) -> list[str]:
    """``command`` run as the ``postgres`` OS user when this process is root (PostgreSQL refuses to run as root)."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@dataclass
class PostgresCluster:
    """A PostgreSQL cluster of the test's own (``initdb`` in a temporary folder, on a free port, trust auth), which
    the test may stop, start and restart; never the shared server."""

    bin_dir: Path
    data_dir: Path
    port: int

    @property
    def url(self) -> str:
        """The URL of the ``postgres`` database of this cluster."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str) -> None:
        log = self.data_dir.parent / "postgres.log"
        command = [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(log), "-w", "-t", "60", *args]
        subprocess.run(_as_postgres_user(command), check=True, capture_output=True, timeout=90)

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._pg_ctl("start")

    def stop(self) -> None:
        """Fast shutdown: open connections are terminated, as in a server restart."""
        self._pg_ctl("stop", "-m", "fast")


@contextlib.contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A fresh PostgreSQL cluster in a temporary folder of its own (skips the test when no PostgreSQL binaries are
    installed); the folder is removed afterwards."""
    import shutil
    import tempfile

    found = sorted(Path("/").glob(POSTGRES_BIN_GLOB.lstrip("/")))
    if not found or (os.geteuid() == 0 and not _user_exists("postgres")):
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) or postgres user on this machine")
    bin_dir = found[-1]
    # Directly under /tmp, not under pytest's folder: the server runs as postgres, and pytest makes its own
    # folder private again whenever another session starts.
    tmp_dir = Path(tempfile.mkdtemp(prefix="xmgie-postgres-"))
    if os.geteuid() == 0:
        shutil.chown(tmp_dir, "postgres", "postgres")
    data_dir = tmp_dir / "pgdata"
    try:
        subprocess.run(
            _as_postgres_user([str(bin_dir / "initdb"), "-D", str(data_dir), "-A", "trust", "-U", "postgres"]),
            check=True,
            capture_output=True,
            timeout=120,
        )
        cluster = PostgresCluster(bin_dir, data_dir, free_port())
        with (data_dir / "postgresql.conf").open("a") as conf:
            conf.write(
                f"port = {cluster.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{tmp_dir}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n"
            )
        cluster.start()
        try:
            yield cluster
        finally:
            with contextlib.suppress(subprocess.SubprocessError):
                cluster._pg_ctl("stop", "-m", "immediate")
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@dataclass
class RedisServer:
    """A ``redis-server`` of the test's own on a fixed port, without persistence (a restart loses every message, as
    a broker without AOF does), which the test may stop and start again on the same port."""

    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        import redis

        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    pytest.fail(f"redis-server did not start on port {self.port}")
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        """Kill the server (its data is gone with it)."""
        if self.process is not None:
            stop_process_group(self.process)
            self.process = None


@contextlib.contextmanager
def redis_server(tmp_dir: Path) -> Iterator[RedisServer]:
    """A Redis server of the test's own on a free port (skips the test when ``redis-server`` is not installed)."""
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(free_port(), tmp_dir / "redis.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


class TcpGate:
    """A TCP forwarder on a port of its own in front of ``target_port``, in threads of this process: ``open`` (the
    default) relays bytes both ways, ``refuse()`` closes every connection and stops listening (connections are
    refused, as by a stopped server), ``freeze()`` keeps accepting but relays nothing (as a hung server)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._lock = threading.Lock()
        self._frozen = threading.Event()
        self._connections: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.open()

    def open(self) -> None:
        """Accept and relay connections (again)."""
        self._frozen.clear()
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(128)
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name="tcp-gate", daemon=True).start()

    def refuse(self) -> None:
        """Stop listening and cut every open connection."""
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._connections = self._connections, []
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()

    def freeze(self) -> None:
        """Keep accepting connections but pass no byte either way until ``open()``."""
        self._frozen.set()

    def close(self) -> None:
        self.refuse()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                while self._frozen.is_set():
                    time.sleep(0.05)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
