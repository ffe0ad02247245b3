"""Request and response models of the HTTP API, in families: ``JobCreate`` in, ``JobPublic``/``JobsPublic`` out."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AnyHttpUrl, BaseModel, ConfigDict, Field, UrlConstraints

from xmgie.jobs.models import Item, Job
from xmgie.jobs.schedules import MAX_VARIANTS, MIN_INTERVAL_SECONDS
from xmgie.jobs.statuses import ItemStatus, JobStatus

INT32_MAX = 2**31 - 1
"""Largest value of an ``Integer`` column (32 bits on PostgreSQL): the bound of every integer stored in one."""

KEY_MAX_CHARS = 1024
"""Length of the ``String(1024)`` columns that hold references, object keys and prefixes."""


def _storable_text(value: str) -> str:
    """``value`` if PostgreSQL and UTF-8 can hold it: no NUL character, no lone surrogate."""
    if "\x00" in value:
        raise ValueError("must not contain the NUL character (U+0000)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it contains a lone surrogate)") from None
    return value


StorableText = Annotated[str, AfterValidator(_storable_text)]
"""A string every backend can store: refused with 422 when it holds a NUL character or a lone surrogate (a
PostgreSQL text column holds neither, and UTF-8 cannot encode a surrogate)."""

Reference = Annotated[str, Field(max_length=KEY_MAX_CHARS), AfterValidator(_storable_text)]
"""A reference to an upload, or a key or prefix of the tenant's space."""


def _drop_null_defaults(schema: dict[str, Any]) -> None:
    """Leave ``default: null`` out of properties that may not be null (they may only be left out)."""
    for prop in schema.get("properties", {}).values():
        if prop.get("default", ...) is None and "anyOf" not in prop:
            del prop["default"]


class ErrorDetail(BaseModel):
    """A machine-readable ``code`` and a sentence for people; ``item`` names the offending item of a submission."""

    code: str
    message: str
    item: int | None = None


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


class UploadPublic(BaseModel):
    """A stored upload; pass ``reference`` as an item's ``image``, ``mask`` or ``identity_image``."""

    reference: str
    upload_id: uuid.UUID
    width: int
    height: int
    format: str
    content_type: str
    size_bytes: int
    sha256: str


class ItemCreate(BaseModel):
    """One edit of a submission: an uploaded image and an instruction, with optional mask, identity and options."""

    model_config = ConfigDict(extra="forbid")

    image: Reference = Field(description="reference of an upload of this tenant")
    instruction: StorableText
    mask: Reference | None = Field(default=None, description="reference of an upload: white = region to edit")
    identity_image: Reference | None = Field(default=None, description="reference of an upload: identity reference")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    options: dict[str, Any] = Field(default_factory=dict, description="overrides the job's options for this item")


class JobCreate(BaseModel):
    """A bulk edit submission."""

    model_config = ConfigDict(extra="forbid")

    items: list[ItemCreate] = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict, description="edit options shared by every item")
    idempotency_key: StorableText | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="resubmitting the same body with the same key returns the first job (200); another body with "
        "the same key is refused (409 idempotency_key_reused)",
    )
    webhook_url: Annotated[AnyHttpUrl, UrlConstraints(max_length=2048)] | None = None


class JobCounts(BaseModel):
    """How many items are in each status."""

    queued: int
    running: int
    succeeded: int
    failed: int
    canceled: int


class WebhookPublic(BaseModel):
    """Delivery of the job's webhook once it has ended: ``pending``, ``delivered`` or ``failed``."""

    status: str
    attempts: int
    error: str | None


class JobPublic(BaseModel):
    """A job as clients see it."""

    id: uuid.UUID
    status: JobStatus
    item_count: int
    counts: JobCounts
    progress: float = Field(description="fraction of items finished (succeeded, failed or canceled)")
    options: dict[str, Any]
    idempotency_key: str | None
    webhook_url: str | None
    webhook: WebhookPublic | None = Field(description="set once a job with a webhook_url has ended")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested_at: datetime | None

    @classmethod
    def from_job(cls, job: Job) -> JobPublic:
        """The public view of a job row."""
        finished = job.succeeded_count + job.failed_count + job.canceled_count
        return cls(
            id=job.id,
            status=JobStatus(job.status),
            item_count=job.item_count,
            counts=JobCounts(**{status.value: number for status, number in job.counts.items()}),
            progress=finished / job.item_count if job.item_count else 1.0,
            options=job.options or {},
            idempotency_key=job.idempotency_key,
            webhook_url=job.webhook_url,
            webhook=WebhookPublic(status=job.webhook_status, attempts=job.webhook_attempts, error=job.webhook_error)
            if job.webhook_status
            else None,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            cancel_requested_at=job.cancel_requested_at,
        )


