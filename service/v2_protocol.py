"""Open Inference Protocol v2 (KServe v2, Triton's HTTP/REST protocol): its schemas, handlers and routes.

The model takes exactly one of two inputs per request, one row per image:

- ``image``: ``BYTES`` ``[N]`` (or ``[N, 1]``), each element an encoded image (JPEG, PNG, ...); in JSON ``data``
  each element is the image's base64 (JSON strings cannot carry raw bytes), in binary the raw bytes;
- ``pixels``: ``FP32`` ``[N, 3, H, W]``, preprocessed as the manifest's input recipe says (resized, scaled,
  normalised), the trunk's input.

Outputs, all by default, any subset on request: ``probabilities`` ``FP32 [N, C]``, ``label`` ``BYTES [N]``,
``experts_used`` ``INT32 [N]``, ``relative_compute`` ``FP32 [N]``. Request ``parameters``: ``threshold``,
``max_experts`` (as /classify's query), ``classification`` (k: ``probabilities`` as ``"score:index:label"``
strings, the classification extension; also an output's own parameter, as Triton has it) and
``binary_data_output``. Extensions: ``classification`` and ``binary_tensor_data`` (both ways), and
``model_repository`` with the admin routes on (`service.repository_routes`). Errors on every /v2 route have
the protocol's body ``{"error": "<message>"}`` (`service.http_errors`); bad input is a 400.
"""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cascade import Threshold
from service import errors
from service.access import require_token
from service.batcher import RowResult
from service.http_errors import statuses
from service.model_version import ModelVersion
from service.responses import v2_parameters
from service.rows import check_row_count, decode_rows, observe_rows, queue_rows
from service.schemas import ClassifyParams, V2Live, V2Ready, inline_json_schema
from service.state import ServiceState, StateDep
from service.v2_tensors import (
    HEADER_LENGTH,
    BinarySection,
    base64_elements,
    decompress,
    encode_binary,
    flatten,
    float_elements,
    split_body,
    split_bytes_elements,
)

SERVER_NAME = "ride-serve"
EXTENSIONS = ("classification", "binary_tensor_data")
IMAGE_INPUT, PIXELS_INPUT = "image", "pixels"
# Output name -> datatype; shapes are [N, C] for probabilities, [N] for the others.
OUTPUTS = {"probabilities": "FP32", "label": "BYTES", "experts_used": "INT32", "relative_compute": "FP32"}
CLASSIFIED_OUTPUT = "probabilities"
INFER_PATHS = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")
# What an inference can answer besides 200 (readiness and the queue included).
INFER_ERRORS = (
    errors.InvalidInputError,
    errors.InvalidImageError,
    errors.UnauthorizedError,
    errors.ModelNotFoundError,
    errors.PayloadTooLargeError,
    errors.ImageTooLargeError,
    errors.TooManyRowsError,
    errors.UnsupportedMediaTypeError,
    errors.OverloadedError,
    errors.NotReadyError,
)
MAX_PROBLEMS_LISTED = 3


class V2ErrorBody(BaseModel):
    """The body of every non-2xx reply on a /v2 route."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"error": "input 'image' has datatype FP32, expected BYTES"}]}
    )

    error: str


class V2ServerMetadata(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"name": "ride-serve", "version": "0.1.0", "extensions": list(EXTENSIONS)}]}
    )

    name: str
    version: str
    extensions: list[str]


class V2Tensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    """Model metadata, with the protocol's optional ``parameters`` object."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "cifar10-lt-ride4",
                    "versions": ["1"],
                    "platform": "onnxruntime_onnx",
                    "inputs": [
                        {"name": "image", "datatype": "BYTES", "shape": [-1]},
                        {"name": "pixels", "datatype": "FP32", "shape": [-1, 3, 32, 32]},
                    ],
                    "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
                    "parameters": {"precision": "float32"},
                }
            ]
        }
    )

    name: str
    versions: list[str]
    platform: str
    inputs: list[V2Tensor]
    outputs: list[V2Tensor]
    parameters: dict[str, object] = Field(
        description="precision (float32, float16, int8); for int8 also calibration and parity_gate."
    )


class V2RequestInput(BaseModel):
    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = Field(None, description="Row-major elements, flat or nested; absent with binary_data_size.")


