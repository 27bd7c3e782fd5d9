"""The app's two middlewares, as pure ASGI (``BaseHTTPMiddleware`` costs a task per request): the body limit and
the request metrics."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLargeError
from service.http_errors import error_response
from service.metrics import UNMATCHED_ROUTE, Metrics


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class BodyLimitMiddleware:
    """413 above ``max_body_bytes``: at once when Content-Length says so, else as soon as the count passes it."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            message = f"request body of {declared} bytes is above the limit of {limit} bytes"
            await error_response(413, PayloadTooLargeError.code, message, {"Connection": "close"})(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                # Raised inside the endpoint's body read, so the app's error handler answers it.
                raise PayloadTooLargeError(f"request body is above the limit of {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


class MetricsMiddleware:
    """Counts every request by route template and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

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
        # The router stores the matched route in the scope; requests answered before routing (413) use the path.
        route = scope.get("route")
        if route is not None:
            return route.path
        return scope["path"] if scope["path"] in self.routes else UNMATCHED_ROUTE
