"""The HTTP server around the app: uvicorn, with the connection limits of `service.connections`.

`build_server` is the one place where uvicorn is configured; ``python -m service`` runs what it returns.
"""

from __future__ import annotations

import functools

import uvicorn
from fastapi import FastAPI

from service.connections import (
    CLOSE_REASONS,
    ConnectionGuard,
    ConnectionLimits,
    GuardedHttpToolsProtocol,
    fit_to_descriptor_limit,
)
from service.settings import Settings
from service.state import ServiceState


def connection_guard(settings: Settings, state: ServiceState) -> ConnectionGuard:
    """The connection limits of ``settings``, reporting to ``state``'s metrics."""
    limits = ConnectionLimits(
        max_connections=fit_to_descriptor_limit(settings.max_connections),
        max_header_bytes=settings.max_header_bytes,
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
    )
    guard = ConnectionGuard(limits, on_closed=state.metrics.observe_connection_closed)
    state.metrics.track_connections(lambda: guard.open_connections, limits.max_connections)
    for reason in CLOSE_REASONS:
        state.metrics.connections_closed.labels(reason=reason)
    return guard


def build_server(app: FastAPI, settings: Settings) -> uvicorn.Server:
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
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]  # a float works: call_later
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s) + 1,
        lifespan="on",
    )
    return uvicorn.Server(config)
