"""The FastAPI application: ``create_app()`` wires settings, database, storage and the work publisher.

Run it with ``xmgie api`` (uvicorn, ``api.main:create_app`` as a factory). The schema is not migrated on start:
run ``xmgie migrate`` first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from uuid import UUID

from fastapi import FastAPI

from api.deps import Dispatch
from api.errors import register_error_handlers
from api.routes import health, jobs, uploads
from xmgie.jobs.db import make_engine, make_session_factory
from xmgie.jobs.settings import Settings, get_settings
from xmgie.jobs.storage import storage_from_settings


def _publish_nothing(item_ids: list[UUID]) -> None:
    """Default publisher: items stay queued for whoever reconciles the database."""


def create_app(settings: Settings | None = None, dispatch: Dispatch | None = None) -> FastAPI:
    """The API application for ``settings`` (default: from the environment).

    ``dispatch(item_ids)`` publishes work for a newly created job's items; it is called after the job's transaction
    has committed, and a failure to publish is logged without failing the submission (the database stays the
    source of truth; a reconciler re-publishes queued items). Default: ``xmgie.edit_items`` messages to the Celery
    workers when ``settings.broker_url`` is set, else nothing.
    """
    settings = settings or get_settings()
    if dispatch is None and settings.broker_url:
        from xmgie.jobs.dispatch import celery_dispatcher

        dispatch = celery_dispatcher(settings.broker_url, settings.micro_batch_size, settings.lease_seconds)
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
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.storage = storage_from_settings(settings)
    app.state.dispatch = dispatch or _publish_nothing
    register_error_handlers(app)
    app.include_router(health.router)
    app.include_router(uploads.router, prefix="/v1")
    app.include_router(jobs.router, prefix="/v1")
    return app
