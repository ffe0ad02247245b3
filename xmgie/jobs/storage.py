"""Object storage for job inputs and results: one interface, a local folder and any S3-compatible endpoint.

Both backends use the same key layout (see the ``*_key`` helpers), so the embedded defaults and the real stack
differ only in settings. Keys are ``/``-separated relative paths; they are validated the same way for both
backends so a key that works locally works against S3 and the other way round.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

DEFAULT_CONTENT_TYPE = "application/octet-stream"
"""Content type stored when the caller does not name one."""

DEFAULT_URL_EXPIRY = 3600
"""Lifetime in seconds of a presigned GET URL."""

SHA256_METADATA_KEY = "sha256"
"""S3 user-metadata field (``x-amz-meta-sha256``) holding the hex SHA-256 of an object's bytes."""

_CHUNK_SIZE = 1024 * 1024
_PARTIAL_SUFFIX = ".partial"

if TYPE_CHECKING:
    from xmgie.jobs.settings import Settings


class StorageError(Exception):
    """Base class of every storage failure."""


class StorageUnavailableError(StorageError):
    """The storage cannot be reached (endpoint down, bucket missing, folder not writable)."""


class InvalidKeyError(StorageError, ValueError):
    """A key is not a safe relative ``/``-separated path."""


class ObjectNotFoundError(StorageError):
    """No object is stored under the key."""

    def __init__(self, key: str) -> None:
        super().__init__(f"no object stored under key {key!r}")
        self.key = key


# --- Key layout ---------------------------------------------------------------------------------------------------


def output_key(job_id: object, index: int) -> str:
    """Key of the edited image for item ``index`` of job ``job_id``: ``jobs/<job>/<index>.png``."""
    return f"jobs/{_segment(job_id, 'job_id')}/{_index(index)}.png"


def mask_key(job_id: object, index: int) -> str:
    """Key of the mask used for item ``index`` of job ``job_id``: ``jobs/<job>/<index>.mask.png``."""
    return f"jobs/{_segment(job_id, 'job_id')}/{_index(index)}.mask.png"


def manifest_key(job_id: object) -> str:
    """Key of the results manifest of job ``job_id``: ``jobs/<job>/manifest.jsonl``."""
    return f"jobs/{_segment(job_id, 'job_id')}/manifest.jsonl"


def upload_key(tenant_id: object, upload_id: object, suffix: str) -> str:
    """Key of an uploaded input image: ``uploads/<tenant>/<id><suffix>`` (``suffix`` such as ``.png``)."""
    if suffix and (not suffix.startswith(".") or "/" in suffix or "\\" in suffix):
        raise InvalidKeyError(f"upload suffix must look like '.png', got {suffix!r}")
    return f"uploads/{_segment(tenant_id, 'tenant_id')}/{_segment(upload_id, 'upload_id')}{suffix}"


def data_prefix(tenant_id: object) -> str:
    """The tenant's data space, ``data/<tenant>/``: images a tenant keeps (uploaded with a path, or written there
    by the operator's own tools) and the datasets its schedules publish."""
    return f"data/{_segment(tenant_id, 'tenant_id')}/"


def data_key(tenant_id: object, path: str) -> str:
    """Key of ``path`` (relative, ``/``-separated) in the tenant's data space; ``InvalidKeyError`` if unsafe."""
    return data_prefix(tenant_id) + validate_key(path)


def _segment(value: object, name: str) -> str:
    text = str(value)
    if not text or text in {".", ".."} or "/" in text or "\\" in text or "\x00" in text:
        raise InvalidKeyError(f"{name} must be a single path segment, got {text!r}")
    return text


