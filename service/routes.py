"""The endpoints: each turns HTTP into calls on the shared state (`service.state.StateDep`) and returns a typed
response. :func:`add_routes` is the route table, with the errors each route can raise."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request, Response

from service import errors
from service.access import require_token
from service.http_errors import error_responses
from service.metrics import EXPOSITION_CONTENT_TYPE
from service.model_version import ModelVersion
from service.responses import classify_response, model_summary
from service.rows import check_row_count, decode_rows, observe_rows, queue_rows
from service.schemas import (
    CLASSIFY_BATCH_EXAMPLE,
    CLASSIFY_EXAMPLE,
    ClassifyBatchResponse,
    ClassifyResponse,
    ClassifyRouteParams,
    ModelsResponse,
    StatusResponse,
)
from service.state import StateDep
from service.upload import IMAGE_REQUEST_BODY, read_images

METRICS_EXAMPLE = (
    "# HELP ride_requests_total HTTP requests answered, by route template and status code.\n"
    "# TYPE ride_requests_total counter\n"
    'ride_requests_total{route="/classify",status="200"} 1027.0\n'
)
CLASSIFY_ROUTE = "/classify"
MODELS_ROUTE = "/models"  # the served model's description (it was /v1/models, which KServe v1 uses)
# What /classify can answer besides 200 (the batcher's queue and readiness included).
CLASSIFY_ERRORS = (
    errors.InvalidImageError,
    errors.UnauthorizedError,
    errors.PayloadTooLargeError,
    errors.TooManyRowsError,
    errors.ImageTooLargeError,
    errors.UnsupportedMediaTypeError,
    errors.InvalidParameterError,
    errors.ModelNotFoundError,
    errors.OverloadedError,
    errors.NotReadyError,
)


def _require_single_values(request: Request) -> None:
    """A parameter given twice is refused: taking one of the values silently hides a client's mistake."""
    names = [name for name, _ in request.query_params.multi_items()]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise errors.InvalidParameterError(f"query parameters given more than once: {', '.join(repeated[:5])}")


async def classify(request: Request, state: StateDep, params: Annotated[ClassifyRouteParams, Query()]) -> Response:
    started = time.perf_counter()
    _require_single_values(request)
    with state.table.use(params.model, params.version) as served:
        state.require_warm()
        return await _classify(request, served, params, started)


async def _classify(request: Request, served: ModelVersion, params: ClassifyRouteParams, started: float) -> Response:
    threshold, max_experts, budget_warning = served.cascade_choice(params)
    with served.admission.admit():  # before the body is read: refusing late spends the work it should save
        uploads = await read_images(request, served.settings.max_body_bytes, served.max_request_rows)
        check_row_count(len(uploads), served.max_request_rows)
        images = await decode_rows(uploads, served.decoder, served.decode_pool)
        queued = queue_rows(served, images, threshold=threshold, max_experts=max_experts)
    rows = await queued.results(request.receive)
    observe_rows(served, rows, images, threshold)
    total_s = time.perf_counter() - started
    results = [classify_response(served, row, params.top_k, total_s) for row in rows]
    if len(results) == 1:
        body: ClassifyResponse | ClassifyBatchResponse = results[0]
        timing = results[0].timing_ms
        headers = {
            "X-Experts-Used": str(rows[0].experts_used),
            "Server-Timing": (
                f"queue;dur={timing.queue:.3f}, inference;dur={timing.inference:.3f}, total;dur={timing.total:.3f}"
            ),
        }
    else:
        body = ClassifyBatchResponse(results=results)
        headers = {"Server-Timing": f"total;dur={total_s * 1e3:.3f}"}
    headers["X-Threshold"] = repr(threshold)
    if budget_warning is not None:
        headers["X-Target-Compute-Warning"] = budget_warning
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
    return ModelsResponse(models=[model_summary(served) for served in state.table.all_versions()])


async def metrics(state: StateDep) -> Response:
    return Response(state.metrics.exposition(), media_type=EXPOSITION_CONTENT_TYPE)


def add_routes(app: FastAPI) -> None:
    """The service's own routes, with their response models and the errors they document (the protocols' routes
    are in `service.v1_protocol` and `service.v2_protocol`)."""
    app.add_api_route(
        CLASSIFY_ROUTE,
        classify,
        methods=["POST"],
        response_model=ClassifyResponse | ClassifyBatchResponse,
        responses={
            **error_responses(*CLASSIFY_ERRORS),
            200: {
                "description": "One image: its answer. Several files: `results`, one answer per file, in order.",
                "content": {
                    "application/json": {
                        "examples": {
                            "one image": {"value": CLASSIFY_EXAMPLE},
                            "several files": {"value": CLASSIFY_BATCH_EXAMPLE},
                        }
                    }
                },
            },
        },
        openapi_extra=IMAGE_REQUEST_BODY,
        dependencies=[Depends(require_token)],
        summary="Classify one image (multipart field 'file', or the raw body) or several (repeated 'file' fields).",
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
        MODELS_ROUTE,
        list_models,
        response_model=ModelsResponse,
        summary="Every model version loaded (the default model's latest first), with the provider in use.",
    )
    app.add_api_route(
        "/metrics",
        metrics,
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus text exposition format.",
                "content": {EXPOSITION_CONTENT_TYPE: {"schema": {"type": "string"}, "example": METRICS_EXAMPLE}},
            }
        },
        summary="Prometheus metrics (text exposition format).",
    )
