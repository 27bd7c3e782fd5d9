"""float32 graphs -> int8 graphs, by onnxruntime's static quantization (QDQ format, per-channel weights).

Only the convolutional body is quantized (``Conv`` and the residual ``Add``): that is where the MACs are. The
cosine head (pooled feature, L2 normalisation, ``MatMul``, scale) stays float32, so logits and features leave
every graph in float32 at full resolution: the routers and the mean of the experts' logits see no 8-bit
rounding of their own. Activations are unsigned 8-bit per tensor, weights signed 8-bit per output channel, the
recommended CPU layout (``quantize_static``'s documentation); activation ranges are the min and max seen on the
calibration inputs. Weights use the reduced 7-bit range (``reduce_range``): x86 CPUs without VNNI (AVX2, AVX-512
before VNNI) multiply u8 x s8 pairs into int16 with saturation (``vpmaddubsw``), which full-range weights can
overflow; with 7-bit weights the int8 graphs compute the same on every x86 CPU, so the parity gate measured on
one machine holds on the others. (Measured on the bundled model: test accuracy within 0.15 points of full range.)

Routers are tiny (about a thousand MACs): an int8 router saves nothing measurable, and its 8-bit output would
move exit decisions near the threshold. Each router is quantized, then kept only if it decides exactly as the
float32 router on every calibration row (same float32 inputs, the manifest's default threshold); otherwise the
float32 router stays (:func:`decisions_moved`).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from cascade import continues
from export.manifest import (
    EXPERT_INPUT,
    ROUTER_FEATURE,
    ROUTER_MEAN_LOGITS,
    TRUNK_INPUT,
    GraphPrecision,
    Manifest,
)
from export.ort_model import OrtGraph, OrtModel

BODY_OP_TYPES = ("Conv", "Add")
ROUTER_OP_TYPES = ("Gemm",)
CALIBRATION_BATCH = 64
DEFAULT_CALIBRATION_IMAGES = 512
REDUCE_RANGE = True


class _Batches(CalibrationDataReader):
    """Feeds the calibration inputs to onnxruntime's calibrator in batches of :data:`CALIBRATION_BATCH` rows."""

    def __init__(self, inputs: dict[str, np.ndarray]) -> None:
        rows = len(next(iter(inputs.values())))
        self._feeds = iter(
            [
                {name: np.ascontiguousarray(value[start : start + CALIBRATION_BATCH]) for name, value in inputs.items()}
                for start in range(0, rows, CALIBRATION_BATCH)
            ]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


class _DropPreprocessingAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage() and "preprocess" not in record.getMessage()


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    # quantize_static logs (on the root logger) advice to run its shape pre-processing, which these graphs do not
    # need: their shapes are fully inferred at export and batch norm is already folded.
    advice = _DropPreprocessingAdvice()
    root = logging.getLogger()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def quantize_graph(source: Path, target: Path, inputs: dict[str, np.ndarray], op_types: tuple[str, ...]) -> None:
    """Write ``target``: ``source`` with ``op_types`` quantized, activation ranges calibrated on ``inputs``."""
    with _quiet_quantizer():
        quantize_static(
            str(source),
            str(target),
            _Batches(inputs),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(op_types),
            per_channel=True,
            reduce_range=REDUCE_RANGE,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            # MinMax keeps only each tensor's min and max per batch (reduction nodes in the calibration graph), so
            # memory stays small. (Its CalibMaxIntermediateOutputs option drops batches in onnxruntime 1.32: unused.)
            calibrate_method=CalibrationMethod.MinMax,
        )


def decisions_moved(float32_logits: np.ndarray, int8_logits: np.ndarray, threshold: float) -> int:
    """Rows whose exit decision (continue iff sigmoid(logit) >= threshold) differs between the two routers."""
    return int(np.count_nonzero(continues(float32_logits, threshold) != continues(int8_logits, threshold)))


@dataclass
class QuantizedGraphs:
    """What :func:`quantize_folder` wrote: each graph file's precision, and per router the calibration rows whose
    decision an int8 router moved."""

    precision: dict[str, GraphPrecision]
    router_decisions_moved: list[int]


def quantize_folder(
    source: Path, manifest: Manifest, target: Path, calibration: np.ndarray, *, threshold: float
) -> QuantizedGraphs:
    """Quantize the graphs of the float32 model folder ``source`` into ``target`` (graph files only).

    ``calibration`` holds normalised training images ``[n, 3, H, W]``; the experts are calibrated on the float32
    trunk's output for them, the routers on the float32 experts' outputs (every expert on every row).
    """
    graphs = manifest.graphs
    reference = OrtModel(source, graphs)
    precision: dict[str, GraphPrecision] = {}
    quantize_graph(source / graphs.trunk.file, target / graphs.trunk.file, {TRUNK_INPUT: calibration}, BODY_OP_TYPES)
    precision[graphs.trunk.file] = "int8"
    run = reference.all_experts(calibration)
    for spec in graphs.experts:
        quantize_graph(source / spec.file, target / spec.file, {EXPERT_INPUT: run.shared}, BODY_OP_TYPES)
        precision[spec.file] = "int8"
    moved = []
    for k, spec in enumerate(graphs.routers, start=1):
        inputs = {
            ROUTER_MEAN_LOGITS: run.logits[:, :k].mean(axis=1, dtype=np.float64).astype(np.float32),
            ROUTER_FEATURE: run.features[:, k - 1],
        }
        quantize_graph(source / spec.file, target / spec.file, inputs, ROUTER_OP_TYPES)
        (int8_logits,) = OrtGraph(target / spec.file, spec)(**inputs)
        (float32_logits,) = OrtGraph(source / spec.file, spec)(**inputs)
        moved.append(decisions_moved(float32_logits, int8_logits, threshold))
        if moved[-1]:
            shutil.copyfile(source / spec.file, target / spec.file)
        precision[spec.file] = "float32" if moved[-1] else "int8"
    return QuantizedGraphs(precision, moved)
