"""The endpoints: each turns HTTP into calls on the shared state (`service.state.StateDep`) and returns a typed
response. :func:`add_routes` is the route table, with the errors each route can raise."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request, Response

from service import errors
from service.disconnect import unless_client_leaves
from service.http_errors import error_responses
from service.metrics import EXPOSITION_CONTENT_TYPE
from service.responses import classify_response, model_summary, v2_metadata
from service.schemas import (
    ClassifyParams,
    ClassifyResponse,
    ModelsResponse,
    StatusResponse,
    V2Live,
    V2ModelMetadata,
    V2Ready,
)
from service.state import ServiceState, StateDep
from service.upload import IMAGE_REQUEST_BODY, decode_upload

CLASSIFY_ROUTE = "/classify"
# What /classify can answer besides 200 (the batcher's queue and readiness included).
CLASSIFY_ERRORS = (
    errors.InvalidImageError,
    errors.PayloadTooLargeError,
    errors.ImageTooLargeError,
    errors.UnsupportedMediaTypeError,
    errors.InvalidParameterError,
    errors.OverloadedError,
    errors.NotReadyError,
)


def _require_single_values(request: Request) -> None:
    """A parameter given twice is refused: taking one of the values silently hides a client's mistake."""
    names = [name for name, _ in request.query_params.multi_items()]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise errors.InvalidParameterError(f"query parameters given more than once: {', '.join(repeated[:5])}")


async def classify(request: Request, state: StateDep, params: Annotated[ClassifyParams, Query()]) -> Response:
    started = time.perf_counter()
    _require_single_values(request)
    state.require_warm()
    threshold, max_experts = state.cascade_settings(params)
    with state.admission.admit():  # before the body is read: refusing late spends the work it should save
        pixels = await decode_upload(request, state.decoder, state.decode_pool, state.settings.max_body_bytes)
        queued = state.batcher.enqueue(pixels, threshold=threshold, max_experts=max_experts)
    row = await unless_client_leaves(request.receive, queued)
    body = classify_response(state, row, params.top_k, time.perf_counter() - started)
    state.metrics.observe_classification(
        queue_seconds=row.queue_seconds, experts_used=row.experts_used, relative_compute=row.relative_compute
    )
    timing = body.timing_ms
    headers = {
        "X-Experts-Used": str(row.experts_used),
        "Server-Timing": (
            f"queue;dur={timing.queue:.3f}, inference;dur={timing.inference:.3f}, total;dur={timing.total:.3f}"
        ),
    }
    # Serialised here: FastAPI would validate the model a second time on the way out.
    return Response(body.model_dump_json(), media_type="application/json", headers=headers)


async def healthz(state: StateDep) -> Any:
    if state.failure is not None:
        raise errors.NotReadyError(state.failure)
    return StatusResponse(status="alive")


async def readyz(state: StateDep) -> Any:
    state.require_ready()
    return StatusResponse(status="ready")


async def list_models(state: StateDep) -> Any:
    return ModelsResponse(models=[model_summary(state)])


async def metrics(state: StateDep) -> Response:
    return Response(state.metrics.exposition(), media_type=EXPOSITION_CONTENT_TYPE)


async def v2_live() -> Any:
    return V2Live(live=True)


async def v2_ready(state: StateDep) -> Any:
    state.require_ready()
    return V2Ready(ready=True)


def _require_model(state: ServiceState, name: str) -> None:
    served = state.model.manifest.model.name
    if name != served:
        raise errors.ModelNotFoundError(f"unknown model {name!r}: this server serves {served!r}")


async def v2_model(name: str, state: StateDep) -> Any:
    _require_model(state, name)
    return v2_metadata(state)


async def v2_model_ready(name: str, state: StateDep) -> Any:
    _require_model(state, name)
    state.require_ready()
    return V2Ready(ready=True)


def add_routes(app: FastAPI) -> None:
    """Every route of the service, with its response model and the errors it documents."""
    app.add_api_route(
        CLASSIFY_ROUTE,
        classify,
        methods=["POST"],
        response_model=ClassifyResponse,
        responses=error_responses(*CLASSIFY_ERRORS),
        openapi_extra=IMAGE_REQUEST_BODY,
        summary="Classify one image (multipart field 'file', or the raw body with an image/* content type).",
    )
    app.add_api_route(
        "/healthz",
        healthz,
        response_model=StatusResponse,
        responses=error_responses(errors.NotReadyError),
        summary="Liveness: the process answers (503 only when warm-up failed and it never will be ready).",
    )
    ready = error_responses(errors.NotReadyError)
    app.add_api_route(
        "/readyz", readyz, response_model=StatusResponse, responses=ready, summary="Readiness: loaded and warm."
    )
    app.add_api_route(
        "/v1/models", list_models, response_model=ModelsResponse, summary="The model served and the provider in use."
    )
    app.add_api_route("/metrics", metrics, summary="Prometheus metrics (text exposition format).")
    app.add_api_route("/v2/health/live", v2_live, response_model=V2Live, summary="KServe v2 liveness.")
    app.add_api_route(
        "/v2/health/ready", v2_ready, response_model=V2Ready, responses=ready, summary="KServe v2 readiness."
    )
    app.add_api_route(
        "/v2/models/{name}",
        v2_model,
        response_model=V2ModelMetadata,
        responses=error_responses(errors.ModelNotFoundError),
        summary="KServe v2 metadata.",
    )
    app.add_api_route(
        "/v2/models/{name}/ready",
        v2_model_ready,
        response_model=V2Ready,
        responses=error_responses(errors.ModelNotFoundError, errors.NotReadyError),
        summary="KServe v2 model ready.",
    )