def _index(index: int) -> int:
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise InvalidKeyError(f"item index must be a non-negative int, got {index!r}")
    return index


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise :class:`InvalidKeyError`.

    Refused: empty keys, absolute paths, backslashes, NUL bytes, empty, ``.`` or ``..`` segments, and names the
    local backend reserves for its partial writes — as written and once percent-escapes are decoded, so
    ``%2e%2e/x`` is refused like ``../x`` (a proxy, a browser or an S3 tool may decode it on the way).
    """
    if not isinstance(key, str) or not key:
        raise InvalidKeyError(f"key must be a non-empty string, got {key!r}")
    for text in _as_written_and_decoded(key):
        _check_path_text(text, key)
        if text.endswith("/"):
            raise InvalidKeyError(f"key must name an object, not a folder: {key!r}")
        for part in text.split("/"):
            if part in {"", ".", ".."}:
                raise InvalidKeyError(f"key has an empty, '.' or '..' segment (percent-encoded or not): {key!r}")
            if _is_partial_name(part):
                raise InvalidKeyError(f"key segment {part!r} is reserved for partial writes: {key!r}")
    return key


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is a safe listing prefix (``""``, ``"jobs/"``, ``"jobs/abc"``), else raise.

    Checked like :func:`validate_key`, as written and percent-decoded.
    """
    if not isinstance(prefix, str):
        raise InvalidKeyError(f"prefix must be a string, got {prefix!r}")
    if not prefix:
        return prefix
    for text in _as_written_and_decoded(prefix):
        _check_path_text(text, prefix)
        parts = text.split("/")
        if parts[-1] == "":
            parts = parts[:-1]
        if any(part in {"", ".", ".."} for part in parts):
            raise InvalidKeyError(f"prefix has an empty, '.' or '..' segment (percent-encoded or not): {prefix!r}")
    return prefix


def _as_written_and_decoded(text: str) -> list[str]:
    """``text``, and the text its percent-escapes decode to (repeatedly, so ``%252e`` counts as ``.``) if it
    differs."""
    decoded = text
    while (once := unquote(decoded)) != decoded:
        decoded = once
    return [text] if decoded == text else [text, decoded]


def _check_path_text(text: str, key: str) -> None:
    if text.startswith("/") or "\\" in text or "\x00" in text:
        raise InvalidKeyError(f"key must be a relative '/'-separated path without backslashes: {key!r}")
    if len(text) >= 2 and text[1] == ":" and text[0].isalpha():
        raise InvalidKeyError(f"key looks like a drive path: {key!r}")


