"""Typed HTTP request and response models (they also make the OpenAPI document at /docs)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cascade import Threshold


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable error name, e.g. invalid_image.")
    message: str = Field(description="What went wrong, for a person.")
    request_id: str | None = Field(None, description="The request's X-Request-ID (the caller's, or generated).")


class ErrorBody(BaseModel):
    """The body of every non-2xx reply, except on /v2 routes (`V2ErrorBody`)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "code": "invalid_image",
                        "message": "row 1: not an image: no decoder recognises these bytes",
                        "request_id": "9f1c2b7e4d6a4f0e8b3a1c5d7e9f0a2b",
                    }
                }
            ]
        }
    )

    error: ErrorDetail


class ClassifyParams(BaseModel):
    """Query parameters of POST /classify."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(5, ge=1, description="How many classes to list (capped at the number of classes).")
    threshold: Threshold | None = Field(
        None, description="Router threshold: continue to the next expert iff sigmoid >= threshold."
    )
    target_compute: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Compute budget in (0, 1]: run at the operating point whose validation relative compute is the "
        "largest not above it (not with `threshold`; RIDE_DEFAULT_THRESHOLD, when set, overrides it).",
    )
    # E depends on the model served: the range is checked against it when the request runs (ServiceState).
    max_experts: int | None = Field(None, description="Run at most this many experts (1..E).")

    @model_validator(mode="after")
    def _threshold_or_budget(self) -> ClassifyParams:
        # Both would be a contradiction: serving one of them silently hides the client's mistake.
        if self.threshold is not None and self.target_compute is not None:
            raise ValueError("give threshold or target_compute, not both")
        return self


class ClassifyRouteParams(ClassifyParams):
    """Query parameters of POST /classify: the cascade's, and which model runs."""

    model: str | None = Field(
        None, description="The model to run (default: the default model, RIDE_DEFAULT_MODEL or the only one)."
    )
    version: str | None = Field(None, description="Its version (default: the latest loaded).")


CLASSIFY_EXAMPLE = {
    "model": {"name": "cifar10-lt-ride4", "version": "1"},
    "label": "ship",
    "class_id": 8,
    "probability": 0.93,
    "top_k": [
        {"label": "ship", "class_id": 8, "probability": 0.93},
        {"label": "airplane", "class_id": 0, "probability": 0.04},
    ],
    "experts_used": 1,
    "num_experts": 4,
    "relative_compute": 0.397,
    "timing_ms": {"queue": 0.4, "inference": 1.1, "total": 2.3},
}


class ModelRef(BaseModel):
    name: str
    version: str


class ClassScore(BaseModel):
    label: str
    class_id: int
    probability: float


class TimingMs(BaseModel):
    queue: float = Field(description="Waiting for the batch to start, ms.")
    inference: float = Field(description="The batch through the cascade, ms.")
    total: float = Field(description="The whole request in the server, ms.")


class ClassifyResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": CLASSIFY_EXAMPLE})

    model: ModelRef
    label: str
    class_id: int
    probability: float
    top_k: list[ClassScore]
    experts_used: int
    num_experts: int
    relative_compute: float = Field(description="MACs spent on this image / MACs of running every expert and router.")
    timing_ms: TimingMs


class ClassifyBatchResponse(BaseModel):
    """POST /classify with several files: one answer per file, in the order they were sent."""

    results: list[ClassifyResponse]


CLASSIFY_BATCH_EXAMPLE = {"results": [CLASSIFY_EXAMPLE, {**CLASSIFY_EXAMPLE, "label": "horse", "class_id": 7}]}


class StatusResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ready"}]})

    status: str


class ClassSummary(BaseModel):
    id: int
    name: str
    group: str
    train_count: int


class CostSummary(BaseModel):
    trunk_macs: int
    expert_macs: list[int]
    router_macs: list[int]
    full_ensemble_macs: int


class ModelSummary(BaseModel):
    name: str
    version: str
    provider: str = Field(description="The onnxruntime execution provider really in use.")
    precision: str
    num_experts: int
    has_routers: bool
    default_threshold: float = Field(description="Threshold used when a request gives none.")
    top_z: int | None
    input: dict[str, object]
    classes: list[ClassSummary]
    cost: CostSummary
    evaluation: dict[str, object] = Field(description="The manifest's metrics from the exporter's evaluation.")
    quantization: dict[str, object] | None = Field(
        None, description="int8 models: how they were quantized and calibrated, and their parity gate's figures."
    )


MODEL_SUMMARY_EXAMPLE = {
    "name": "cifar10-lt-ride4",
    "version": "1",
    "provider": "CPUExecutionProvider",
    "precision": "float32",
    "num_experts": 4,
    "has_routers": True,
    "default_threshold": 0.5,
    "top_z": 5,
    "input": {"height": 32, "width": 32, "channels": 3, "resize": "bilinear", "scale": 0.00392156862745098},
    "classes": [{"id": 0, "name": "airplane", "group": "many", "train_count": 5000}],
    "cost": {
        "trunk_macs": 7000000,
        "expert_macs": [10000000] * 4,
        "router_macs": [800] * 3,
        "full_ensemble_macs": 47002400,
    },
    "evaluation": {"accuracy": 0.5118},
    "quantization": None,
}


class ModelsResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"models": [MODEL_SUMMARY_EXAMPLE]}]})

    models: list[ModelSummary]


class V2Live(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"live": True}]})

    live: bool


class V2Ready(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"ready": True}]})

    ready: bool


class V2Tensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    """KServe v2 model metadata, with the protocol's optional ``parameters`` extension object."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[V2Tensor]
    outputs: list[V2Tensor]
    parameters: dict[str, object] = Field(
        description="precision (float32, float16, int8); for int8 also calibration and parity_gate."
    )


def _inline_refs(schema: Any, definitions: dict[str, Any]) -> Any:
    if isinstance(schema, dict):
        if "$ref" in schema:
            return _inline_refs(definitions[schema["$ref"].rsplit("/", 1)[-1]], definitions)
        return {key: _inline_refs(value, definitions) for key, value in schema.items() if key != "$defs"}
    if isinstance(schema, list):
        return [_inline_refs(item, definitions) for item in schema]
    return schema


def inline_json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with every referenced schema in place: a request body that an endpoint reads itself
    is given to OpenAPI by hand (``openapi_extra``), where pydantic's ``$defs`` would not resolve."""
    schema = model.model_json_schema()
    return _inline_refs(schema, schema.get("$defs", {}))