class ItemError(BaseModel):
    """Why an item failed."""

    code: str
    message: str | None


class ItemPublic(BaseModel):
    """An item as clients see it; ``result_url`` (presigned, temporary) is set once it has succeeded.

    ``edit_scope`` (``local`` or ``global``) and ``mask_fraction`` repeat the result's metrics of the same names.
    """

    id: uuid.UUID
    index: int
    status: ItemStatus
    image: str
    instruction: str
    mask: str | None
    identity_image: str | None
    seed: int | None
    options: dict[str, Any]
    attempts: int
    error: ItemError | None
    expressive_instruction: str | None
    metrics: dict[str, Any] | None
    edit_scope: str | None
    mask_fraction: float | None
    output_sha256: str | None
    result_url: str | None
    mask_url: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_item(cls, item: Item, *, result_url: str | None, mask_url: str | None) -> ItemPublic:
        """The public view of an item row with its (already signed) URLs."""
        return cls(
            id=item.id,
            index=item.index,
            status=ItemStatus(item.status),
            image=item.input_key,
            instruction=item.instruction,
            mask=item.mask_key,
            identity_image=item.identity_key,
            seed=item.seed,
            options=item.options or {},
            attempts=item.attempts,
            error=ItemError(code=item.error_code, message=item.error_message) if item.error_code else None,
            expressive_instruction=item.expressive_instruction,
            metrics=item.metrics,
            edit_scope=(item.metrics or {}).get("edit_scope"),
            mask_fraction=(item.metrics or {}).get("mask_fraction"),
            output_sha256=item.output_sha256,
            result_url=result_url,
            mask_url=mask_url,
            created_at=item.created_at,
            started_at=item.started_at,
            finished_at=item.finished_at,
        )


class ItemsPublic(BaseModel):
    """One page of a job's items, by index; pass ``next_cursor`` as ``cursor`` for the next page (null: last)."""

    data: list[ItemPublic]
    count: int = Field(description="number of the job's items matching the status filter, over all pages")
    next_cursor: int | None


class ManifestPublic(BaseModel):
    """A job's results manifest: the stored one once written (``source: storage``), else built from the database."""

    job_id: uuid.UUID
    status: JobStatus
    source: Literal["storage", "database"]
    records: list[dict[str, Any]]


class HealthPublic(BaseModel):
    """Liveness: the process answers."""

    status: Literal["ok"]


class ReadinessPublic(BaseModel):
    """Readiness of each part the API depends on: ``ok``, ``skipped`` or the error."""

    status: Literal["ok", "unavailable"]
    checks: dict[str, str]


# --- Schedules (dataset augmentation) ------------------------------------------------------------------------------


class ScheduleInstruction(BaseModel):
    """One instruction of a schedule with the edit options it sets on top of the schedule's ``options``."""

    model_config = ConfigDict(extra="forbid")

    instruction: StorableText
    options: dict[str, Any] = Field(default_factory=dict)


class ScheduleSourceIn(BaseModel):
    """Where a schedule's images come from: give exactly one of ``prefix`` and ``images``."""

    model_config = ConfigDict(extra="forbid")

    prefix: Reference | None = Field(
        default=None, description="a prefix of the tenant's space, e.g. data/<tenant>/photos/ (every image under it)"
    )
    images: list[Reference] | None = Field(default=None, description="a fixed list of image references of the tenant")


# The schemas bound these by their columns only; the rules of xmgie.jobs.schedules refuse the rest with their own
# codes (invalid_interval, invalid_variants).
_INTERVAL = f"seconds between slots, at least {MIN_INTERVAL_SECONDS}"
_VARIANTS = f"outputs per image and instruction, each with its own seed: 1 to {MAX_VARIANTS}"