class V2RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class V2InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[V2RequestInput]
    outputs: list[V2RequestOutput] | None = None


class V2ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class V2InferenceResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_name": "cifar10-lt-ride4",
                    "model_version": "1",
                    "id": "42",
                    "outputs": [
                        {
                            "name": "probabilities",
                            "shape": [1, 2],
                            "datatype": "BYTES",
                            "data": ["0.93:8:ship", "0.04:0:airplane"],
                        },
                        {"name": "experts_used", "shape": [1], "datatype": "INT32", "data": [1]},
                    ],
                }
            ]
        }
    )

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2ResponseOutput]


class V2Parameters(BaseModel):
    """The request parameters this server reads; others (Triton's priority, timeout, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    threshold: Threshold | None = None
    max_experts: int | None = None
    classification: int | None = Field(None, ge=1)
    binary_data_output: bool = False


class V2OutputParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")

    binary_data: bool | None = None
    classification: int | None = Field(None, ge=1)


def _problems(error: ValidationError, where: str) -> str:
    parts = []
    for item in error.errors()[:MAX_PROBLEMS_LISTED]:
        location = ".".join(str(p) for p in item["loc"])
        parts.append(f"{location or where}: {item['msg']}")
    return f"{where}: " + "; ".join(parts)


def _validated(model: type[BaseModel], value: object, where: str) -> Any:
    try:
        return model.model_validate(value if value is not None else {})
    except ValidationError as error:
        raise errors.InvalidInputError(_problems(error, where)) from None


def server_version() -> str:
    try:
        return importlib.metadata.version(SERVER_NAME)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def model_metadata(served: ModelVersion, versions: Sequence[str]) -> V2ModelMetadata:
    """``served``'s metadata; ``versions``: every loaded version of its model."""
    manifest = served.model.manifest
    spec = manifest.input
    classes = len(manifest.classes)
    return V2ModelMetadata(
        name=served.name,
        versions=list(versions),
        platform="onnxruntime_onnx",
        inputs=[
            V2Tensor(name=IMAGE_INPUT, datatype="BYTES", shape=[-1]),
            V2Tensor(name=PIXELS_INPUT, datatype="FP32", shape=[-1, spec.channels, spec.height, spec.width]),
        ],
        outputs=[
            V2Tensor(name=name, datatype=datatype, shape=[-1, classes] if name == CLASSIFIED_OUTPUT else [-1])
            for name, datatype in OUTPUTS.items()
        ],
        parameters=v2_parameters(manifest),
    )


@dataclass(frozen=True)
class OutputRequest:
    name: str
    binary: bool
    classification: int | None  # k: top-k "score:index:label" strings instead of probabilities


@dataclass(frozen=True)
class InferCall:
    """What a valid inference request asks for."""

    id: str | None
    images: list[bytes] | None  # encoded images (the image input)
    pixels: np.ndarray | None  # [N, 3, H, W] (the pixels input)
    threshold: float
    max_experts: int
    outputs: list[OutputRequest]


def _cascade_settings(served: ModelVersion, parameters: V2Parameters) -> tuple[float, int]:
    try:
        return served.cascade_settings(
            ClassifyParams(threshold=parameters.threshold, max_experts=parameters.max_experts)
        )
    except errors.InvalidParameterError as error:
        raise errors.InvalidInputError(f"parameters.max_experts: {error}") from None


def _requested_outputs(request: V2InferenceRequest, parameters: V2Parameters) -> list[OutputRequest]:
    wanted = request.outputs if request.outputs is not None else [V2RequestOutput(name=n) for n in OUTPUTS]
    names = [output.name for output in wanted]
    unknown = [name for name in names if name not in OUTPUTS]
    if unknown:
        raise errors.InvalidInputError(f"unknown output {unknown[0]!r}: this model's outputs are {', '.join(OUTPUTS)}")
    if len(set(names)) != len(names):
        raise errors.InvalidInputError("an output is requested more than once")
    chosen = []
    for output in wanted:
        own = _validated(V2OutputParameters, output.parameters, f"output {output.name!r} parameters")
        classification = own.classification
        if classification is None and output.name == CLASSIFIED_OUTPUT:
            classification = parameters.classification
        if classification is not None and output.name != CLASSIFIED_OUTPUT:
            raise errors.InvalidInputError(
                f"classification applies to output {CLASSIFIED_OUTPUT!r}, not {output.name!r}"
            )
        binary = own.binary_data if own.binary_data is not None else parameters.binary_data_output
        chosen.append(OutputRequest(output.name, binary, classification))
    return chosen


