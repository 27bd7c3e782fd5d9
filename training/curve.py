"""The accuracy-compute curve of a routed checkpoint and the choice of its decision threshold.

The service's cascade is replayed (`training.replay`) on per-expert outputs predicted once, for every threshold
of a sweep and every expert limit 1..E. Thresholds are a fine grid 0, 0.01, ..., 1 plus the percentiles of the
router probabilities on the split (where the decisions actually change). Relative compute is the mean MACs
spent per image over the cost of running everything (all experts and all routers) on every image, so the
all-experts point (limit E, threshold 0) sits at exactly 1.

Thresholds are chosen on the validation split carved from the training data (``DataConfig.val_per_class``),
never on the test set; the test curve is written beside it for information only.

The decision rule is the cascade's (`cascade.continues`: ``sigmoid(logit) >= threshold`` in float64, as the
service decides), and float64 sigmoid is exactly 1.0 for logits above about 37: such images continue at every
threshold, 1 included, so with saturated routers the curve cannot reach the single-expert cost (``max_experts``
still can).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cascade import sigmoid
from training.atomic import atomic_write
from training.evaluate import accuracy_metrics
from training.replay import ReplayGraphs

CURVE_CSV = "curve.csv"
CURVE_PNG = "curve.png"
GRID_STEPS = 100


@dataclass(frozen=True)
class CurvePoint:
    """One cascade setting on one split. ``threshold`` is None for the one-expert limit (no router runs)."""

    split: str
    max_experts: int
    threshold: float | None
    source: str  # "grid", "percentile" or "none"
    top1: float
    many: float | None
    medium: float | None
    few: float | None
    mean_experts_used: float
    mean_macs: float
    relative_compute: float


def router_probabilities(graphs: ReplayGraphs) -> np.ndarray:
    """The decision rule's ``sigmoid`` (float64) of every router on every image (threshold 0 reaches them all),
    flattened."""
    return sigmoid(graphs.replay(threshold=0.0).router_logits).reshape(-1)


def sweep_thresholds(probabilities: np.ndarray, steps: int = GRID_STEPS) -> list[tuple[float, str]]:
    """The grid ``0, 1/steps, ..., 1`` plus the 1st..99th percentiles of ``probabilities``, sorted, unique.

    Percentiles are taken as observed probabilities of the decision rule, so a threshold equal to one of them
    makes that image continue (``>=``) and the stored Python float reproduces the decision exactly.
    """
    values = {i / steps: "grid" for i in range(steps + 1)}
    finite = np.sort(probabilities[np.isfinite(probabilities)])
    if len(finite):
        for q in range(1, 100):
            value = float(finite[min(len(finite) - 1, (q * len(finite)) // 100)])
            values.setdefault(value, "percentile")
    return sorted(values.items())


def _point(
    split: str,
    max_experts: int,
    threshold: float | None,
    source: str,
    graphs: ReplayGraphs,
    labels: torch.Tensor,
    groups: Sequence[str],
) -> CurvePoint:
    result = graphs.replay(threshold=0.0 if threshold is None else threshold, max_experts=max_experts)
    names = [str(c) for c in range(len(groups))]
    accuracy = accuracy_metrics(torch.from_numpy(result.logits.argmax(axis=1)), labels, names, groups)
    spent = graphs.cost.spent_macs(result.experts_used, result.routers_evaluated)
    return CurvePoint(
        split=split,
        max_experts=max_experts,
        threshold=threshold,
        source=source,
        top1=accuracy.top1,
        many=accuracy.groups.many,
        medium=accuracy.groups.medium,
        few=accuracy.groups.few,
        mean_experts_used=float(result.experts_used.mean()),
        mean_macs=float(spent.mean()),
        relative_compute=float(spent.mean()) / graphs.cost.full_ensemble_macs,
    )


def accuracy_compute_curve(
    graphs: ReplayGraphs,
    labels: torch.Tensor,
    groups: Sequence[str],
    *,
    split: str,
    thresholds: Sequence[tuple[float, str]] | None = None,
) -> list[CurvePoint]:
    """Points for every expert limit 1..E and every threshold (one point for the limit 1, which runs no router).

    ``thresholds`` defaults to :func:`sweep_thresholds` of this split's router probabilities.
    """
    if thresholds is None:
        thresholds = sweep_thresholds(router_probabilities(graphs))
    args = (graphs, labels, groups)
    points = [_point(split, 1, None, "none", *args)]
    for limit in range(2, graphs.num_experts + 1):
        points += [_point(split, limit, value, source, *args) for value, source in thresholds]
    return points


def write_curve_csv(path: Path, points: Sequence[CurvePoint]) -> None:
    """One row per point; group accuracies of empty groups and the threshold of the limit-1 point are blank."""
    fields = list(CurvePoint.__dataclass_fields__)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            for point in points:
                writer.writerow({k: "" if v is None else v for k, v in asdict(point).items()})

    atomic_write(path, write)


def read_curve_csv(path: Path) -> list[CurvePoint]:
    """Inverse of :func:`write_curve_csv`."""

    def number(text: str) -> float | None:
        return None if text == "" else float(text)

    with open(path, newline="") as handle:
        return [
            CurvePoint(
                split=row["split"],
                max_experts=int(row["max_experts"]),
                threshold=number(row["threshold"]),
                source=row["source"],
                top1=float(row["top1"]),
                many=number(row["many"]),
                medium=number(row["medium"]),
                few=number(row["few"]),
                mean_experts_used=float(row["mean_experts_used"]),
                mean_macs=float(row["mean_macs"]),
                relative_compute=float(row["relative_compute"]),
            )
            for row in csv.DictReader(handle)
        ]


def _by_threshold(points: list[CurvePoint]) -> list[CurvePoint]:
    # A larger threshold stops more images at every router, so this order is also by decreasing compute.
    return sorted(points, key=lambda p: -1.0 if p.threshold is None else p.threshold)


def plot_curve(path: Path, points: Sequence[CurvePoint], *, title: str, chosen: CurvePoint | None = None) -> None:
    """Accuracy vs relative compute: the full cascade per split (validation solid, test dashed), the other
    expert limits faintly, the static ensembles of the first k experts as squares, and the all-experts and
    single-expert points and the chosen threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    num_experts = max(p.max_experts for p in points)
    fig, ax = plt.subplots(figsize=(7.0, 5.0))
    styles = {"val": ("tab:blue", "-"), "test": ("tab:gray", "--")}
    for split, (colour, line) in styles.items():
        on_split = [p for p in points if p.split == split]
        if not on_split:
            continue
        label = "validation" if split == "val" else "test (information only)"
        for limit in range(2, num_experts + 1):
            curve = _by_threshold([p for p in on_split if p.max_experts == limit])
            full = limit == num_experts
            ax.plot(
                [p.relative_compute for p in curve],
                [100 * p.top1 for p in curve],
                line,
                color=colour,
                alpha=1.0 if full else 0.3,
                linewidth=1.5 if full else 0.8,
                label=f"routed, {label}" if full else None,
            )
        static = [p for p in on_split if p.threshold in (None, 0.0)]
        static = sorted(static, key=lambda p: p.max_experts)
        ax.plot(
            [p.relative_compute for p in static],
            [100 * p.top1 for p in static],
            "s",
            color=colour,
            markersize=4,
            label=f"first k experts, no routing ({split})",
        )
        ends = {1: ("single expert", "v"), num_experts: ("all experts", "^")}
        for limit, (name, marker) in ends.items():
            match = [p for p in static if p.max_experts == limit]
            if match:
                p = match[0]
                ax.plot(p.relative_compute, 100 * p.top1, marker, color=colour, markersize=10, markeredgecolor="k")
                ax.annotate(
                    f"{name} ({split})",
                    (p.relative_compute, 100 * p.top1),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(5, -10),
                )
    if chosen is not None:
        ax.plot(
            chosen.relative_compute,
            100 * chosen.top1,
            "*",
            color="tab:red",
            markersize=14,
            label=f"chosen threshold {chosen.threshold:.4g}",
        )
    ax.set_xlabel("relative compute (mean MACs per image / all experts and routers)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    lows = [p.relative_compute for p in points if math.isfinite(p.relative_compute)]
    ax.set_xlim(max(0.0, min(lows) - 0.05), 1.02)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
