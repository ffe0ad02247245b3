"""Storage backends: a local folder and an S3 endpoint (moto's server as a separate process), same behaviour."""

from __future__ import annotations

import hashlib
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.services import S3_CREDENTIALS, free_port, moto_server, silent_server
from xmgie.jobs.storage import (
    InvalidKeyError,
    LocalStorage,
    ObjectNotFoundError,
    S3Storage,
    Storage,
    StorageUnavailableError,
    manifest_key,
    mask_key,
    output_key,
    storage_from_url,
    upload_key,
    validate_prefix,
)

CREDENTIALS = S3_CREDENTIALS


@pytest.fixture(scope="module")
def moto_port() -> Iterator[int]:
    """Port of a moto S3 server running as its own process on 127.0.0.1 for this module."""
    with moto_server() as port:
        yield port


def _s3(port: int, **kwargs) -> S3Storage:
    return S3Storage(
        f"test-{uuid.uuid4().hex[:12]}",
        endpoint_url=f"http://127.0.0.1:{port}",
        create_bucket=True,
        **CREDENTIALS,
        **kwargs,
    )


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """Each backend in turn: a folder under tmp_path, or a fresh bucket on the moto server."""
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    return _s3(request.getfixturevalue("moto_port"))


def test_both_backends_satisfy_the_interface(storage: Storage) -> None:
    assert isinstance(storage, Storage)
    storage.check()


def test_put_get_round_trip_returns_sha256(storage: Storage) -> None:
    data = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 10
    key = output_key("job-1", 0)

    digest = storage.put_bytes(key, data, "image/png")

    assert digest == hashlib.sha256(data).hexdigest()
    assert storage.get_bytes(key) == data
    assert storage.exists(key)


def test_put_file_round_trip(storage: Storage, tmp_path: Path) -> None:
    source = tmp_path / "input.jsonl"
    source.write_bytes(b'{"image": "a.png"}\n' * 100)

    digest = storage.put_file(manifest_key("job-2"), source, "application/jsonl")

    assert digest == hashlib.sha256(source.read_bytes()).hexdigest()
    assert storage.get_bytes("jobs/job-2/manifest.jsonl") == source.read_bytes()


def test_overwrite_keeps_one_object_with_the_new_bytes(storage: Storage) -> None:
    key = output_key("job-3", 1)
    storage.put_bytes(key, b"first attempt", "image/png")
    storage.put_bytes(key, b"redo", "image/png")

    assert storage.list_keys("jobs/job-3/") == [key]
    assert storage.get_bytes(key) == b"redo"


def test_list_keys_filters_by_prefix_and_sorts(storage: Storage) -> None:
    for key in [output_key("b", 1), output_key("a", 0), mask_key("a", 0), upload_key("t", "u", ".png")]:
        storage.put_bytes(key, b"x", "image/png")

    assert storage.list_keys("jobs/a/") == ["jobs/a/0.mask.png", "jobs/a/0.png"]
    assert storage.list_keys("jobs/") == ["jobs/a/0.mask.png", "jobs/a/0.png", "jobs/b/1.png"]
    assert storage.list_keys("jobs/a/0.m") == ["jobs/a/0.mask.png"]
    assert storage.list_keys("nothing/") == []
    assert len(storage.list_keys()) == 4


def test_missing_key_raises_object_not_found(storage: Storage) -> None:
    with pytest.raises(ObjectNotFoundError) as excinfo:
        storage.get_bytes("jobs/none/0.png")
    assert excinfo.value.key == "jobs/none/0.png"
    assert not storage.exists("jobs/none/0.png")


def test_delete_removes_and_tolerates_missing(storage: Storage) -> None:
    storage.put_bytes("jobs/j/0.png", b"x", "image/png")
    storage.delete("jobs/j/0.png")
    storage.delete("jobs/j/0.png")

    assert not storage.exists("jobs/j/0.png")
    assert storage.list_keys("jobs/") == []


