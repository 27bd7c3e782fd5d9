"""KServe v1 (the TensorFlow Serving-style data plane): its schemas, handlers and routes.

``GET /v1/models`` lists the loaded models' names, ``GET /v1/models/{name}`` says whether one is ready, and
``POST /v1/models/{name}:predict`` takes ``{"instances": [{"image_bytes": {"b64": "<base64>"}}, ...]}`` (the
``_bytes`` + ``b64`` convention for binary data in JSON) and answers ``{"predictions": [...]}``, one per instance,
in order, each as /classify's answer, from the model's latest version. ``top_k``, ``threshold`` and
``max_experts`` are query parameters, as for /classify. Errors have the service's own body (KServe v1 defines none).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service import errors
from service.access import require_token
from service.http_errors import error_responses
from service.model_version import ModelVersion
from service.responses import classify_response
from service.rows import check_row_count, decode_rows, observe_rows, queue_rows
from service.schemas import CLASSIFY_EXAMPLE, ClassifyParams, ClassifyResponse, inline_json_schema
from service.state import StateDep

PREDICT_ROUTE = "/v1/models/{name}:predict"
PREDICT_ERRORS = (
    errors.InvalidInputError,
    errors.InvalidImageError,
    errors.UnauthorizedError,
    errors.ModelNotFoundError,
    errors.PayloadTooLargeError,
    errors.ImageTooLargeError,
    errors.TooManyRowsError,
    errors.InvalidParameterError,
    errors.OverloadedError,
    errors.NotReadyError,
)


class V1Models(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"models": ["cifar10-lt-ride4"]}]})

    models: list[str]


class V1ModelStatus(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "cifar10-lt-ride4", "ready": True}]})

    name: str
    ready: bool


class V1Base64(BaseModel):
    model_config = ConfigDict(extra="forbid")

    b64: str = Field(description="The encoded image (JPEG, PNG, ...) in base64.")


class V1Instance(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_bytes: V1Base64


class V1PredictRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"example": {"instances": [{"image_bytes": {"b64": "<base64 of a JPEG or PNG>"}}]}}
    )

    instances: list[V1Instance]


class V1PredictResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {"predictions": [CLASSIFY_EXAMPLE]}})

    predictions: list[ClassifyResponse]


def parse_instances(body: bytes) -> list[bytes]:
    """The encoded images of a predict request, in order.

    Raises:
        InvalidInputError: not JSON, not the instances shape, or base64 that does not decode (the row is named).
    """
    try:
        parsed: Any = json.loads(body)
    except (ValueError, RecursionError) as error:
        raise errors.InvalidInputError(f"the predict request is not valid JSON: {str(error)[:200]}") from None
    if isinstance(parsed, dict) and isinstance(parsed.get("instances"), list):
        for row, instance in enumerate(parsed["instances"]):
            try:
                V1Instance.model_validate(instance)
            except ValidationError:
                raise errors.InvalidInputError(
                    f'row {row}: an instance must be {{"image_bytes": {{"b64": "<base64 of the image>"}}}}'
                ) from None
    try:
        request = V1PredictRequest.model_validate(parsed)
    except ValidationError:
        raise errors.InvalidInputError('the predict request must be {"instances": [...]}') from None
    images = []
    for row, instance in enumerate(request.instances):
        try:
            images.append(base64.b64decode(instance.image_bytes.b64, validate=True))
        except (binascii.Error, ValueError) as error:
            raise errors.InvalidInputError(f"row {row}: image_bytes.b64 is not valid base64 ({error})") from None
    return images


async def list_models(state: StateDep) -> V1Models:
    return V1Models(models=state.table.names())


async def model_status(name: str, state: StateDep) -> V1ModelStatus:
    state.table.resolve(name)
    state.require_ready(default_model=False)
    return V1ModelStatus(name=name, ready=True)


async def predict(request: Request, name: str, state: StateDep, params: Annotated[ClassifyParams, Query()]) -> Response:
    started = time.perf_counter()
    with state.table.use(name) as served:
        state.require_warm()
        return await _predict(request, served, params, started)


async def _predict(request: Request, served: ModelVersion, params: ClassifyParams, started: float) -> Response:
    threshold, max_experts = served.cascade_settings(params)
    with served.admission.admit():
        instances = parse_instances(await request.body())
        check_row_count(len(instances), served.max_request_rows)
        images = await decode_rows(instances, served.decoder, served.decode_pool)
        queued = queue_rows(served, images, threshold=threshold, max_experts=max_experts)
    rows = await queued.results(request.receive)
    observe_rows(served, rows, images, threshold)
    total_s = time.perf_counter() - started
    body = V1PredictResponse(predictions=[classify_response(served, row, params.top_k, total_s) for row in rows])
    return Response(body.model_dump_json(), media_type="application/json")


def add_v1_routes(app: FastAPI) -> None:
    """KServe v1's routes."""
    app.add_api_route("/v1/models", list_models, response_model=V1Models, summary="KServe v1: the models served.")
    app.add_api_route(
        "/v1/models/{name}",
        model_status,
        response_model=V1ModelStatus,
        responses=error_responses(errors.ModelNotFoundError, errors.NotReadyError),
        summary="KServe v1: model readiness (503 while warming up or shutting down).",
    )
    schema = inline_json_schema(V1PredictRequest)
    app.add_api_route(
        PREDICT_ROUTE,
        predict,
        methods=["POST"],
        response_model=V1PredictResponse,
        responses=error_responses(*PREDICT_ERRORS),
        dependencies=[Depends(require_token)],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": schema, "example": schema["example"]}},
            }
        },
        summary="KServe v1: classify the instances (base64 images), one prediction each.",
    )
