"""Liveness and readiness probes (no authentication)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import SettingsDep, StorageDep
from api.schemas import HealthPublic, ReadinessPublic

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthPublic)
def healthz() -> HealthPublic:
    """The process is alive."""
    return HealthPublic(status="ok")


def _outcome(future: Future[None], timeout: float) -> str:
    if not future.done():
        return f"error: no answer within {timeout:g} s"
    error = future.exception()
    if error is not None:
        return f"error: {type(error).__name__}: {error}"
    return "ok"


def _run_checks(checks: dict[str, Callable[[], None]], timeout: float) -> dict[str, str]:
    """Run the checks side by side and wait at most ``timeout`` seconds for all of them; each part's outcome.

    The clients have timeouts of their own; this deadline holds even where one does not apply (a database that
    accepted the connection and stopped answering). A check still running is left to finish in the background.
    """
    executor = ThreadPoolExecutor(max_workers=len(checks), thread_name_prefix="readyz")
    try:
        futures = {part: executor.submit(check) for part, check in checks.items()}
        wait(futures.values(), timeout=timeout)
        return {part: _outcome(future, timeout) for part, future in futures.items()}
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


def _ping_broker(url: str, timeout: float) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
    finally:
        client.close()


@router.get("/readyz", response_model=ReadinessPublic, responses={503: {"model": ReadinessPublic}})
def readyz(request: Request, storage: StorageDep, settings: SettingsDep) -> ReadinessPublic | JSONResponse:
    """Whether the database, the storage and (when configured) the broker answer within the probe timeout; 503 names
    what failed."""
    timeout = settings.probe_timeout_seconds
    broker_url = settings.broker_url

    def ping_database() -> None:
        with request.app.state.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    checks: dict[str, Callable[[], None]] = {"database": ping_database, "storage": storage.check}
    if broker_url:
        checks["broker"] = lambda: _ping_broker(broker_url, timeout)
    outcomes = _run_checks(checks, timeout)
    outcomes.setdefault("broker", "skipped")
    failed = [part for part, outcome in outcomes.items() if outcome not in ("ok", "skipped")]
    if not failed:
        return ReadinessPublic(status="ok", checks=outcomes)
    body = ReadinessPublic(status="unavailable", checks=outcomes).model_dump()
    body["error"] = {"code": "not_ready", "message": f"not ready: {', '.join(failed)} failed"}
    return JSONResponse(body, status_code=503)