@pytest.mark.parametrize("key", ["../escape", "jobs/../../etc/passwd", "/abs/path", "a\\b", "", "a//b", "a/./b", "a/"])
def test_bad_keys_are_refused(storage: Storage, key: str) -> None:
    with pytest.raises(InvalidKeyError):
        storage.put_bytes(key, b"x", "image/png")
    with pytest.raises(InvalidKeyError):
        storage.get_bytes(key)


@pytest.mark.parametrize(
    "key", ["%2e%2e/escape", "jobs/%2E%2E/%2e%2e/etc/passwd", "a/%2e/b", ".%2e/x", "%252e%252e/x", "..%2fx", "%2fabs"]
)
def test_percent_encoded_dot_segments_are_refused_like_plain_ones(tmp_path: Path, key: str) -> None:
    store = LocalStorage(tmp_path / "store")
    with pytest.raises(InvalidKeyError):
        store.put_bytes(key, b"x", "image/png")
    with pytest.raises(InvalidKeyError):
        validate_prefix(key.rsplit("/", 1)[0] + "/")
    assert not any(path.is_file() for path in tmp_path.rglob("*"))


def test_percent_signs_that_decode_to_a_safe_path_are_kept_as_written(storage: Storage) -> None:
    for key in ("photos/100%.png", "photos/a%20b.png", "photos/%2e%2ehidden.png"):
        storage.put_bytes(key, key.encode(), "image/png")
    assert storage.list_keys("photos/") == ["photos/%2e%2ehidden.png", "photos/100%.png", "photos/a%20b.png"]
    assert storage.get_bytes("photos/a%20b.png") == b"photos/a%20b.png"


def test_key_helpers_layout() -> None:
    assert output_key("abc", 3) == "jobs/abc/3.png"
    assert mask_key("abc", 3) == "jobs/abc/3.mask.png"
    assert manifest_key("abc") == "jobs/abc/manifest.jsonl"
    assert upload_key("tenant", "u1", ".jpg") == "uploads/tenant/u1.jpg"
    with pytest.raises(InvalidKeyError):
        output_key("../x", 0)
    with pytest.raises(InvalidKeyError):
        upload_key("t/../..", "u", ".png")


