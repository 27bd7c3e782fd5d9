"""Graceful shutdown, as the app sees it: from SIGTERM on, /readyz answers 503 and every response closes its
connection; requests still unanswered when the shutdown timeout expires get a JSON 503 instead of uvicorn's
plain-text 500, and are counted so that the process can exit non-zero.

`Drain` is the state (set by the server, `service.server`, when the signal arrives); `DrainMiddleware` applies it
to each request.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import NotReadyError
from service.http_errors import error_response
from service.request_context import request_id_of

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _InFlight:
    task: asyncio.Task[object] | None
    response_started: bool = False
    cut: bool = False


class Drain:
    """Whether the server is shutting down, and the requests in flight that a shutdown timeout would cut."""

    def __init__(self) -> None:
        self.draining = False
        self.cut_requests = 0
        self._in_flight: set[_InFlight] = set()

    def begin(self) -> None:
        if not self.draining:
            self.draining = True
            logger.info("draining: /readyz answers 503 and responses close their connections")

    def cut(self) -> None:
        """End every request in flight that has not started its response: each answers 503 (`DrainMiddleware`)."""
        unanswered = [request for request in self._in_flight if not request.response_started and request.task]
        for request in unanswered:
            request.cut = True
            request.task.cancel()  # type: ignore[union-attr]
        self.cut_requests += len(unanswered)
        if unanswered:
            logger.error("shutdown timeout: %d requests unanswered, answered 503", len(unanswered))

    def track(self, request: _InFlight) -> None:
        self._in_flight.add(request)

    def untrack(self, request: _InFlight) -> None:
        self._in_flight.discard(request)


CLOSE = (b"connection", b"close")


class DrainMiddleware:
    """Adds ``Connection: close`` to responses while draining, and answers 503 for a request the drain cuts."""

    def __init__(self, app: ASGIApp, drain: Drain, retry_after_s: int) -> None:
        self.app = app
        self.drain = drain
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = _InFlight(task=asyncio.current_task())
        self.drain.track(request)

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                request.response_started = True
                if self.drain.draining:
                    message = {**message, "headers": [*message.get("headers", []), CLOSE]}
            await send(message)

        try:
            await self.app(scope, receive, closing_send)
        except asyncio.CancelledError:
            if not request.cut or request.response_started:
                raise
            if request.task is not None:
                request.task.uncancel()
            message = "the server shut down before this request was answered; retry"
            headers = {"Retry-After": str(self.retry_after_s), "Connection": "close"}
            reply = error_response(
                503, NotReadyError.code, message, headers, path=scope["path"], request_id=request_id_of(scope)
            )
            await reply(scope, receive, send)
        finally:
            self.drain.untrack(request)
