"""The HTTP layer: `create_app(settings)` builds a FastAPI app around a loaded model.

Endpoints are thin: they turn HTTP into calls on the decoder, the batcher and the model, and typed responses
back. Every error a client can cause is a `service.errors.ServiceError`; `ERROR_STATUS` below is the one place that maps
them to HTTP status codes, and every non-2xx reply (FastAPI's own 404/405/422 included) has the body
``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cascade import CascadeResult, run_cascade
from service.batcher import Batcher, RowResult
from service.errors import (
    ImageTooLargeError,
    InvalidImageError,
    InvalidParameterError,
    ModelNotFoundError,
    NotReadyError,
    OverloadedError,
    PayloadTooLargeError,
    ServiceError,
    UnsupportedMediaTypeError,
)
from service.images import ImageDecoder
from service.metrics import EXPOSITION_CONTENT_TYPE, UNMATCHED_ROUTE, Metrics
from service.model import CUDA, OnnxModel, load_model, warm_up
from service.schemas import (
    ClassifyParams,
    ClassifyResponse,
    ClassScore,
    ClassSummary,
    CostSummary,
    ErrorBody,
    ErrorDetail,
    ModelRef,
    ModelsResponse,
    ModelSummary,
    StatusResponse,
    TimingMs,
    V2Live,
    V2ModelMetadata,
    V2Ready,
    V2Tensor,
)
from service.settings import Settings

logger = logging.getLogger(__name__)

# The one exception-to-status table.
ERROR_STATUS: dict[type[ServiceError], int] = {
    InvalidImageError: 400,
    ModelNotFoundError: 404,
    PayloadTooLargeError: 413,
    ImageTooLargeError: 413,
    UnsupportedMediaTypeError: 415,
    InvalidParameterError: 422,
    OverloadedError: 503,
    NotReadyError: 503,
}
# Codes for the errors Starlette/FastAPI raise themselves (unknown route, wrong method, bad multipart).
HTTP_ERROR_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
# Images up to this size decode on the event loop (~0.1 ms); larger ones go to a thread so the loop stays free.
INLINE_DECODE_PIXELS = 128 * 128
IMAGE_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 404, 413, 415, 422, 503)
}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(code=code, message=message))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def status_of(error: ServiceError) -> int:
    for cls in type(error).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return 500


class ServiceState:
    """What the endpoints share: settings, model, decoder, batcher, metrics and readiness."""

    def __init__(self, settings: Settings, model: OnnxModel) -> None:
        self.settings = settings
        self.model = model
        manifest = model.manifest
        self.default_threshold = (
            settings.default_threshold if settings.default_threshold is not None else manifest.cascade.default_threshold
        )
        self.labels = [c.name for c in manifest.classes]
        self.decoder = ImageDecoder(manifest.input, max_pixels=settings.max_pixels)
        self.metrics = Metrics(
            num_experts=model.num_experts,
            max_batch_size=settings.max_batch_size,
            model_name=manifest.model.name,
            model_version=manifest.model.version,
            provider=model.provider,
        )
        self.batcher = Batcher(
            self._infer,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000.0,
            max_queue_size=settings.max_queue_size,
            on_batch=self.metrics.observe_batch,
        )
        self.metrics.track_queue_depth(lambda: self.batcher.pending)
        self.ready = False
        self.failure: str | None = None

    def _infer(self, images: np.ndarray, thresholds: np.ndarray, max_experts: np.ndarray) -> CascadeResult:
        return run_cascade(self.model, images, thresholds=thresholds, max_experts=max_experts)

    def require_ready(self) -> None:
        if not self.ready:
            raise NotReadyError(self.failure or "the model is still warming up")

    async def warm_up(self) -> None:
        """Warm every graph at the batch sizes it will see, then report ready."""
        largest = self.settings.max_batch_size
        # CUDA picks kernels per input shape, so every batch size is warmed; on CPU the extremes suffice.
        sizes = list(range(1, largest + 1)) if self.model.provider == CUDA else sorted({1, largest})
        started = time.perf_counter()
        try:
            await self.batcher.run_in_worker(warm_up, self.model, sizes)
        except Exception as error:
            self.failure = f"warm-up failed: {error}"
            logger.error("%s", self.failure)
            return
        self.ready = True
        logger.info("model warm after %.2f s (batch sizes %s): ready", time.perf_counter() - started, sizes)


# --------------------------------------------------------------------------------------------------------------
# Middleware (pure ASGI: BaseHTTPMiddleware costs a task per request)
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# Request body
# --------------------------------------------------------------------------------------------------------------


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


async def read_image_bytes(request: Request) -> bytes:
    """The uploaded image: multipart field ``file``, or the raw body with an ``image/*`` content type."""
    media_type = _media_type(request.headers.get("content-type"))
    if media_type.startswith("image/"):
        return await request.body()
    if media_type != "multipart/form-data":
        shown = media_type or "none"
        raise UnsupportedMediaTypeError(
            f"content type {shown} is not an image: send image/* or multipart/form-data with a field 'file'"
        )
    async with request.form(max_files=1, max_fields=8) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidParameterError("multipart form has no file field 'file'")
        part_type = _media_type(upload.content_type)
        if part_type and not (part_type.startswith("image/") or part_type == "application/octet-stream"):
            raise UnsupportedMediaTypeError(f"form field 'file' has content type {part_type}, not an image")
        return await upload.read()


# --------------------------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------------------------


def _classify_response(state: ServiceState, row: RowResult, top_k: int, total_s: float) -> ClassifyResponse:
    probabilities = row.probabilities
    k = min(top_k, probabilities.shape[0])
    top = np.argsort(-probabilities, kind="stable")[:k]
    scores = [ClassScore(label=state.labels[i], class_id=int(i), probability=float(probabilities[i])) for i in top]
    manifest = state.model.manifest
    return ClassifyResponse(
        model=ModelRef(name=manifest.model.name, version=manifest.model.version),
        label=scores[0].label,
        class_id=scores[0].class_id,
        probability=scores[0].probability,
        top_k=scores,
        experts_used=row.experts_used,
        num_experts=state.model.num_experts,
        relative_compute=row.relative_compute,
        timing_ms=TimingMs(queue=row.queue_seconds * 1e3, inference=row.inference_seconds * 1e3, total=total_s * 1e3),
    )


def _model_summary(state: ServiceState) -> ModelSummary:
    manifest, cost = state.model.manifest, state.model.cost
    return ModelSummary(
        name=manifest.model.name,
        version=manifest.model.version,
        provider=state.model.provider,
        precision=manifest.precision,
        num_experts=manifest.cascade.num_experts,
        has_routers=manifest.cascade.has_routers,
        default_threshold=state.default_threshold,
        top_z=manifest.cascade.top_z,
        input=manifest.input.model_dump(),
        classes=[ClassSummary(**c.model_dump()) for c in manifest.classes],
        cost=CostSummary(
            trunk_macs=cost.trunk_macs,
            expert_macs=list(cost.expert_macs),
            router_macs=list(cost.router_macs),
            full_ensemble_macs=cost.full_ensemble_macs,
        ),
        evaluation=manifest.metrics.model_dump(),
    )


def _v2_metadata(state: ServiceState) -> V2ModelMetadata:
    manifest = state.model.manifest
    spec = manifest.input
    datatype = "FP16" if manifest.precision == "float16" else "FP32"
    return V2ModelMetadata(
        name=manifest.model.name,
        versions=[manifest.model.version],
        platform="onnxruntime_onnx",
        inputs=[V2Tensor(name="image", datatype=datatype, shape=[-1, spec.channels, spec.height, spec.width])],
        outputs=[V2Tensor(name="probabilities", datatype="FP32", shape=[-1, len(manifest.classes)])],
    )


# --------------------------------------------------------------------------------------------------------------
# Error handlers
# --------------------------------------------------------------------------------------------------------------


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        location = ".".join(str(p) for p in item.get("loc", ()) if p not in ("query", "body"))
        parts.append(f"{location or 'request'}: {item.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _register_error_handlers(app: FastAPI, settings: Settings) -> None:
    retry_after = {"Retry-After": str(settings.retry_after_s)}

    async def on_service_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, ServiceError)
        status = status_of(error)
        return error_response(status, error.code, str(error), retry_after if status == 503 else None)

    async def on_validation_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        return error_response(422, InvalidParameterError.code, _validation_message(error))

    async def on_http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, StarletteHTTPException)
        code = HTTP_ERROR_CODES.get(error.status_code, "http_error")
        message = error.detail if isinstance(error.detail, str) else str(error.detail)
        if error.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(error.status_code, code, message, error.headers)

    async def on_unexpected_error(request: Request, error: Exception) -> Response:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error")

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected_error)


# --------------------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------------------


def create_app(settings: Settings, *, model: OnnxModel | None = None) -> FastAPI:
    """Build the app; loads ``settings.model_dir`` unless a loaded ``model`` is given.

    Raises:
        ModelLoadError: the model folder cannot be served (raised here, before any socket is opened).
    """
    if model is None:
        model = load_model(
            settings.model_dir,
            provider=settings.provider,
            intra_op_threads=settings.intra_op_threads,
            inter_op_threads=settings.inter_op_threads,
        )
    state = ServiceState(settings, model)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.batcher.start()
        warming = asyncio.create_task(state.warm_up())
        try:
            yield
        finally:
            state.ready = False
            warming.cancel()
            await state.batcher.stop(settings.shutdown_timeout_s)

    app = FastAPIOffline(  # /docs and /redoc with locally served assets (no CDN)
        title="RIDE Serve",
        summary="Long-tailed image classification with an early-exit expert cascade.",
        version=model.manifest.model.version,
        lifespan=lifespan,
    )
    app.state.service = state
    _register_routes(app, state)
    _register_error_handlers(app, settings)
    routes = [route.path for route in app.routes if isinstance(route, APIRoute)]
    state.metrics.preinitialise_routes(routes)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics, routes=frozenset(routes))  # outermost: sees 413s
    return app


def _register_routes(app: FastAPI, state: ServiceState) -> None:
    model = state.model
    manifest = model.manifest

    @app.post(
        "/classify",
        response_model=ClassifyResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=IMAGE_REQUEST_BODY,
        summary="Classify one image (multipart field 'file', or the raw body with an image/* content type).",
    )
    async def classify(request: Request, params: Annotated[ClassifyParams, Query()]) -> Any:
        started = time.perf_counter()
        state.require_ready()
        max_experts = params.max_experts if params.max_experts is not None else model.num_experts
        if max_experts > model.num_experts:
            raise InvalidParameterError(f"max_experts: must be in 1..{model.num_experts}, got {max_experts}")
        threshold = params.threshold if params.threshold is not None else state.default_threshold
        image = state.decoder.open(await read_image_bytes(request))
        width, height = image.size
        if width * height <= INLINE_DECODE_PIXELS:
            pixels = state.decoder.to_array(image)
        else:
            pixels = await run_in_threadpool(state.decoder.to_array, image)
        row = await state.batcher.submit(pixels, threshold=threshold, max_experts=max_experts)
        total_s = time.perf_counter() - started
        body = _classify_response(state, row, params.top_k, total_s)
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

    @app.get(
        "/healthz",
        response_model=StatusResponse,
        responses=ERROR_RESPONSES,
        summary="Liveness: the process answers (503 only when warm-up failed and it never will be ready).",
    )
    async def healthz() -> Any:
        if state.failure is not None:
            raise NotReadyError(state.failure)
        return StatusResponse(status="alive")

    @app.get("/readyz", response_model=StatusResponse, responses=ERROR_RESPONSES, summary="Readiness: loaded and warm.")
    async def readyz() -> Any:
        state.require_ready()
        return StatusResponse(status="ready")

    @app.get("/v1/models", response_model=ModelsResponse, summary="The model served and the provider in use.")
    async def list_models() -> Any:
        return ModelsResponse(models=[_model_summary(state)])

    @app.get("/metrics", summary="Prometheus metrics (text exposition format).")
    async def metrics() -> Response:
        return Response(state.metrics.exposition(), media_type=EXPOSITION_CONTENT_TYPE)

    @app.get("/v2/health/live", response_model=V2Live, summary="KServe v2 liveness.")
    async def v2_live() -> Any:
        return V2Live(live=True)

    @app.get("/v2/health/ready", response_model=V2Ready, responses=ERROR_RESPONSES, summary="KServe v2 readiness.")
    async def v2_ready() -> Any:
        state.require_ready()
        return V2Ready(ready=True)

    def require_model(name: str) -> None:
        if name != manifest.model.name:
            raise ModelNotFoundError(f"unknown model {name!r}: this server serves {manifest.model.name!r}")

    @app.get(
        "/v2/models/{name}", response_model=V2ModelMetadata, responses=ERROR_RESPONSES, summary="KServe v2 metadata."
    )
    async def v2_model(name: str) -> Any:
        require_model(name)
        return _v2_metadata(state)

    @app.get(
        "/v2/models/{name}/ready", response_model=V2Ready, responses=ERROR_RESPONSES, summary="KServe v2 model ready."
    )
    async def v2_model_ready(name: str) -> Any:
        require_model(name)
        state.require_ready()
        return V2Ready(ready=True)