def test_local_writes_leave_no_partial_files_and_stay_inside_root(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = LocalStorage(root)
    store.put_bytes("jobs/j/0.png", b"one", "image/png")
    store.put_bytes("jobs/j/0.png", b"two", "image/png")
    with pytest.raises(InvalidKeyError):
        store.put_bytes("../outside.png", b"x", "image/png")

    assert [p.name for p in (root / "jobs" / "j").iterdir()] == ["0.png"]
    assert not (tmp_path / "outside.png").exists()
    # A writer that died mid-write leaves a hidden partial file; readers never list it.
    (root / "jobs" / "j" / ".1.png.abc123.partial").write_bytes(b"half")
    assert store.list_keys("jobs/") == ["jobs/j/0.png"]


def test_local_url_is_a_file_url_to_the_bytes(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put_bytes("jobs/j/0.png", b"pixels", "image/png")

    url = store.url("jobs/j/0.png")

    assert url.startswith("file://")
    with urllib.request.urlopen(url) as response:
        assert response.read() == b"pixels"


def test_local_check_fails_when_root_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageUnavailableError):
        LocalStorage(tmp_path / "file").check()


def test_s3_stores_sha256_and_content_type_on_the_object(moto_port: int) -> None:
    store = _s3(moto_port)
    digest = store.put_bytes("jobs/j/0.png", b"pixels", "image/png")

    head = store._client.head_object(Bucket=store.bucket, Key="jobs/j/0.png")

    assert head["Metadata"]["sha256"] == digest == store.sha256("jobs/j/0.png")
    assert head["ContentType"] == "image/png"


def test_s3_presigned_url_is_signed_for_the_public_endpoint_and_downloads(moto_port: int) -> None:
    store = _s3(moto_port, public_endpoint_url=f"http://localhost:{moto_port}")
    store.put_bytes("jobs/j/0.png", b"result pixels", "image/png")

    url = store.url("jobs/j/0.png", expires_in=600)

    parts = urlsplit(url)
    assert parts.hostname == "localhost"
    assert parts.port == moto_port
    assert "X-Amz-Signature=" in parts.query and "X-Amz-Expires=600" in parts.query
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"result pixels"


def test_s3_presigned_url_without_public_endpoint_uses_the_internal_one(moto_port: int) -> None:
    store = _s3(moto_port)
    store.put_bytes("a.bin", b"abc")

    url = store.url("a.bin")

    assert urlsplit(url).hostname == "127.0.0.1"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"abc"


def test_s3_check_raises_when_nothing_listens() -> None:
    store = S3Storage("bucket", endpoint_url=f"http://127.0.0.1:{free_port()}", **CREDENTIALS)
    with pytest.raises(StorageUnavailableError):
        store.check()


def test_s3_requests_give_up_within_their_timeouts_when_the_endpoint_never_answers() -> None:
    with silent_server() as port:
        store = S3Storage(
            "bucket",
            endpoint_url=f"http://127.0.0.1:{port}",
            max_attempts=1,
            read_timeout=0.5,
            probe_timeout=0.5,
            **CREDENTIALS,
        )
        started = time.monotonic()
        with pytest.raises(StorageUnavailableError):
            store.check()
        with pytest.raises(StorageUnavailableError):
            store.put_bytes("jobs/j/0.png", b"x", "image/png")
        with pytest.raises(StorageUnavailableError):
            store.get_bytes("jobs/j/0.png")
    # Far below the 60 s read timeout each request waited for before.
    assert time.monotonic() - started < 10


def test_s3_check_raises_for_a_missing_bucket(moto_port: int) -> None:
    store = S3Storage("never-created", endpoint_url=f"http://127.0.0.1:{moto_port}", **CREDENTIALS)
    with pytest.raises(StorageUnavailableError):
        store.check()


def test_s3_prefix_keeps_keys_relative(moto_port: int) -> None:
    bucket = _s3(moto_port)
    store = storage_from_url(
        f"s3://{bucket.bucket}/datasets/nightly", endpoint_url=f"http://127.0.0.1:{moto_port}", **CREDENTIALS
    )
    store.put_bytes("jobs/j/0.png", b"x", "image/png")

    assert store.list_keys("jobs/") == ["jobs/j/0.png"]
    assert bucket.list_keys() == ["datasets/nightly/jobs/j/0.png"]
    assert store.get_bytes("jobs/j/0.png") == b"x"


def test_storage_from_url_picks_the_backend(tmp_path: Path) -> None:
    from_file_url = storage_from_url(tmp_path.as_uri())
    from_path = storage_from_url(str(tmp_path / "plain"))
    from_s3 = storage_from_url("s3://my-bucket/some/prefix/", endpoint_url="http://127.0.0.1:1", **CREDENTIALS)
    from_bare_s3 = storage_from_url("s3://my-bucket", endpoint_url="http://127.0.0.1:1", **CREDENTIALS)

    assert isinstance(from_file_url, LocalStorage) and from_file_url.root == tmp_path
    assert isinstance(from_path, LocalStorage) and from_path.root == tmp_path / "plain"
    assert isinstance(from_s3, S3Storage)
    assert (from_s3.bucket, from_s3.prefix) == ("my-bucket", "some/prefix/")
    assert (from_bare_s3.bucket, from_bare_s3.prefix) == ("my-bucket", "")
    with pytest.raises(ValueError):
        storage_from_url("gs://bucket")
    with pytest.raises(ValueError):
        storage_from_url("s3://")


def test_copy_duplicates_the_bytes_and_refuses_a_missing_source(storage: Storage) -> None:
    sha = storage.put_bytes("jobs/a/0.png", b"edited", "image/png")
    assert storage.copy("jobs/a/0.png", "data/t/set/images/x.png") == sha
    assert storage.get_bytes("data/t/set/images/x.png") == b"edited"
    storage.put_bytes("jobs/a/0.png", b"changed")
    assert storage.get_bytes("data/t/set/images/x.png") == b"edited"
    with pytest.raises(ObjectNotFoundError):
        storage.copy("jobs/a/missing.png", "data/t/set/images/y.png")
    assert not storage.exists("data/t/set/images/y.png")
