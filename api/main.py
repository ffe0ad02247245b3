"""The FastAPI application: ``create_app()`` wires settings, database, storage and the work publisher.

Run it with ``xmgie api`` (uvicorn, ``api.main:create_app`` as a factory). The schema is not migrated on start:
run ``xmgie migrate`` first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.body_limit import MULTIPART_OVERHEAD_BYTES, BodyLimit, BodySizeLimit
from api.deps import Dispatch
from api.errors import register_error_handlers
from api.routes import health, jobs, schedules, uploads
from api.schemas import ErrorResponse
from xmgie.jobs.db import make_engine, make_session_factory
from xmgie.jobs.dispatch import CeleryPublisher, NullPublisher, Publisher
from xmgie.jobs.settings import Settings, get_settings
from xmgie.jobs.storage import storage_from_settings


def create_app(
    settings: Settings | None = None, dispatch: Dispatch | None = None, publisher: Publisher | None = None
) -> FastAPI:
    """The API application for ``settings`` (default: from the environment).

    ``dispatch(item_ids)`` publishes work for a newly created job's items; it is called after the job's transaction
    has committed, and a failure to publish is logged without failing the submission (the database stays the
    source of truth; a reconciler re-publishes queued items). ``publisher`` sends the other tasks (webhooks,
    schedule runs). Default for both: Celery messages to the workers when ``settings.broker_url`` is set, else
    nothing.
    """
    settings = settings or get_settings()
    if publisher is None:
        if settings.broker_url:
            publisher = CeleryPublisher(settings.broker_url, settings.micro_batch_size, settings.lease_seconds)
        else:
            publisher = NullPublisher()
    engine = make_engine(settings.database_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()

    app = FastAPI(
        title="xMGIE",
        summary="MLLM-guided image editing as batch jobs",
        version="0.1.0",
        lifespan=lifespan,
        responses={
            400: {"model": ErrorResponse, "description": "the body is not JSON (or not UTF-8)"},
            413: {"model": ErrorResponse, "description": "the body is over the size limit"},
            500: {"model": ErrorResponse, "description": "an unexpected error (logged)"},
            503: {"model": ErrorResponse, "description": "the database or the storage is not reachable"},
        },
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.storage = storage_from_settings(settings)
    app.state.publisher = publisher
    app.state.dispatch = dispatch or publisher.edits
    register_error_handlers(app)
    upload_limit = BodyLimit(
        settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES,
        "upload_too_large",
        f"an upload has at most {settings.max_upload_bytes} bytes",
    )
    app.add_middleware(
        BodySizeLimit, limit=BodyLimit(settings.max_request_bytes), by_path={"/v1/uploads": upload_limit}
    )
    app.include_router(health.router)
    app.include_router(uploads.router, prefix="/v1")
    app.include_router(jobs.router, prefix="/v1")
    app.include_router(schedules.router, prefix="/v1")
    return app