def _is_partial_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(_PARTIAL_SUFFIX)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for chunk in iter(lambda: source.read(_CHUNK_SIZE), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- Interface ----------------------------------------------------------------------------------------------------


@runtime_checkable
class Storage(Protocol):
    """What the API and the workers need from object storage."""

    def put_bytes(self, key: str, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE) -> str:
        """Store ``data`` under ``key`` (replacing any object there) and return its hex SHA-256."""
        ...

    def put_file(self, key: str, path: str | os.PathLike[str], content_type: str = DEFAULT_CONTENT_TYPE) -> str:
        """Store the file at ``path`` under ``key`` (replacing any object there) and return its hex SHA-256."""
        ...

    def get_bytes(self, key: str) -> bytes:
        """Return the bytes stored under ``key``; raise :class:`ObjectNotFoundError` if there are none."""
        ...

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""
        ...

    def copy(self, source_key: str, target_key: str) -> str:
        """Store a copy of the object under ``source_key`` at ``target_key`` (replacing any object there); its hex
        SHA-256. Raises :class:`ObjectNotFoundError` if the source is missing."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object under ``key``; removing a missing object is not an error."""
        ...

    def list_keys(self, prefix: str = "") -> list[str]:
        """All keys starting with ``prefix``, sorted."""
        ...

    def url(self, key: str, expires_in: int = DEFAULT_URL_EXPIRY) -> str:
        """A URL a client can GET the object from (presigned for S3, ``file://`` for a local folder)."""
        ...

    def check(self) -> None:
        """Raise :class:`StorageUnavailableError` unless the storage is reachable and usable."""
        ...


# --- Local folder -------------------------------------------------------------------------------------------------


class LocalStorage:
    """Objects as files under ``root``: the embedded default, with the same key layout as S3.

    Writes go to a hidden temporary file in the target folder and are moved into place with ``os.replace``, so a
    reader sees either the old object or the whole new one, and a redone write overwrites cleanly.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()

    def __repr__(self) -> str:
        return f"LocalStorage(root={str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def put_bytes(self, key: str, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE) -> str:
        """Store ``data`` under ``key`` atomically and return its hex SHA-256 (``content_type`` is not kept)."""
        target = self._path(key)
        with _atomic_write(target) as sink:
            sink.write(data)
        return hashlib.sha256(data).hexdigest()

    def put_file(self, key: str, path: str | os.PathLike[str], content_type: str = DEFAULT_CONTENT_TYPE) -> str:
        """Copy the file at ``path`` under ``key`` atomically and return its hex SHA-256."""
        target = self._path(key)
        digest = hashlib.sha256()
        with open(path, "rb") as source, _atomic_write(target) as sink:
            for chunk in iter(lambda: source.read(_CHUNK_SIZE), b""):
                digest.update(chunk)
                sink.write(chunk)
        return digest.hexdigest()

    def copy(self, source_key: str, target_key: str) -> str:
        """Copy the file of ``source_key`` to ``target_key`` (atomically, as every write)."""
        source = self._path(source_key)
        if not source.is_file():
            raise ObjectNotFoundError(source_key)
        return self.put_file(target_key, source)

    def get_bytes(self, key: str) -> bytes:
        """Return the bytes stored under ``key``."""
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFoundError(key) from None
        except OSError as exc:
            raise StorageError(f"cannot read {key!r} from {self.root}: {exc}") from exc

    def exists(self, key: str) -> bool:
        """Whether a file is stored under ``key``."""
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        """Remove the file under ``key`` if there is one."""
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            self._path(key).unlink()

    def list_keys(self, prefix: str = "") -> list[str]:
        """All keys starting with ``prefix``, sorted; partial writes are never listed."""
        validate_prefix(prefix)
        # Walk only the deepest folder the prefix fully names; the rest is a plain string filter.
        folder_part = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root.joinpath(*folder_part.split("/")) if folder_part else self.root
        if not start.is_dir():
            return []
        keys = []
        for dirpath, _dirnames, filenames in os.walk(start):
            for name in filenames:
                if _is_partial_name(name):
                    continue
                key = (Path(dirpath) / name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def url(self, key: str, expires_in: int = DEFAULT_URL_EXPIRY) -> str:
        """A ``file://`` URL of the object's file (``expires_in`` has no meaning locally)."""
        return self._path(key).as_uri()

    def check(self) -> None:
        """Create the root folder if needed and make sure it is a writable folder."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageUnavailableError(f"cannot create storage folder {self.root}: {exc}") from exc
        if not self.root.is_dir() or not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageUnavailableError(f"storage folder {self.root} is not a writable folder")


@contextlib.contextmanager
def _atomic_write(target: Path) -> Iterator[IO[bytes]]:
    """Yield a hidden temporary file next to ``target`` that replaces ``target`` only if the block succeeds."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=_PARTIAL_SUFFIX, dir=target.parent)
    except OSError as exc:
        raise StorageError(f"cannot write {target}: {exc}") from exc
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as sink:
            yield sink
            sink.flush()
            os.fsync(sink.fileno())
        # mkstemp creates 0600 files; published objects are readable like any other written file.
        os.chmod(temp, 0o644)
        os.replace(temp, target)
    except OSError as exc:
        raise StorageError(f"cannot write {target}: {exc}") from exc
    finally:
        temp.unlink(missing_ok=True)


# --- S3-compatible endpoint ---------------------------------------------------------------------------------------


class S3Storage:
    """Objects in an S3 bucket (AWS, MinIO, moto), optionally under a key prefix.

    ``endpoint_url`` is where this process reaches the service (e.g. ``http://minio:9000`` inside docker-compose);
    ``public_endpoint_url`` is where clients fetch presigned URLs from (e.g. ``http://localhost:9000``). Presigned
    URLs are signed by a second client configured with the public endpoint, because the signature covers the host.
    Each attempt of a request (``max_attempts`` in all) waits at most ``connect_timeout`` to connect and
    ``read_timeout`` for an answer, so a frozen endpoint fails a request instead of holding it; ``check`` makes a
    single attempt bounded by ``probe_timeout``.
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        create_bucket: bool = False,
        prefix: str = "",
        max_attempts: int = 3,
        connect_timeout: float = 3.0,
        read_timeout: float = 5.0,
        probe_timeout: float = 1.0,
    ) -> None:
        import boto3
        from botocore.config import Config

        if not bucket:
            raise ValueError("bucket must be a non-empty name")
        validate_prefix(prefix)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.public_endpoint_url = public_endpoint_url
        self.region = region

        session = boto3.session.Session(
            aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key, region_name=region
        )

        def make_client(endpoint: str | None, attempts: int, connect: float, read: float) -> Any:
            config = Config(
                s3={"addressing_style": "path"},
                signature_version="s3v4",
                # botocore's "max_attempts" counts retries after the first try; "total_max_attempts" counts all.
                retries={"total_max_attempts": attempts, "mode": "standard"},
                connect_timeout=connect,
                read_timeout=read,
            )
            return session.client("s3", endpoint_url=endpoint, region_name=region, config=config)

        self._client = make_client(endpoint_url, max_attempts, connect_timeout, read_timeout)
        self._presign_client = (
            make_client(public_endpoint_url, max_attempts, connect_timeout, read_timeout)
            if public_endpoint_url
            else self._client
        )
        # Readiness probes answer quickly, also from an endpoint that accepts connections and never replies: one
        # attempt, and the probe's timeout for connecting and for the answer.
        self._probe_client = make_client(endpoint_url, 1, probe_timeout, probe_timeout)
        if create_bucket:
            self.ensure_bucket()

    def __repr__(self) -> str:
        return f"S3Storage(bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint_url={self.endpoint_url!r})"

    def _key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist yet."""
        from botocore.exceptions import ClientError

        with self._errors():
            try:
                self._client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if _error_code(exc) not in {"404", "NoSuchBucket", "NotFound"}:
                    raise
            kwargs: dict[str, Any] = {"Bucket": self.bucket}
            if self.region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
            try:
                self._client.create_bucket(**kwargs)
            except ClientError as exc:
                if _error_code(exc) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    raise

    def put_bytes(self, key: str, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE) -> str:
        """Store ``data`` under ``key``; the hex SHA-256 is returned and kept as ``x-amz-meta-sha256``."""
        object_key = self._key(key)
        sha256 = hashlib.sha256(data).hexdigest()
        with self._errors():
            self._client.put_object(
                Bucket=self.bucket,
                Key=object_key,
                Body=data,
                ContentType=content_type,
                Metadata={SHA256_METADATA_KEY: sha256},
            )
        return sha256

    def put_file(self, key: str, path: str | os.PathLike[str], content_type: str = DEFAULT_CONTENT_TYPE) -> str:
        """Upload the file at ``path`` (multipart when large); the hex SHA-256 is returned and kept as metadata."""
        object_key = self._key(key)
        sha256 = _sha256_file(Path(path))
        with self._errors():
            self._client.upload_file(
                str(path),
                self.bucket,
                object_key,
                ExtraArgs={"ContentType": content_type, "Metadata": {SHA256_METADATA_KEY: sha256}},
            )
        return sha256

    def copy(self, source_key: str, target_key: str) -> str:
        """Server-side copy (no bytes through this process); the SHA-256 metadata travels with the object."""
        source, target = self._key(source_key), self._key(target_key)
        with self._errors(source_key):
            self._client.copy_object(Bucket=self.bucket, Key=target, CopySource={"Bucket": self.bucket, "Key": source})
        sha256 = self.sha256(target_key)
        if sha256 is None:
            sha256 = hashlib.sha256(self.get_bytes(target_key)).hexdigest()
        return sha256

    def get_bytes(self, key: str) -> bytes:
        """Return the bytes stored under ``key``."""
        object_key = self._key(key)
        with self._errors(key):
            response = self._client.get_object(Bucket=self.bucket, Key=object_key)
            return response["Body"].read()

    def sha256(self, key: str) -> str | None:
        """The hex SHA-256 recorded when the object was stored, or ``None`` if it was stored without one."""
        object_key = self._key(key)
        with self._errors(key):
            response = self._client.head_object(Bucket=self.bucket, Key=object_key)
        return response.get("Metadata", {}).get(SHA256_METADATA_KEY)

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""
        try:
            self.sha256(key)
        except ObjectNotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        """Remove the object under ``key`` (S3 treats a missing object as already deleted)."""
        object_key = self._key(key)
        with self._errors():
            self._client.delete_object(Bucket=self.bucket, Key=object_key)

    def list_keys(self, prefix: str = "") -> list[str]:
        """All keys starting with ``prefix`` (relative to this storage's own prefix), sorted."""
        full_prefix = self.prefix + validate_prefix(prefix)
        keys = []
        with self._errors():
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full_prefix):
                keys.extend(item["Key"][len(self.prefix) :] for item in page.get("Contents", []))
        return sorted(keys)

    def url(self, key: str, expires_in: int = DEFAULT_URL_EXPIRY) -> str:
        """A presigned GET URL, signed for the public endpoint when one is configured."""
        object_key = self._key(key)
        with self._errors():
            return self._presign_client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": object_key}, ExpiresIn=int(expires_in)
            )

    def check(self) -> None:
        """Make sure the endpoint answers and the bucket exists and is accessible."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._probe_client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            raise StorageUnavailableError(
                f"bucket {self.bucket!r} at {self.endpoint_url or 'AWS'} is not usable: {_error_code(exc)}"
            ) from exc
        except BotoCoreError as exc:
            raise StorageUnavailableError(f"S3 endpoint {self.endpoint_url or 'AWS'} unreachable: {exc}") from exc

    @contextlib.contextmanager
    def _errors(self, key: str | None = None) -> Iterator[None]:
        """Turn botocore failures into this module's named errors; ``key`` makes a 404 an ObjectNotFoundError."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        where = f"s3://{self.bucket}/{self.prefix}"
        try:
            yield
        except ClientError as exc:
            code = _error_code(exc)
            if key is not None and code in {"404", "NoSuchKey", "NotFound"}:
                raise ObjectNotFoundError(key) from None
            if code == "NoSuchBucket":
                raise StorageUnavailableError(f"bucket {self.bucket!r} does not exist") from exc
            raise StorageError(f"S3 request to {where} failed: {exc}") from exc
        except (
            EndpointConnectionError,
            ConnectTimeoutError,
            ReadTimeoutError,
            ConnectionClosedError,
            NoCredentialsError,
        ) as exc:
            raise StorageUnavailableError(f"S3 endpoint for {where} unreachable: {exc}") from exc
        except (BotoCoreError, S3UploadFailedError) as exc:
            raise StorageError(f"S3 request to {where} failed: {exc}") from exc


