"""The HTTP server around the app: uvicorn, with the connection limits of `service.connections` and the drain of
`service.drain`.

`build_server` is the one place where uvicorn is configured; ``python -m service`` runs what it returns.

Shutdown, in order (`DrainingServer`):

1. SIGTERM (or SIGINT): the drain begins at once: /readyz answers 503 and every response carries
   ``Connection: close``.
2. After SIGTERM only, the server keeps serving for ``shutdown_delay_s``, so that load balancers see /readyz fail
   and stop sending before the listening socket closes (Ctrl-C skips it; a second signal ends it).
3. New connection attempts are dropped (`service.connections.stop_handshakes`: they retry and find the port
   closed), the connections the kernel had already queued are accepted, then uvicorn closes the listening socket; a
   request in progress ends with ``Connection: close``; an idle connection is closed after a short grace
   (`service.connections`), so that a request already on its way is answered, not reset.
4. ``shutdown_timeout_s`` after step 3, requests still unanswered get a JSON 503 (`service.drain`), and the process
   exits with status 3 (`EXIT_CUT`) instead of 0.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import socket
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service.admission import early_refusal
from service.connections import (
    CLOSE_REASONS,
    DRAIN_IDLE_GRACE_S,
    ConnectionGuard,
    ConnectionLimits,
    GuardedHttpToolsProtocol,
    fit_to_descriptor_limit,
    stop_handshakes,
)
from service.drain import Drain
from service.routes import CLASSIFY_ROUTE
from service.settings import Settings
from service.state import ServiceState

logger = logging.getLogger(__name__)

EXIT_CUT = 3  # the shutdown timeout cut requests off
# uvicorn's own limit on the drain, a backstop behind ours: it would answer what is left with plain-text 500s.
UVICORN_BACKSTOP_S = 5.0
# Between refusing new handshakes and closing the listening socket: the event loop accepts what the kernel queued.
ACCEPT_QUEUE_GRACE_S = 0.1


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain described in the module docstring."""

    def __init__(self, config: uvicorn.Config, *, drain: Drain, delay_s: float, timeout_s: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.delay_s = delay_s
        self.timeout_s = timeout_s
        self._exit_at: float | None = None  # end of the pre-drain delay

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first = not self.drain.draining
        self.drain.begin()
        if first and sig == signal.SIGTERM and self.delay_s > 0:
            self._captured_signals.append(sig)  # re-raised by uvicorn at the end, as for any handled signal
            self._exit_at = time.monotonic() + self.delay_s
            logger.info("SIGTERM: serving %.1f s more before closing the listening socket", self.delay_s)
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._exit_at is not None and time.monotonic() >= self._exit_at:
            self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.drain.begin()
        listeners = [listener for server in self.servers for listener in server.sockets or ()]
        if all([stop_handshakes(listener) for listener in listeners]):
            await asyncio.sleep(ACCEPT_QUEUE_GRACE_S)
        cut = asyncio.get_running_loop().call_later(self.timeout_s, self.drain.cut)
        try:
            await super().shutdown(sockets)
        finally:
            cut.cancel()


def connection_guard(settings: Settings, state: ServiceState) -> ConnectionGuard:
    """The connection limits of ``settings``, reporting to ``state``'s metrics."""
    limits = ConnectionLimits(
        max_connections=fit_to_descriptor_limit(settings.max_connections),
        max_header_bytes=settings.max_header_bytes,
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
    )
    refusal = early_refusal(
        state.check_admission,
        CLASSIFY_ROUTE,
        settings.retry_after_s,
        on_refused=lambda status: state.metrics.observe_request(CLASSIFY_ROUTE, status, 0.0),
        draining=lambda: state.drain.draining,
    )
    guard = ConnectionGuard(limits, on_closed=state.metrics.observe_connection_closed, refusal=refusal)
    state.metrics.track_connections(lambda: guard.open_connections, limits.max_connections)
    for reason in CLOSE_REASONS:
        state.metrics.connections_closed.labels(reason=reason)
    return guard


def build_server(app: FastAPI, settings: Settings) -> DrainingServer:
    """A uvicorn server for ``app`` (made by `service.api.create_app`) as ``settings`` say."""
    state: ServiceState = app.state.service
    guard = connection_guard(settings, state)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=functools.partial(GuardedHttpToolsProtocol, guard=guard),  # type: ignore[arg-type]
        log_level=settings.log_level,
        access_log=settings.access_log,
        log_config=None,  # uvicorn's lines go through the root handler (`service.__main__`), with the request id
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]  # a float works: call_later
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s + DRAIN_IDLE_GRACE_S + UVICORN_BACKSTOP_S),
        lifespan="on",
    )
    return DrainingServer(
        config, drain=state.drain, delay_s=settings.shutdown_delay_s, timeout_s=settings.shutdown_timeout_s
    )
