"""Submitting, polling, listing, canceling jobs and fetching their manifests; only the tenant's own jobs exist."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Query, Response, status
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.deps import CurrentTenant, DispatchDep, PublisherDep, SessionDep, SettingsDep, StorageDep
from api.schemas import INT32_MAX, ErrorResponse, ItemPublic, ItemsPublic, JobCreate, JobPublic, ManifestPublic
from api.submissions import item_specs, request_fingerprint
from xmgie.jobs.dispatch import DELIVER_WEBHOOK_TASK
from xmgie.jobs.exceptions import NoSuchJobError
from xmgie.jobs.models import Item, Job
from xmgie.jobs.statuses import ItemStatus, JobStatus, WebhookStatus
from xmgie.jobs.storage import Storage, manifest_key
from xmgie.jobs.transitions import cancel_job, create_job

logger = logging.getLogger(__name__)

router = APIRouter(
    prefix="/jobs",
    tags=["jobs"],
    responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
)

DEFAULT_PAGE_SIZE = 100
"""Items per page when the client names no ``limit``."""

MAX_PAGE_SIZE = 1000
"""Largest ``limit`` a client may ask for."""


def _tenant_job(session: Session, tenant_id: UUID, job_id: UUID) -> Job:
    """The tenant's job; another tenant's job is reported as missing, never as forbidden."""
    job = session.execute(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id)).scalar_one_or_none()
    if job is None:
        raise NoSuchJobError(f"no job {job_id}")
    return job


def _item_view(item: Item, storage: Storage) -> ItemPublic:
    succeeded = item.status == ItemStatus.SUCCEEDED.value
    result_url = storage.url(item.output_key) if succeeded and item.output_key else None
    mask_url = storage.url(item.mask_output_key) if succeeded and item.mask_output_key else None
    return ItemPublic.from_item(item, result_url=result_url, mask_url=mask_url)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    responses={
        200: {"model": JobPublic, "description": "the job already submitted with this idempotency key and body"},
        409: {"model": ErrorResponse, "description": "the idempotency key was used with another body"},
    },
)
def submit_job(
    job_in: JobCreate,
    response: Response,
    session: SessionDep,
    tenant: CurrentTenant,
    storage: StorageDep,
    settings: SettingsDep,
    dispatch: DispatchDep,
    publisher: PublisherDep,
) -> JobPublic:
    """Accept a bulk edit job (202); the same ``idempotency_key`` and body return the existing job (200) unchanged,
    the same key with another body is a 409; 503 ``broker_unavailable`` (nothing created) while the work queue cannot
    be reached."""
    specs = item_specs(job_in=job_in, tenant_id=tenant.id, storage=storage, settings=settings)
    publisher.check()
    job, created = create_job(
        session=session,
        tenant_id=tenant.id,
        items=specs,
        options=job_in.options,
        idempotency_key=job_in.idempotency_key,
        request_fingerprint=request_fingerprint(job_in),
        webhook_url=str(job_in.webhook_url) if job_in.webhook_url else None,
    )
    session.commit()
    if not created:
        response.status_code = status.HTTP_200_OK
        return JobPublic.from_job(job)
    item_ids = list(session.scalars(select(Item.id).where(Item.job_id == job.id).order_by(Item.index)))
    try:
        dispatch(item_ids)
    except Exception:
        # The rows are committed: the reconciler publishes queued items whose message never went out.
        logger.exception("publishing the items of job %s failed; they stay queued", job.id)
    return JobPublic.from_job(job)


@router.get("/{job_id}", response_model=JobPublic)
def read_job(job_id: UUID, session: SessionDep, tenant: CurrentTenant) -> JobPublic:
    """A job's status, counts per item status, progress and timestamps."""
    return JobPublic.from_job(_tenant_job(session, tenant.id, job_id))


@router.get("/{job_id}/items", response_model=ItemsPublic)
def list_items(
    job_id: UUID,
    session: SessionDep,
    tenant: CurrentTenant,
    storage: StorageDep,
    status: ItemStatus | None = None,
    cursor: Annotated[
        int | None, Query(ge=0, le=INT32_MAX, description="the next_cursor of the previous page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
) -> ItemsPublic:
    """A page of the job's items in index order, optionally only those in one status."""
    job = _tenant_job(session, tenant.id, job_id)
    matching = select(Item).where(Item.job_id == job.id)
    if status is not None:
        matching = matching.where(Item.status == status.value)
    count = session.scalar(select(func.count()).select_from(matching.subquery())) or 0
    if cursor is not None:
        matching = matching.where(Item.index > cursor)
    rows = list(session.scalars(matching.order_by(Item.index).limit(limit + 1)))
    page = rows[:limit]
    next_cursor = page[-1].index if len(rows) > limit else None
    return ItemsPublic(data=[_item_view(item, storage) for item in page], count=count, next_cursor=next_cursor)


@router.post("/{job_id}/cancel", response_model=JobPublic, responses={409: {"model": ErrorResponse}})
def cancel(job_id: UUID, session: SessionDep, tenant: CurrentTenant, publisher: PublisherDep) -> JobPublic:
    """Cancel a job: queued items end canceled now, running ones when their worker notices; 409 once finished."""
    job = cancel_job(session=session, job_id=job_id, tenant_id=tenant.id)
    session.commit()
    if job.webhook_status == WebhookStatus.PENDING.value:
        try:
            publisher.send(DELIVER_WEBHOOK_TASK, [str(job.id)])
        except Exception:
            logger.exception("publishing the webhook of job %s failed; the reconciler sends it later", job.id)
    return JobPublic.from_job(job)


def _database_record(item: Item) -> dict[str, Any]:
    return {
        "index": item.index,
        "image": item.input_key,
        "instruction": item.instruction,
        "mask": item.mask_key,
        "seed": item.seed,
        "status": item.status,
        "output": item.output_key,
        "sha256": item.output_sha256,
        "mask_output": item.mask_output_key,
        "expressive_instruction": item.expressive_instruction,
        "metrics": item.metrics,
        "error": {"code": item.error_code, "message": item.error_message} if item.error_code else None,
    }


@router.get("/{job_id}/manifest", response_model=ManifestPublic)
def read_manifest(job_id: UUID, session: SessionDep, tenant: CurrentTenant, storage: StorageDep) -> ManifestPublic:
    """The job's results manifest: the stored JSONL once written, else one record per item from the database."""
    job = _tenant_job(session, tenant.id, job_id)
    key = manifest_key(job.id)
    if storage.exists(key):
        lines = storage.get_bytes(key).decode("utf-8").splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        return ManifestPublic(job_id=job.id, status=JobStatus(job.status), source="storage", records=records)
    items = session.scalars(select(Item).where(Item.job_id == job.id).order_by(Item.index))
    records = [_database_record(item) for item in items]
    return ManifestPublic(job_id=job.id, status=JobStatus(job.status), source="database", records=records)