def _error_code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


# --- Construction from settings -----------------------------------------------------------------------------------


def storage_from_url(url: str, **s3_kwargs: Any) -> Storage:
    """Build the storage a URL names.

    - ``file:///abs/path`` or a plain path → :class:`LocalStorage` (``s3_kwargs`` are ignored);
    - ``s3://bucket`` or ``s3://bucket/prefix`` → :class:`S3Storage`, keys stored under ``prefix/``, with
      ``s3_kwargs`` (``endpoint_url``, ``public_endpoint_url``, credentials, ``create_bucket`` …) passed on.
    """
    if not url:
        raise ValueError("storage URL must not be empty")
    if "://" not in url:
        return LocalStorage(Path(url))
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in {"", "localhost"}:
            raise ValueError(f"file storage URL must name a local absolute path (file:///...), got {url!r}")
        return LocalStorage(Path(url2pathname(parts.path)))
    if scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"S3 storage URL must name a bucket (s3://bucket[/prefix]), got {url!r}")
        prefix = unquote(parts.path).strip("/")
        return S3Storage(parts.netloc, prefix=prefix, **s3_kwargs)
    raise ValueError(f"unsupported storage URL scheme {parts.scheme!r} in {url!r}; use file://, s3:// or a path")


__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "DEFAULT_URL_EXPIRY",
    "InvalidKeyError",
    "LocalStorage",
    "ObjectNotFoundError",
    "S3Storage",
    "Storage",
    "StorageError",
    "StorageUnavailableError",
    "manifest_key",
    "mask_key",
    "output_key",
    "storage_from_url",
    "upload_key",
    "validate_key",
    "validate_prefix",
]


def storage_from_settings(settings: Settings, *, create_bucket: bool = False) -> Storage:
    """The storage ``settings`` name: a local folder, or an S3 bucket (created when ``create_bucket``)."""
    return storage_from_url(
        settings.storage_url,
        endpoint_url=settings.s3_endpoint_url,
        public_endpoint_url=settings.s3_public_endpoint_url,
        region=settings.s3_region or "us-east-1",
        access_key_id=settings.s3_access_key_id,
        secret_access_key=settings.s3_secret_access_key,
        create_bucket=create_bucket,
        connect_timeout=settings.storage_connect_timeout_seconds,
        read_timeout=settings.storage_read_timeout_seconds,
        probe_timeout=settings.probe_timeout_seconds,
    )