def _input_data(tensor: V2RequestInput, section: BinarySection) -> bytes | list[object]:
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is not None:
        if tensor.data is not None:
            raise errors.InvalidInputError(f"input {tensor.name!r} has both data and binary_data_size")
        return section.take(size, tensor.name)
    if tensor.data is None:
        raise errors.InvalidInputError(f"input {tensor.name!r} has neither data nor binary_data_size")
    return flatten(tensor.data, tensor.name)


def _check_datatype(tensor: V2RequestInput, expected: str) -> None:
    if tensor.datatype != expected:
        raise errors.InvalidInputError(f"input {tensor.name!r} has datatype {tensor.datatype}, expected {expected}")


def _image_rows(tensor: V2RequestInput, data: bytes | list[object], limit: int) -> list[bytes]:
    _check_datatype(tensor, "BYTES")
    if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
        raise errors.InvalidInputError(f"input {tensor.name!r} has shape {tensor.shape}, expected [N] or [N, 1]")
    rows = tensor.shape[0]
    check_row_count(rows, limit)
    images = split_bytes_elements(data, tensor.name) if isinstance(data, bytes) else base64_elements(data, tensor.name)
    if len(images) != rows:
        raise errors.InvalidInputError(f"input {tensor.name!r}: {len(images)} elements for shape {tensor.shape}")
    return images


def _pixel_rows(tensor: V2RequestInput, data: bytes | list[object], served: ModelVersion) -> np.ndarray:
    _check_datatype(tensor, "FP32")
    spec = served.model.manifest.input
    expected = [spec.channels, spec.height, spec.width]
    if len(tensor.shape) != 4 or tensor.shape[1:] != expected:
        raise errors.InvalidInputError(
            f"input {tensor.name!r} has shape {tensor.shape}, expected [N, {expected[0]}, {expected[1]}, {expected[2]}]"
        )
    check_row_count(tensor.shape[0], served.max_request_rows)
    values = float_elements(data, int(np.prod(tensor.shape)), tensor.name)
    return values.reshape(tensor.shape)


def parse_infer_request(head: object, binary: bytes, served: ModelVersion) -> InferCall:
    """Validate an inference request (its JSON object and binary section) against this model.

    Raises:
        InvalidInputError: anything that does not fit the protocol or the model.
        TooManyRowsError: more rows than a request may carry.
    """
    request = _validated(V2InferenceRequest, head, "inference request")
    parameters = _validated(V2Parameters, request.parameters, "parameters")
    names = [tensor.name for tensor in request.inputs]
    unknown = [name for name in names if name not in (IMAGE_INPUT, PIXELS_INPUT)]
    if unknown:
        raise errors.InvalidInputError(
            f"unknown input {unknown[0]!r}: send {IMAGE_INPUT!r} (BYTES, encoded images) or {PIXELS_INPUT!r} (FP32)"
        )
    if len(names) != 1:
        found = "no input" if not names else f"inputs {', '.join(names)}"
        raise errors.InvalidInputError(
            f"missing input: send exactly one of {IMAGE_INPUT!r} (BYTES, encoded images) or {PIXELS_INPUT!r} (FP32 "
            f"pixels), got {found}"
        )
    outputs = _requested_outputs(request, parameters)
    threshold, max_experts = _cascade_settings(served, parameters)
    (tensor,) = request.inputs
    section = BinarySection(binary)
    data = _input_data(tensor, section)
    section.check_consumed()
    if tensor.name == IMAGE_INPUT:
        images, pixels = _image_rows(tensor, data, served.max_request_rows), None
    else:
        images, pixels = None, _pixel_rows(tensor, data, served)
    return InferCall(request.id, images, pixels, threshold, max_experts, outputs)