class ScheduleCreate(BaseModel):
    """A recurring dataset augmentation: give exactly one of ``cron`` (five fields, in ``timezone``) and
    ``interval_seconds``."""

    model_config = ConfigDict(extra="forbid")

    name: StorableText = Field(min_length=1, max_length=200, description="unique among the tenant's schedules")
    cron: StorableText | None = Field(default=None, max_length=100, examples=["0 3 * * *"])
    interval_seconds: int | None = Field(default=None, le=INT32_MAX, description=_INTERVAL)
    timezone: StorableText = Field(
        default="UTC", max_length=64, description="IANA zone the cron expression is read in"
    )
    source: ScheduleSourceIn
    instructions: list[StorableText | ScheduleInstruction] = Field(
        description="instruction texts, or objects with per-instruction options"
    )
    variants: int = Field(default=1, description=_VARIANTS)
    target_prefix: Reference = Field(description="folder of the tenant's data space the dataset is published under")
    options: dict[str, Any] = Field(default_factory=dict, description="edit options shared by every instruction")
    enabled: bool = True


class ScheduleUpdate(BaseModel):
    """Any subset of a schedule's fields; the result is checked as a whole (set ``cron`` to null to switch to
    ``interval_seconds``, and the other way round). Only ``cron`` and ``interval_seconds`` may be null; the other
    fields may be left out, not nulled."""

    # The defaults only mark a field as left out (``model_dump(exclude_unset=True)`` drops it); they are not valid
    # values, so the schema does not show them.
    model_config = ConfigDict(extra="forbid", json_schema_extra=_drop_null_defaults)

    name: StorableText = Field(default=None, min_length=1, max_length=200)
    cron: StorableText | None = Field(default=None, max_length=100)
    interval_seconds: int | None = Field(default=None, le=INT32_MAX, description=_INTERVAL)
    timezone: StorableText = Field(default=None, max_length=64)
    source: ScheduleSourceIn = None
    instructions: list[StorableText | ScheduleInstruction] = None
    variants: int = Field(default=None, description=_VARIANTS)
    target_prefix: Reference = None
    options: dict[str, Any] = None
    enabled: bool = None


class SourcePrefix(BaseModel):
    """Every image under a prefix of the tenant's space."""

    prefix: str


class SourceImages(BaseModel):
    """A fixed list of image references."""

    images: list[str]


class SchedulePublic(BaseModel):
    """A schedule as clients see it; ``dataset`` is the key of the published dataset's ``metadata.jsonl``."""

    id: uuid.UUID
    name: str
    cron: str | None
    interval_seconds: int | None
    timezone: str
    source: SourcePrefix | SourceImages
    instructions: list[ScheduleInstruction]
    variants: int
    target_prefix: str
    options: dict[str, Any]
    enabled: bool
    last_slot: datetime | None = Field(description="the latest slot fired by the schedule itself")
    next_slot: datetime | None = Field(description="when it fires next; null while paused")
    dataset: str
    created_at: datetime
    updated_at: datetime


class SchedulesPublic(BaseModel):
    """The tenant's schedules, by name."""

    data: list[SchedulePublic]
    count: int


class RunCounts(BaseModel):
    """Outputs of a run in each status (live from its job while it runs)."""

    queued: int
    running: int
    succeeded: int
    failed: int
    canceled: int


class RunError(BaseModel):
    """Why a run ended without a job (``no_source_images``, ``source_unavailable``...)."""

    code: str
    message: str | None


class RunPublic(BaseModel):
    """One firing of a schedule; ``status`` follows its job and is final once ``published_at`` is set."""

    id: uuid.UUID
    schedule_id: uuid.UUID
    slot: datetime
    trigger: str = Field(description="schedule (a slot of its timing) or manual (POST .../run)")
    status: JobStatus
    job_id: uuid.UUID | None
    fingerprint: str | None
    image_count: int = Field(description="images in the source when the run started")
    item_count: int = Field(description="outputs the run planned (new images × instructions × variants)")
    counts: RunCounts
    error: RunError | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    published_at: datetime | None


class RunsPublic(BaseModel):
    """A page of a schedule's runs, newest first; pass ``next_cursor`` as ``cursor`` for the next (null: last)."""

    data: list[RunPublic]
    count: int = Field(description="number of the schedule's runs, over all pages")
    next_cursor: uuid.UUID | None
