"""Typed HTTP request and response models (they also make the OpenAPI document at /docs)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from cascade import Threshold


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable error name, e.g. invalid_image.")
    message: str = Field(description="What went wrong, for a person.")


class ErrorBody(BaseModel):
    """The body of every non-2xx reply."""

    error: ErrorDetail


class ClassifyParams(BaseModel):
    """Query parameters of POST /classify."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(5, ge=1, description="How many classes to list (capped at the number of classes).")
    threshold: Threshold | None = Field(
        None, description="Router threshold: continue to the next expert iff sigmoid >= threshold."
    )
    # E depends on the model served: the range is checked against it when the request runs (ServiceState).
    max_experts: int | None = Field(None, description="Run at most this many experts (1..E).")


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
    model: ModelRef
    label: str
    class_id: int
    probability: float
    top_k: list[ClassScore]
    experts_used: int
    num_experts: int
    relative_compute: float = Field(description="MACs spent on this image / MACs of running every expert and router.")
    timing_ms: TimingMs


class StatusResponse(BaseModel):
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


class ModelsResponse(BaseModel):
    models: list[ModelSummary]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
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