def _classifications(probabilities: np.ndarray, k: int, labels: Sequence[str]) -> list[bytes]:
    """Row-major ``[N, k]`` "score:index:label" elements, highest score first."""
    k = min(k, probabilities.shape[1])
    elements = []
    for row in probabilities:
        for index in np.argsort(-row, kind="stable")[:k]:
            elements.append(f"{row[index]:f}:{index}:{labels[index]}".encode())
    return elements


def _output_values(
    output: OutputRequest, rows: Sequence[RowResult], labels: Sequence[str]
) -> tuple[str, list[int], np.ndarray | list[bytes]]:
    """(datatype, shape, values) of one output over the rows."""
    n = len(rows)
    if output.name == CLASSIFIED_OUTPUT:
        probabilities = np.stack([row.probabilities for row in rows]).astype(np.float32)
        if output.classification is not None:
            k = min(output.classification, probabilities.shape[1])
            return "BYTES", [n, k], _classifications(probabilities, k, labels)
        return "FP32", list(probabilities.shape), probabilities
    if output.name == "label":
        return "BYTES", [n], [labels[int(np.argmax(row.probabilities))].encode() for row in rows]
    if output.name == "experts_used":
        return "INT32", [n], np.array([row.experts_used for row in rows], dtype=np.int32)
    return "FP32", [n], np.array([row.relative_compute for row in rows], dtype=np.float32)


def _json_data(values: np.ndarray | list[bytes]) -> list[Any]:
    if isinstance(values, np.ndarray):
        return values.reshape(-1).tolist()
    return [value.decode() for value in values]


def infer_response(served: ModelVersion, call: InferCall, rows: Sequence[RowResult]) -> Response:
    """The JSON response, followed by the binary outputs' data when any output is binary."""
    outputs, chunks = [], []
    for output in call.outputs:
        datatype, shape, values = _output_values(output, rows, served.labels)
        if output.binary:
            chunk = encode_binary(values)
            chunks.append(chunk)
            outputs.append(
                V2ResponseOutput(
                    name=output.name, shape=shape, datatype=datatype, parameters={"binary_data_size": len(chunk)}
                )
            )
        else:
            outputs.append(V2ResponseOutput(name=output.name, shape=shape, datatype=datatype, data=_json_data(values)))
    body = V2InferenceResponse(model_name=served.name, model_version=served.version, id=call.id, outputs=outputs)
    head = body.model_dump_json(exclude_none=True).encode()
    if not chunks:
        return Response(head, media_type="application/json")
    return Response(
        head + b"".join(chunks),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(head))},
    )


async def run_inference(request: Request, state: ServiceState, name: str, version: str | None) -> Response:
    """One inference request, from its body to its response, on the version it resolved at its start."""
    started = time.perf_counter()
    with state.table.use(name, version) as served:
        state.require_warm()
        return await _run_inference(request, served, started)


async def _run_inference(request: Request, served: ModelVersion, started: float) -> Response:
    with served.admission.admit():  # before the body is read, as /classify
        max_body_bytes = served.settings.max_body_bytes
        body = decompress(await request.body(), request.headers.get("content-encoding"), max_body_bytes)
        head, binary = split_body(body, request.headers.get(HEADER_LENGTH))
        call = parse_infer_request(head, binary, served)
        if call.images is not None:
            images = await decode_rows(call.images, served.decoder, served.decode_pool)
        else:
            assert call.pixels is not None
            images = list(call.pixels)
        queued = queue_rows(served, images, threshold=call.threshold, max_experts=call.max_experts)
    rows = await queued.results(request.receive)
    observe_rows(served, rows, images, call.threshold)
    response = infer_response(served, call, rows)
    response.headers["Server-Timing"] = f"total;dur={(time.perf_counter() - started) * 1e3:.3f}"
    return response


async def infer(request: Request, name: str, state: StateDep) -> Response:
    return await run_inference(request, state, name, None)


async def infer_version(request: Request, name: str, version: str, state: StateDep) -> Response:
    return await run_inference(request, state, name, version)


async def server_metadata(state: StateDep) -> V2ServerMetadata:
    # The repository extension's routes exist only as admin routes (`service.repository_routes`).
    extensions = [*EXTENSIONS, "model_repository"] if state.settings.admin_routes else list(EXTENSIONS)
    return V2ServerMetadata(name=SERVER_NAME, version=server_version(), extensions=extensions)


