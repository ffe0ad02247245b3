"""Request bodies over the limit get 413 with the envelope, before they are read: in the app, and from a real
``xmgie api`` process fed over a raw socket (a declared 50 MB body, and a chunked one that never ends)."""

from __future__ import annotations

import io
import json
import select
import socket
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.body_limit import MULTIPART_OVERHEAD_BYTES
from api.main import create_app
from tests.api.conftest import MAX_UPLOAD_BYTES
from tests.services import api_server, service_env
from xmgie.jobs.migrate import upgrade_database
from xmgie.jobs.settings import Settings

LIMIT = 16 * 1024
FIFTY_MB = 50 * 1024 * 1024


def _body_of_size(size: int) -> bytes:
    """A JSON submission of about ``size`` bytes (one long instruction)."""
    return json.dumps({"items": [{"image": "uploads/x.png", "instruction": "x" * size}]}).encode()


@pytest.fixture
def limited(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"max_request_bytes": LIMIT}))) as client:
        yield client


def test_json_bodies_over_the_limit_are_refused(limited: TestClient, auth: dict[str, str]) -> None:
    under = limited.post("/v1/jobs", headers={**auth, "Content-Type": "application/json"}, content=_body_of_size(1000))
    assert under.status_code == 422 and under.json()["error"]["code"] == "instruction_too_long"
    over = limited.post("/v1/jobs", headers={**auth, "Content-Type": "application/json"}, content=_body_of_size(LIMIT))
    assert over.status_code == 413
    assert over.json()["error"]["code"] == "request_too_large" and str(LIMIT) in over.json()["error"]["message"]


def _noise_png(width: int, height: int) -> bytes:
    """A PNG that does not compress: about 3 bytes a pixel."""
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_uploads_have_their_own_limit(limited: TestClient, auth: dict[str, str]) -> None:
    image = _noise_png(120, 100)
    assert LIMIT < len(image) < MAX_UPLOAD_BYTES, "an image over the JSON limit, within the upload limit"
    response = limited.post("/v1/uploads", headers=auth, files={"file": ("in.png", image, "image/png")})
    assert response.status_code == 201, response.text
    too_big = b"\0" * (MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD_BYTES)
    refused = limited.post("/v1/uploads", headers=auth, files={"file": ("in.png", too_big, "image/png")})
    assert refused.status_code == 413 and refused.json()["error"]["code"] == "upload_too_large"


@pytest.fixture(scope="module")
def api_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real API process with a small JSON limit on a SQLite file."""
    folder = tmp_path_factory.mktemp("body-limit")
    database_url = f"sqlite:///{folder / 'xmgie.db'}"
    upgrade_database(database_url)
    env = service_env(
        XMGIE_DATA_DIR=str(folder),
        XMGIE_DATABASE_URL=database_url,
        XMGIE_STORAGE_URL=f"file://{folder / 'storage'}",
        XMGIE_MAX_REQUEST_BYTES=str(LIMIT),
    )
    with api_server(env, folder / "api.log") as url:
        yield url


def _connect(api_url: str) -> socket.socket:
    host, port = api_url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _read_response(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    data = b""
    while b"\r\n\r\n" not in data or not data.endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_declared_50_mb_body_is_refused_before_it_is_sent(api_url: str) -> None:
    with _connect(api_url) as sock:
        sock.sendall(
            b"POST /v1/jobs HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {FIFTY_MB}\r\n\r\n".encode()
        )
        # Not one byte of the body is sent: the answer comes from the headers alone.
        status, body = _read_response(sock)
    assert status == 413 and body["error"]["code"] == "request_too_large"


def test_a_chunked_body_is_cut_off_once_it_goes_over(api_url: str) -> None:
    chunk = b"x" * 16384
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0
    with _connect(api_url) as sock:
        sock.sendall(
            b"POST /v1/jobs HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        while sent < FIFTY_MB:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(framed)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        status, body = _read_response(sock)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    # The server answered long before the client could send 50 MB (what it took in is the limit plus the socket
    # buffers in between).
    assert sent < FIFTY_MB
