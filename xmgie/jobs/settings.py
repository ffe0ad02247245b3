"""Service configuration: one ``Settings`` read from ``XMGIE_*`` environment variables, with embedded defaults.

With no configuration everything runs on one machine without servers: a SQLite file and a storage folder under
``data_dir``, tasks executed in-process (no broker) and the ``tiny`` model. Library code (``xmgie.editing``) never
reads settings; the API, the workers and the command line pass explicit values down.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATA_DIR = Path("~/.local/share/xmgie")
"""Where the embedded defaults keep the database file and the storage folder (the XDG data location)."""

_DATABASE_SCHEMES = ("sqlite", "postgresql", "postgres")
_STORAGE_SCHEMES = ("file", "s3")


def _default_database_url(data: dict[str, Any]) -> str:
    return f"sqlite:///{data['data_dir']}/xmgie.db"


def _default_storage_url(data: dict[str, Any]) -> str:
    return f"file://{data['data_dir']}/storage"


class Settings(BaseSettings):
    """Every knob of the job service; each field is read from ``XMGIE_<FIELD>`` (e.g. ``XMGIE_DATABASE_URL``)."""

    model_config = SettingsConfigDict(env_prefix="XMGIE_", extra="ignore")

    # Where things live. data_dir comes first: the defaults below are derived from it.
    data_dir: Path = DEFAULT_DATA_DIR
    database_url: str = Field(default_factory=_default_database_url)
    broker_url: str | None = None
    storage_url: str = Field(default_factory=_default_storage_url)
    s3_endpoint_url: str | None = None
    s3_public_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    storage_connect_timeout_seconds: float = Field(default=3.0, gt=0)
    """How long opening a connection to the S3 endpoint may take before the request fails (and is retried)."""
    storage_read_timeout_seconds: float = Field(default=5.0, gt=0)
    """How long the S3 endpoint may stay silent on an open connection before the request fails (and is retried)."""
    probe_timeout_seconds: float = Field(default=1.0, gt=0)
    """How long ``/readyz`` waits for the database, the storage and the broker (checked side by side) before it
    reports the silent ones as failed."""

    # The model.
    model: str = "mini"
    """A model directory, or a preset: ``mini`` (trained on this project's synthetic edits, shipped in the package)
    or ``tiny`` (random weights, for tests)."""
    model_cache_dir: Path | None = None
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    offload: Literal["none", "model", "mllm"] = "none"
    """Where the weights wait between stages on an accelerator: ``none`` (all on the device), ``model`` (every
    component on the CPU until its stage, diffusers' model CPU offload) or ``mllm`` (the MLLM on the CPU but for
    the instruction stage, the diffusion components on the device). A no-op on the CPU."""

    # Limits.
    max_items_per_job: int = Field(default=10_000, gt=0)
    max_image_pixels: int = Field(default=4096 * 4096, gt=0)
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    max_request_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    """Largest JSON request body the API reads (uploads are capped by ``max_upload_bytes``); larger ones get 413."""
    max_instruction_chars: int = Field(default=1000, gt=0)
    max_attempts: int = Field(default=3, gt=0)
    lease_seconds: int = Field(default=600, gt=0)
    micro_batch_size: int = Field(default=1, gt=0)

    # Outages: how long a worker rides through them before giving an item back.
    database_retry_seconds: float = Field(default=60.0, ge=0)
    """How long a worker keeps retrying a claim or a result write, on fresh connections, while the database is
    unreachable (then the task's message is retried later)."""
    storage_retry_seconds: float = Field(default=300.0, ge=0)
    """How long a worker keeps retrying the write of an edited image in place, with backoff, before the attempt
    fails."""
    storage_retry_max_delay_seconds: float = Field(default=120.0, gt=0)
    """Longest pause between two tries of a storage operation (pauses start at 1 s and double, jittered)."""
    storage_deferrals: int = Field(default=20, ge=0)
    """How often an item whose inputs cannot be read from the storage goes back to the queue without spending an
    attempt (each time after a longer pause: about 20 minutes in all by default) before such failures count."""

    # Periodic work (``xmgie beat``) and webhooks.
    reconcile_seconds: float = Field(default=10.0, gt=0)
    schedule_tick_seconds: float = Field(default=30.0, gt=0)
    webhook_secret: str | None = None
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    webhook_max_attempts: int = Field(default=5, gt=0)
    webhook_allow_private_networks: bool = False
    """Whether webhooks may go to loopback, private or link-local addresses (off: a tenant cannot make the
    workers call the cluster's internal services)."""

    @field_validator("data_dir", "model_cache_dir")
    @classmethod
    def _expand_home(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        scheme = urlsplit(value).scheme.split("+", 1)[0]
        if scheme not in _DATABASE_SCHEMES:
            raise ValueError(f"database_url must be a sqlite:// or postgresql:// URL, got {value!r}")
        return value

    @field_validator("storage_url")
    @classmethod
    def _check_storage_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in _STORAGE_SCHEMES:
            raise ValueError(f"storage_url must be a file:// folder or an s3://bucket URL, got {value!r}")
        if parts.scheme == "s3" and not parts.netloc:
            raise ValueError(f"storage_url must name a bucket (s3://bucket), got {value!r}")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        kind = value.split(":", 1)[0]
        if kind not in ("cpu", "cuda", "mps"):
            raise ValueError(f"device must be cpu, cuda, cuda:N or mps, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if (self.s3_access_key_id is None) != (self.s3_secret_access_key is None):
            raise ValueError("s3_access_key_id and s3_secret_access_key must be given together")
        if self.micro_batch_size > self.max_items_per_job:
            raise ValueError(
                f"micro_batch_size ({self.micro_batch_size}) must not exceed max_items_per_job "
                f"({self.max_items_per_job})"
            )
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once (``get_settings.cache_clear()`` re-reads)."""
    return Settings()
