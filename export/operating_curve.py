"""The validation accuracy/compute curve that a model folder carries (manifest format 3, `OperatingCurve`).

The exported graphs run the trunk and every expert once on the validation split, then the cascade
(`cascade.run_cascade`, the service's own rule) is replayed on those outputs for every threshold of a sweep,
routers evaluated on the rows that reach them, as the service runs them. Each row's answer depends only on its
own outputs, so the replay gives what serving the split at that threshold gives. The sweep is training's (a
0.01 grid plus the percentiles of the router probabilities on the split, `training.curve.sweep_thresholds`)
and the manifest's default threshold, all with every expert allowed. The service picks its operating points
from this curve; the test split is never used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cascade import CostModel, run_cascade, sigmoid
from export.manifest import FORMAT_VERSION, GROUPS, Manifest, OperatingCurve, OperatingPoint
from export.ort_model import OrtModel

Log = Callable[[str], None]


class _RecordedGraphs:
    """`cascade.CascadeGraphs` over the trunk and experts run once on every row; routers run live. The
    cascade's "images" are row numbers."""

    def __init__(self, model: OrtModel, images: np.ndarray, batch_size: int = 256) -> None:
        self._model = model
        logits, features = [], []
        for start in range(0, len(images), batch_size):
            shared = model.trunk(images[start : start + batch_size])
            outputs = [model.expert(k, shared) for k in range(1, model.num_experts + 1)]
            logits.append(np.stack([o[0] for o in outputs], axis=1))
            features.append(np.stack([o[1] for o in outputs], axis=1))
        self._logits = np.concatenate(logits)
        self._features = np.concatenate(features)

    @property
    def rows(self) -> np.ndarray:
        """Every row: the cascade's input for the whole split."""
        return np.arange(len(self._logits))

    @property
    def num_experts(self) -> int:
        return self._model.num_experts

    @property
    def has_routers(self) -> bool:
        return self._model.has_routers

    @property
    def cost(self) -> CostModel:
        return self._model.cost

    def trunk(self, rows: np.ndarray) -> np.ndarray:
        return rows

    def expert(self, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._logits[rows, k - 1], self._features[rows, k - 1]

    def router(self, k: int, mean_logits: np.ndarray, feature: np.ndarray) -> np.ndarray:
        return self._model.router(k, mean_logits, feature)


def _group_accuracy(correct: np.ndarray, labels: np.ndarray, groups: Sequence[str], group: str) -> float | None:
    """Mean of the per-class accuracies of ``group``'s classes that have validation images (None: none)."""
    members = [c for c, g in enumerate(groups) if g == group and (labels == c).any()]
    if not members:
        return None
    return float(np.mean([correct[labels == c].mean() for c in members]))


def _point(graphs: _RecordedGraphs, threshold: float, labels: np.ndarray, groups: Sequence[str]) -> OperatingPoint:
    result = run_cascade(graphs, graphs.rows, thresholds=threshold, max_experts=graphs.num_experts)
    correct = result.logits.argmax(axis=1) == labels
    accuracy = {group: _group_accuracy(correct, labels, groups, group) for group in GROUPS}
    return OperatingPoint(
        threshold=threshold,
        relative_compute=float(result.relative_compute.mean()),
        mean_experts_used=float(result.experts_used.mean()),
        accuracy=float(correct.mean()),
        **accuracy,
    )


def sweep(graphs: _RecordedGraphs, default_threshold: float) -> list[float]:
    """Training's sweep on these rows, plus the default threshold, sorted."""
    from training.curve import sweep_thresholds  # torch: the exporter's environment, never the service's

    router_logits = run_cascade(graphs, graphs.rows, thresholds=0.0, max_experts=graphs.num_experts).router_logits
    values = {value for value, _ in sweep_thresholds(sigmoid(router_logits).reshape(-1))}
    return sorted(values | {float(default_threshold)})


def measure_curve(
    folder: Path, manifest: Manifest, images: np.ndarray, labels: np.ndarray, *, split: str = "validation"
) -> OperatingCurve | None:
    """The curve of the graphs in ``folder`` on normalised ``images`` with ``labels``; None without routers (one
    operating point only: every expert runs)."""
    if not manifest.cascade.has_routers:
        return None
    graphs = _RecordedGraphs(OrtModel(folder, manifest.graphs), images)
    groups = [c.group for c in manifest.classes]
    labels = np.asarray(labels)
    thresholds = sweep(graphs, manifest.cascade.default_threshold)
    return OperatingCurve(
        split=split, num_images=len(labels), points=[_point(graphs, t, labels, groups) for t in thresholds]
    )


def with_curve(manifest: Manifest, curve: OperatingCurve | None) -> Manifest:
    """``manifest`` in the current format, carrying ``curve``."""
    return manifest.model_copy(update={"format_version": FORMAT_VERSION, "operating_curve": curve})
