"""The HTTP layer: `create_app(settings)` builds a FastAPI app around a loaded model.

Endpoints are thin (`service.routes`): they turn HTTP into calls on the decoder, the batcher and the model, and
typed responses back. Errors map to statuses in one table (`service.http_errors`); the body limit and the
request metrics are middleware (`service.middleware`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.routing import Mount, Route

from service.access import add_cors
from service.drain import DrainMiddleware
from service.errors import ClientClosedError
from service.http_errors import register_error_handlers, statuses
from service.middleware import BodyLimitMiddleware, MetricsMiddleware
from service.model import OnnxModel
from service.openapi import truthful_openapi
from service.operating_routes import add_operating_routes
from service.page import add_page
from service.reload_signal import watch_sighup
from service.repository_routes import add_repository_routes
from service.request_context import RequestContextMiddleware
from service.routes import CLASSIFY_ERRORS, CLASSIFY_ROUTE, add_routes
from service.settings import Settings
from service.state import ServiceState
from service.v1_protocol import PREDICT_ERRORS, PREDICT_ROUTE, add_v1_routes
from service.v2_protocol import INFER_ERRORS, INFER_PATHS, add_v2_routes, server_version


def create_app(settings: Settings, *, model: OnnxModel | None = None) -> FastAPI:
    """Build the app around the models ``settings`` name (`service.state.repository_of`), or around ``model``, a
    loaded model folder, as a repository of one.

    Raises:
        ModelLoadError: no model can be served (raised here, before any socket is opened).
    """
    state = ServiceState(settings, model=model)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        warming = asyncio.create_task(state.warm_up())
        rescan = watch_sighup(state.loader)
        try:
            yield
        finally:
            state.ready = False
            rescan()
            warming.cancel()
            await state.stop()
            state.decode_pool.close()

    app = FastAPIOffline(  # /docs and /redoc with locally served assets (no CDN)
        title="RIDE Serve",
        summary="Long-tailed image classification with an early-exit expert cascade.",
        version=server_version(),
        lifespan=lifespan,
    )
    app.state.service = state
    add_routes(app)
    add_v1_routes(app)
    add_v2_routes(app)
    add_page(app)
    add_operating_routes(app, admin=settings.admin_routes)
    if settings.admin_routes:
        add_repository_routes(app)
    register_error_handlers(app, retry_after_s=settings.retry_after_s)
    truthful_openapi(app)
    routes = [route.path for route in app.routes if isinstance(route, Route)]  # APIRoute is a Route
    mounts = tuple(route.path for route in app.routes if isinstance(route, Mount))
    # 499 (the client left first) is counted, never sent: it is not in the OpenAPI document.
    error_statuses = {
        CLASSIFY_ROUTE: statuses(*CLASSIFY_ERRORS, ClientClosedError),
        PREDICT_ROUTE: statuses(*PREDICT_ERRORS, ClientClosedError),
        **{path: statuses(*INFER_ERRORS, ClientClosedError) for path in INFER_PATHS},
    }
    state.metrics.preinitialise_routes([*routes, *mounts], error_statuses=error_statuses)
    add_cors(app, settings.cors_origin_list)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(DrainMiddleware, drain=state.drain, retry_after_s=settings.retry_after_s)
    # Outside the drain and the body limit: their answers carry the request id too.
    app.add_middleware(RequestContextMiddleware)
    # Outermost: it sees the 413s and the drain's 503s.
    app.add_middleware(MetricsMiddleware, metrics=state.metrics, routes=frozenset(routes), mounts=mounts)
    return app
