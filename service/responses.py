"""Typed response bodies built from the loaded model and a request's result."""

from __future__ import annotations

import numpy as np

from export.manifest import Manifest
from service.batcher import RowResult
from service.model_version import ModelVersion
from service.schemas import (
    ClassifyResponse,
    ClassScore,
    ClassSummary,
    CostSummary,
    ModelRef,
    ModelSummary,
    TimingMs,
)


def classify_response(served: ModelVersion, row: RowResult, top_k: int, total_s: float) -> ClassifyResponse:
    """One image's answer: the ``top_k`` classes, the experts it used and where its time went."""
    probabilities = row.probabilities
    k = min(top_k, probabilities.shape[0])
    top = np.argsort(-probabilities, kind="stable")[:k]
    scores = [ClassScore(label=served.labels[i], class_id=int(i), probability=float(probabilities[i])) for i in top]
    return ClassifyResponse(
        model=ModelRef(name=served.name, version=served.version),
        label=scores[0].label,
        class_id=scores[0].class_id,
        probability=scores[0].probability,
        top_k=scores,
        experts_used=row.experts_used,
        num_experts=served.model.num_experts,
        relative_compute=row.relative_compute,
        timing_ms=TimingMs(queue=row.queue_seconds * 1e3, inference=row.inference_seconds * 1e3, total=total_s * 1e3),
    )


def model_summary(served: ModelVersion) -> ModelSummary:
    """The manifest's description of a loaded model version, with the provider in use and its serving threshold."""
    manifest, cost = served.model.manifest, served.model.cost
    return ModelSummary(
        name=served.name,
        version=served.version,
        provider=served.model.provider,
        precision=manifest.precision,
        num_experts=manifest.cascade.num_experts,
        has_routers=manifest.cascade.has_routers,
        default_threshold=served.default_threshold,
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
        quantization=manifest.quantization.model_dump() if manifest.quantization is not None else None,
    )


def v2_parameters(manifest: Manifest) -> dict[str, object]:
    """The model's precision and, for int8, what its calibration and parity gate were."""
    parameters: dict[str, object] = {"precision": manifest.precision}
    quantization = manifest.quantization
    if quantization is not None:
        parameters["calibration"] = quantization.calibration.model_dump()
        parameters["parity_gate"] = quantization.parity_gate.model_dump()
        parameters["graphs"] = dict(quantization.graphs)
    return parameters
