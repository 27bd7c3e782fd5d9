"""The app's two middlewares, as pure ASGI (``BaseHTTPMiddleware`` costs a task per request): the body limit and
the request metrics."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLargeError
from service.http_errors import error_response
from service.metrics import UNMATCHED_ROUTE, Metrics
from service.request_context import request_id_of

# A refused body is read and discarded up to this multiple of the limit, as nginx's lingering close does: a client
# that sends its whole body before reading (httpx, urllib) then reads the 413 instead of a connection reset.
DISCARD_BODY_FACTOR = 4


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


async def _discard_body(receive: Receive, received: int, bound: int) -> None:
    """Read and drop the rest of the body, until it ends, the client goes, or ``bound`` bytes came in all."""
    while received <= bound:
        message = await receive()
        if message["type"] != "http.request":
            return
        received += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class BodyLimitMiddleware:
    """413 above ``max_body_bytes``: at once when Content-Length says so, else as soon as the count passes it.

    Either way the client can read it: the rest of the body is read and discarded (up to `DISCARD_BODY_FACTOR`
    times the limit) before the connection closes, except after ``Expect: 100-continue``, where the client sends
    nothing before it hears back.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.discard_bound = DISCARD_BODY_FACTOR * max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await self._refuse_declared(scope, receive, send, declared)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                if message.get("more_body", False):
                    await _discard_body(receive, received, self.discard_bound)
                # Raised inside the endpoint's body read, so the app's error handler answers it.
                raise PayloadTooLargeError(f"request body is above the limit of {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse_declared(self, scope: Scope, receive: Receive, send: Send, declared: int) -> None:
        message = f"request body of {declared} bytes is above the limit of {self.max_body_bytes} bytes"
        response = error_response(
            413,
            PayloadTooLargeError.code,
            message,
            {"Connection": "close"},
            path=scope["path"],
            request_id=request_id_of(scope),
        )
        expects_continue = (_header(scope, b"expect") or b"").lower() == b"100-continue"
        if expects_continue or declared > self.discard_bound:
            await response(scope, receive, send)
            return
        # The whole answer first (the client may read it early), then the body is drained, then the close.
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body, "more_body": True})
        await _discard_body(receive, 0, self.discard_bound)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class MetricsMiddleware:
    """Counts every request by route template and status, and times it.

    ``routes`` are the paths of the app's routes (FastAPI's own, such as /openapi.json, included) and ``mounts``
    the paths of its mounted apps (the docs' assets), counted under the mount's path; anything else is
    ``unmatched``, so that the label's values stay bounded.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: frozenset[str], mounts: tuple[str, ...] = ()) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes
        self.mounts = mounts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.metrics.observe_request(self._route(scope), status, time.perf_counter() - started)

    def _route(self, scope: Scope) -> str:
        # FastAPI stores the matched route in the scope; requests answered before routing (413) and Starlette's
        # own routes use the path.
        route = scope.get("route")
        if route is not None:
            return route.path
        path = scope["path"]
        if path in self.routes:
            return path
        return next((mount for mount in self.mounts if path.startswith(mount + "/")), UNMATCHED_ROUTE)
