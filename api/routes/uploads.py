"""Uploading input images (images, masks, identity references) before submitting a job."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile, status

from api.deps import CurrentTenant, SettingsDep, StorageDep
from api.schemas import ErrorResponse, Reference, UploadPublic
from xmgie.jobs.uploads import UploadTooLargeError, store_upload

router = APIRouter(
    tags=["uploads"],
    responses={401: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
)


@router.post("/uploads", status_code=status.HTTP_201_CREATED, response_model=UploadPublic)
def create_upload(
    file: Annotated[UploadFile, File(description="an image file (PNG, JPEG, WebP, ...)")],
    tenant: CurrentTenant,
    storage: StorageDep,
    settings: SettingsDep,
    path: Annotated[
        Reference | None,
        Form(description="store at this relative path of the tenant's data space (data/<tenant>/<path>)"),
    ] = None,
) -> UploadPublic:
    """Store an image after checking its size, format and pixel count; returns the reference to use in jobs and
    schedules. With ``path`` it goes to the tenant's data space (e.g. a schedule's source prefix)."""
    data = file.file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise UploadTooLargeError(len(data), settings.max_upload_bytes)
    stored = store_upload(
        storage=storage,
        tenant_id=tenant.id,
        data=data,
        max_bytes=settings.max_upload_bytes,
        max_pixels=settings.max_image_pixels,
        path=path,
    )
    return UploadPublic(**asdict(stored))