async def live() -> V2Live:
    return V2Live(live=True)


async def ready(state: StateDep) -> V2Ready:
    state.require_ready()
    return V2Ready(ready=True)


def _metadata(state: ServiceState, name: str, version: str | None) -> V2ModelMetadata:
    served = state.table.resolve(name, version)
    return model_metadata(served, list(state.table.versions(name)))


async def model(name: str, state: StateDep) -> V2ModelMetadata:
    return _metadata(state, name, None)


async def model_version(name: str, version: str, state: StateDep) -> V2ModelMetadata:
    return _metadata(state, name, version)


async def model_ready(name: str, state: StateDep) -> V2Ready:
    state.table.resolve(name)
    state.require_ready(default_model=False)
    return V2Ready(ready=True)


async def model_version_ready(name: str, version: str, state: StateDep) -> V2Ready:
    state.table.resolve(name, version)
    state.require_ready(default_model=False)
    return V2Ready(ready=True)


class V2LoadedModel(BaseModel):
    name: str
    versions: list[str] = Field(description="Every loaded version, oldest first; the last serves unversioned routes.")


class V2Models(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"models": [{"name": "cifar10-lt-ride4", "versions": ["1", "2"]}]}]}
    )

    default_model: str | None = Field(description="The model the unnamed routes (/classify, /models) serve.")
    models: list[V2LoadedModel]


async def list_models(state: StateDep) -> V2Models:
    models = [V2LoadedModel(name=name, versions=list(state.table.versions(name))) for name in state.table.names()]
    return V2Models(default_model=state.table.default_name, models=models)


INFER_EXAMPLE = {
    "id": "42",
    "parameters": {"threshold": 0.5, "classification": 3},
    "inputs": [{"name": IMAGE_INPUT, "shape": [1], "datatype": "BYTES", "data": ["<base64 of a JPEG or PNG>"]}],
    "outputs": [{"name": "probabilities"}, {"name": "experts_used"}],
}


def infer_request_body() -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": inline_json_schema(V2InferenceRequest), "example": INFER_EXAMPLE},
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": f"Binary tensor data extension: the JSON object ({HEADER_LENGTH} bytes long), "
                    "then each binary input's bytes.",
                },
            },
        }
    }


def v2_error_responses(*raised: type[errors.ServiceError]) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": V2ErrorBody} for status in statuses(*raised)}


def add_v2_routes(app: FastAPI) -> None:
    """The Open Inference Protocol's HTTP/REST routes."""
    not_found = v2_error_responses(errors.ModelNotFoundError)
    app.add_api_route(
        "/v2", server_metadata, response_model=V2ServerMetadata, summary="Server metadata and extensions."
    )
    app.add_api_route("/v2/health/live", live, response_model=V2Live, summary="Server liveness.")
    app.add_api_route(
        "/v2/health/ready",
        ready,
        response_model=V2Ready,
        responses=v2_error_responses(errors.NotReadyError),
        summary="Server readiness (503 while warming up or shutting down).",
    )
    app.add_api_route(
        "/v2/models",
        list_models,
        response_model=V2Models,
        summary="Every loaded model and its versions (not part of the protocol; its repository index lists all).",
    )
    handlers = {
        "/v2/models/{name}": (model, model_ready, infer),
        "/v2/models/{name}/versions/{version}": (model_version, model_version_ready, infer_version),
    }
    for prefix, (metadata_handler, ready_handler, infer_handler) in handlers.items():
        app.add_api_route(
            prefix, metadata_handler, response_model=V2ModelMetadata, responses=not_found, summary="Model metadata."
        )
        app.add_api_route(
            f"{prefix}/ready",
            ready_handler,
            response_model=V2Ready,
            responses=v2_error_responses(errors.ModelNotFoundError, errors.NotReadyError),
            summary="Model readiness.",
        )
        app.add_api_route(
            f"{prefix}/infer",
            infer_handler,
            methods=["POST"],
            response_model=V2InferenceResponse,
            responses=v2_error_responses(*INFER_ERRORS),
            openapi_extra=infer_request_body(),
            dependencies=[Depends(require_token)],
            summary="Classify N images (BYTES) or N preprocessed pixel rows (FP32) through the cascade.",
        )
