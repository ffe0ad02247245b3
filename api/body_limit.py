"""A cap on the size of request bodies, enforced before the body is read: ``413`` with the JSON error envelope.

A body whose ``Content-Length`` is over the limit is refused without reading it; one sent without a length (chunked)
is counted as it streams in and refused once it goes over, so no request holds more than the limit in memory or on
disk. Uploads have a limit of their own (the upload size plus room for the multipart framing).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response

MULTIPART_OVERHEAD_BYTES = 64 * 1024
"""Room for the multipart boundaries, part headers and form fields around an uploaded file."""


@dataclass(frozen=True)
class BodyLimit:
    """The most bytes a request body may have, and the code and message of the 413 for one over it."""

    max_bytes: int
    code: str = "request_too_large"
    message: str = ""

    def refusal(self) -> str:
        return self.message or f"the request body is larger than the limit of {self.max_bytes} bytes"


class _BodyTooLargeError(Exception):
    """Raised into the application when the streamed body goes over the limit."""


class BodySizeLimit:
    """ASGI middleware: a body over ``limit`` (``by_path[path]`` for the paths named there) gets a 413."""

    def __init__(self, app: ASGIApp, *, limit: BodyLimit, by_path: Mapping[str, BodyLimit] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.by_path = dict(by_path or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.by_path.get(scope["path"].rstrip("/"), self.limit)
        declared = _content_length(scope)
        if declared is not None and declared > limit.max_bytes:
            await _refuse(scope, receive, send, limit)
            return

        received = 0
        exceeded = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.max_bytes:
                    exceeded = True
                    raise _BodyTooLargeError
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            # Once the body went over, whatever the application answers (its error for a body it could not read)
            # is replaced by the 413.
            if exceeded:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await _refuse(scope, receive, send, limit)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _refuse(scope: Scope, receive: Receive, send: Send, limit: BodyLimit) -> None:
    # The unread rest of the body would be taken for the next request: the connection ends with this answer.
    response = error_response(413, limit.code, limit.refusal(), headers={"Connection": "close"})
    await response(scope, receive, send)
