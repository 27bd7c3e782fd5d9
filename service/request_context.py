"""Which request a log line or an error body belongs to: ``X-Request-ID`` and W3C ``traceparent``.

Every request gets an id: the caller's ``X-Request-ID`` when it is a plausible one (1-128 printable characters
without spaces), else a new random one. It is echoed in the ``X-Request-ID`` response header, stored in the ASGI
scope's state for the error bodies (`service.http_errors`), and set in a context variable for the whole request,
which `RequestContextFilter` writes into every log record (``request_id``, ``trace_id``). A valid ``traceparent``
(W3C Trace Context, version 00) gives the trace and parent span ids; an invalid one is ignored, as the
specification asks.
"""

from __future__ import annotations

import contextvars
import logging
import re
import uuid
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"[!-~]{1,128}")  # printable ASCII, no spaces: safe in a header and a log line
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
NO_VALUE = "-"


@dataclass(frozen=True)
class RequestContext:
    request_id: str
    trace_id: str | None = None
    parent_span_id: str | None = None


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar("ride_request", default=None)


def current_request() -> RequestContext | None:
    """The request being served in this task, if any."""
    return _current.get()


def request_id_of(scope: Scope) -> str | None:
    """The id `RequestContextMiddleware` gave the request of ``scope``."""
    return scope.get("state", {}).get("request_id")


def parse_traceparent(value: str | None) -> tuple[str, str] | None:
    """(trace id, parent span id) of a valid version-00 ``traceparent`` header, else None."""
    if value is None:
        return None
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    version, trace_id, span_id, _ = match.groups()
    if version == "ff" or trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return trace_id, span_id


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class RequestContextMiddleware:
    """Gives each HTTP request its id and trace context (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        request_id = given if given is not None and _VALID_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        trace = parse_traceparent(_header(scope, b"traceparent"))
        context = RequestContext(request_id, *(trace or (None, None)))
        scope.setdefault("state", {})["request_id"] = request_id
        header = (REQUEST_ID_HEADER.lower().encode(), request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        token = _current.set(context)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _current.reset(token)


class RequestContextFilter(logging.Filter):
    """Adds ``request_id`` and ``trace_id`` (``-`` outside a request) to every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = _current.get()
        record.request_id = context.request_id if context is not None else NO_VALUE
        record.trace_id = (context.trace_id if context is not None else None) or NO_VALUE
        return True
