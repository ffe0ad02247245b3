"""Database tables of the job service as SQLAlchemy 2 declarative models.

Only Alembic creates or changes the schema (``migrations/``); these classes describe it for the ORM and for the
autogenerate check in the tests. Statuses are stored as short strings (values of ``ItemStatus``/``JobStatus``)
rather than native enum types, so new values need no type migration on PostgreSQL. A job keeps one count column per
item status, updated in the same transaction as every item transition (``xmgie.jobs.transitions``): polling a job
reads one row, whatever its size.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from xmgie.jobs.statuses import ItemStatus, JobStatus

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
"""Deterministic constraint names, so migrations can refer to them on every database."""


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware (SQLite keeps no offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"timestamps must be timezone-aware, got naive {value!r}")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base of every table, with the project's constraint naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Tenant(Base):
    """A customer account: owns API keys, jobs and schedules."""

    __tablename__ = "tenants"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utc_now)


class ApiKey(Base):
    """A bearer key of a tenant; only its sha256 (hex) is stored, with a short prefix to show in listings."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utc_now)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Job(Base):
    """A bulk edit request: a set of items processed independently, with its status derived from theirs."""

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_fingerprint: Mapped[str | None] = mapped_column(String(64))
    """sha256 (hex) of the submission that created the job, told apart from another body under the same key."""
    webhook_url: Mapped[str | None] = mapped_column(String(2048))
    item_count: Mapped[int] = mapped_column(Integer, default=0)
    queued_count: Mapped[int] = mapped_column(Integer, default=0)
    running_count: Mapped[int] = mapped_column(Integer, default=0)
    succeeded_count: Mapped[int] = mapped_column(Integer, default=0)
    failed_count: Mapped[int] = mapped_column(Integer, default=0)
    canceled_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utc_now)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    webhook_status: Mapped[str | None] = mapped_column(String(16))
    """``pending`` once the job ended with a webhook to call, then ``delivered`` or ``failed``."""
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0)
    webhook_error: Mapped[str | None] = mapped_column(Text)

    items: Mapped[list[Item]] = relationship(back_populates="job", order_by="Item.index", passive_deletes=True)

    @property
    def counts(self) -> dict[ItemStatus, int]:
        """The number of items in each status."""
        return {
            ItemStatus.QUEUED: self.queued_count,
            ItemStatus.RUNNING: self.running_count,
            ItemStatus.SUCCEEDED: self.succeeded_count,
            ItemStatus.FAILED: self.failed_count,
            ItemStatus.CANCELED: self.canceled_count,
        }


class Item(Base):
    """One edit of a job: an input image and an instruction, processed (and retried) on its own."""

    __tablename__ = "items"
    __table_args__ = (
        UniqueConstraint("job_id", "index"),
        Index(None, "job_id", "status"),
        Index(None, "status", "lease_expires_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    input_key: Mapped[str] = mapped_column(String(1024))
    instruction: Mapped[str] = mapped_column(Text)
    mask_key: Mapped[str | None] = mapped_column(String(1024))
    identity_key: Mapped[str | None] = mapped_column(String(1024))
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    seed: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default=ItemStatus.QUEUED.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    output_key: Mapped[str | None] = mapped_column(String(1024))
    output_sha256: Mapped[str | None] = mapped_column(String(64))
    mask_output_key: Mapped[str | None] = mapped_column(String(1024))
    expressive_instruction: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utc_now)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    job: Mapped[Job] = relationship(back_populates="items")


class Schedule(Base):
    """A recurring dataset augmentation: on each slot, edit the source's images not yet augmented under its
    current instructions, and publish the results as a dataset under ``target_prefix``.

    A schedule fires on a cron expression (``cron``, in ``timezone``) or every ``interval_seconds``; exactly one of
    the two is set. ``last_slot`` is the latest slot fired, so a slot fires once and missed slots fire only once.
    The source is a prefix of the tenant's storage space (``source_prefix``) or a fixed list of image references
    (``source_keys``). ``instructions`` is a list of ``{"instruction": str, "options": {...}}``.
    """

    __tablename__ = "schedules"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    cron: Mapped[str | None] = mapped_column(String(100))
    interval_seconds: Mapped[int | None] = mapped_column(Integer)
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    source_prefix: Mapped[str | None] = mapped_column(String(1024))
    source_keys: Mapped[list[str] | None] = mapped_column(JSON)
    instructions: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    variants: Mapped[int] = mapped_column(Integer, default=1)
    target_prefix: Mapped[str] = mapped_column(String(1024))
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    last_slot: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utc_now)


class Run(Base):
    """One firing of a schedule for one slot (unique per schedule and slot, so a slot never fires twice).

    ``fingerprint`` identifies the instructions, variants and options the run used: images already augmented under
    the same fingerprint are not edited again. ``status`` follows the run's job once it has one; a run with nothing
    new to edit ends ``succeeded`` with no job. ``published_at`` is set once the dataset manifest includes the run.
    """

    __tablename__ = "runs"
    __table_args__ = (UniqueConstraint("schedule_id", "slot"), Index(None, "schedule_id", "created_at"))

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    schedule_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("schedules.id", ondelete="CASCADE"))
    slot: Mapped[datetime] = mapped_column(UTCDateTime)
    trigger: Mapped[str] = mapped_column(String(16), default="schedule")
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    image_count: Mapped[int] = mapped_column(Integer, default=0)
    item_count: Mapped[int] = mapped_column(Integer, default=0)
    succeeded_count: Mapped[int] = mapped_column(Integer, default=0)
    failed_count: Mapped[int] = mapped_column(Integer, default=0)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utc_now)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Augmentation(Base):
    """One planned output of a run: a source image edited by one instruction of the schedule, one variant.

    Its item holds the edit; ``file_name`` is where the result goes, relative to the schedule's target prefix.
    """

    __tablename__ = "augmentations"
    __table_args__ = (
        Index(None, "schedule_id", "fingerprint", "source_key"),
        UniqueConstraint("run_id", "source_key", "instruction_index", "variant"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    schedule_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("schedules.id", ondelete="CASCADE"))
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    item_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("items.id", ondelete="SET NULL"))
    fingerprint: Mapped[str] = mapped_column(String(64))
    source_key: Mapped[str] = mapped_column(String(1024))
    instruction_index: Mapped[int] = mapped_column(Integer)
    instruction: Mapped[str] = mapped_column(Text)
    variant: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    file_name: Mapped[str] = mapped_column(String(1024))
