"""Request and response models of the HTTP API, in families: ``JobCreate`` in, ``JobPublic``/``JobsPublic`` out."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field

from xmgie.jobs.models import Item, Job
from xmgie.jobs.statuses import ItemStatus, JobStatus


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

    image: str = Field(description="reference of an upload of this tenant")
    instruction: str
    mask: str | None = Field(default=None, description="reference of an upload: white = region to edit")
    identity_image: str | None = Field(default=None, description="reference of an upload: identity reference")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    options: dict[str, Any] = Field(default_factory=dict, description="overrides the job's options for this item")


class JobCreate(BaseModel):
    """A bulk edit submission."""

    model_config = ConfigDict(extra="forbid")

    items: list[ItemCreate] = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict, description="edit options shared by every item")
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    webhook_url: AnyHttpUrl | None = None


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
    """An item as clients see it; ``result_url`` (presigned, temporary) is set once it has succeeded."""

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
