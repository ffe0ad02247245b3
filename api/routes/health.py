"""Liveness and readiness probes (no authentication)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import SettingsDep, StorageDep
from api.schemas import HealthPublic, ReadinessPublic

router = APIRouter(tags=["health"])

BROKER_TIMEOUT_SECONDS = 2.0
"""How long the readiness probe waits for the broker."""


@router.get("/healthz", response_model=HealthPublic)
def healthz() -> HealthPublic:
    """The process is alive."""
    return HealthPublic(status="ok")


def _probe(check) -> str:
    try:
        check()
    except Exception as error:
        return f"error: {type(error).__name__}: {error}"
    return "ok"


def _ping_broker(url: str) -> None:
    import redis

    timeout = BROKER_TIMEOUT_SECONDS
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
    finally:
        client.close()


@router.get("/readyz", response_model=ReadinessPublic, responses={503: {"model": ReadinessPublic}})
def readyz(request: Request, storage: StorageDep, settings: SettingsDep) -> ReadinessPublic | JSONResponse:
    """Whether the database, the storage and (when configured) the broker answer; 503 names what failed."""

    def ping_database() -> None:
        with request.app.state.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    checks = {"database": _probe(ping_database), "storage": _probe(storage.check)}
    checks["broker"] = _probe(lambda: _ping_broker(settings.broker_url)) if settings.broker_url else "skipped"
    failed = [part for part, outcome in checks.items() if outcome not in ("ok", "skipped")]
    if not failed:
        return ReadinessPublic(status="ok", checks=checks)
    body = ReadinessPublic(status="unavailable", checks=checks).model_dump()
    body["error"] = {"code": "not_ready", "message": f"not ready: {', '.join(failed)} failed"}
    return JSONResponse(body, status_code=503)
