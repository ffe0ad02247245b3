"""Every error leaves the API as ``{"error": {"code", "message"}}`` with a fitting status code."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sql_errors
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from xmgie.editing.errors import EditInputError
from xmgie.jobs.db import is_database_unavailable
from xmgie.jobs.dispatch import BrokerUnavailableError
from xmgie.jobs.exceptions import (
    IdempotencyKeyReusedError,
    InvalidJobError,
    JobAlreadyTerminalError,
    NoSuchItemError,
    NoSuchJobError,
)
from xmgie.jobs.storage import StorageUnavailableError

logger = logging.getLogger(__name__)

_CODES_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    503: "unavailable",
}

_STATUS_BY_INPUT_CODE = {"upload_too_large": 413}
"""Status of input errors that are not a plain 422."""

RETRY_AFTER_SECONDS = "5"
"""``Retry-After`` of the answers given while a service the API depends on is down."""


class ApiError(Exception):
    """An error response with its status, code and message (``item``: index of the offending submitted item)."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        *,
        item: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.item = item
        self.headers = headers


def error_response(
    status_code: int, code: str, message: str, *, item: int | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The JSON error envelope."""
    error: dict[str, object] = {"code": code, "message": message}
    if item is not None:
        error["item"] = item
    return JSONResponse({"error": error}, status_code=status_code, headers=headers)


def _describe_validation(error: RequestValidationError) -> str:
    parts = []
    for detail in error.errors()[:5]:
        location = ".".join(str(part) for part in detail.get("loc", ()))
        parts.append(f"{location}: {detail.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request is invalid"


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at the request's path (Starlette's 405 names only the first route's)."""
    allowed = []
    for method in _METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return ", ".join(allowed)


def register_error_handlers(app: FastAPI) -> None:
    """Install the handlers that turn exceptions into the JSON error envelope."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status_code, exc.code, exc.message, item=exc.item, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _CODES_BY_STATUS.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        return error_response(exc.status_code, code, message, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", _describe_validation(exc))

    @app.exception_handler(EditInputError)
    async def _input_error(request: Request, exc: EditInputError) -> JSONResponse:
        return error_response(_STATUS_BY_INPUT_CODE.get(exc.code, 422), exc.code, exc.message)

    @app.exception_handler(NoSuchJobError)
    async def _no_such_job(request: Request, exc: NoSuchJobError) -> JSONResponse:
        return error_response(404, "job_not_found", str(exc))

    @app.exception_handler(NoSuchItemError)
    async def _no_such_item(request: Request, exc: NoSuchItemError) -> JSONResponse:
        return error_response(404, "item_not_found", str(exc))

    @app.exception_handler(JobAlreadyTerminalError)
    async def _already_terminal(request: Request, exc: JobAlreadyTerminalError) -> JSONResponse:
        return error_response(409, "job_already_terminal", str(exc))

    @app.exception_handler(IdempotencyKeyReusedError)
    async def _key_reused(request: Request, exc: IdempotencyKeyReusedError) -> JSONResponse:
        return error_response(409, "idempotency_key_reused", str(exc))

    @app.exception_handler(InvalidJobError)
    async def _invalid_job(request: Request, exc: InvalidJobError) -> JSONResponse:
        return error_response(422, "invalid_job", str(exc))

    @app.exception_handler(StorageUnavailableError)
    async def _storage_unavailable(request: Request, exc: StorageUnavailableError) -> JSONResponse:
        logger.warning("storage unavailable: %s", exc)
        return error_response(503, "storage_unavailable", "the storage is not reachable; try again later")

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.error("internal error answering %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal_error", "the server failed to answer this request; try again later")

    @app.exception_handler(BrokerUnavailableError)
    async def _broker_unavailable(request: Request, exc: BrokerUnavailableError) -> JSONResponse:
        logger.warning("broker unavailable: %s", exc)
        message = "the work queue is not reachable; nothing was created, try again later"
        return error_response(503, "broker_unavailable", message, headers={"Retry-After": RETRY_AFTER_SECONDS})

    async def _database_error(request: Request, exc: Exception) -> JSONResponse:
        if not is_database_unavailable(exc):
            return await _internal_error(request, exc)
        logger.warning("database unavailable on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        message = "the database is not reachable; try again later"
        return error_response(503, "database_unavailable", message, headers={"Retry-After": RETRY_AFTER_SECONDS})

    # A dropped or refused database connection is an outage to wait out, never a bare 500.
    app.add_exception_handler(sql_errors.DBAPIError, _database_error)
    app.add_exception_handler(sql_errors.TimeoutError, _database_error)
