"""The evaluation report of a checkpoint folder: ``metrics.json``, the per-class plot and a printed summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.atomic import atomic_write, atomic_write_json
from training.checkpoint import CheckpointMeta
from training.metrics import CheckpointMetrics

METRICS_FILE = "metrics.json"
PER_CLASS_PLOT = "per_class_accuracy.png"


def plot_per_class(path: Path, metrics: CheckpointMetrics, meta: CheckpointMeta) -> None:
    """Bar chart of per-class accuracy, coloured by group, with the training count on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = meta.class_names
    accuracy = [metrics.all_experts.per_class[n] * 100 for n in names]
    colours = {"many": "#1f77b4", "medium": "#ff7f0e", "few": "#d62728"}
    width = max(6.0, min(24.0, 0.18 * len(names) + 3))
    fig, ax = plt.subplots(figsize=(width, 4.5))
    ax.bar(range(len(names)), accuracy, color=[colours[g] for g in meta.class_groups])
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names if len(names) <= 20 else [str(i) for i in range(len(names))], rotation=90, fontsize=7)
    counts_axis = ax.twinx()
    counts_axis.plot(range(len(names)), meta.class_counts, color="black", marker=".", linewidth=1)
    counts_axis.set_yscale("log")
    counts_axis.set_ylabel("training images (log)")
    handles: list[Any] = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    labels = [f"{g}-shot" for g in colours]
    overall = metrics.all_experts.top1 * 100
    title = f"{meta.name}: per-class accuracy (all experts {overall:.2f} %"
    if metrics.routed is not None:
        # Routed accuracy as a marker over each bar: where early exit costs (or gains) accuracy, per class.
        routed = [metrics.routed.per_class[n] * 100 for n in names]
        handles += ax.plot(range(len(names)), routed, linestyle="none", marker="_", markersize=14, color="black")
        labels.append("routed")
        title += f", routed {metrics.routed.top1 * 100:.2f} %"
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    ax.set_title(title + ")")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_report(folder: Path, metrics: CheckpointMetrics, meta: CheckpointMeta) -> None:
    """``metrics.json`` and the per-class plot in the checkpoint folder."""
    atomic_write_json(Path(folder) / METRICS_FILE, metrics.model_dump(mode="json"))
    plot_per_class(Path(folder) / PER_CLASS_PLOT, metrics, meta)


def _pct(value: float | None) -> str:
    return "  n/a" if value is None else f"{value * 100:5.2f}"


def print_summary(metrics: CheckpointMetrics, title: str) -> None:
    """A short readable table of the headline numbers."""
    lines = [title, f"  {'':<22}{'overall':>8}{'many':>8}{'medium':>8}{'few':>8}"]
    for label, block in (("all experts", metrics.all_experts), ("routed", metrics.routed)):
        if block is not None:
            groups = block.groups
            lines.append(
                f"  {label:<22}{_pct(block.top1):>8}{_pct(groups.many):>8}{_pct(groups.medium):>8}{_pct(groups.few):>8}"
            )
    cost = metrics.cost
    lines.append(f"  parameters {cost.parameters:,}; MACs/image (all experts) {cost.macs_per_image.total:,}")
    routed = metrics.routed
    if routed is not None:
        lines.append(
            f"  routed: mean experts {routed.mean_experts_used:.3f}, relative compute "
            f"{routed.relative_compute:.3f} at threshold {routed.threshold}"
        )
        for key, shares in routed.experts_used_histogram.items():
            if shares is not None:
                text = " / ".join(f"{100 * share:.1f}" for share in shares)
                lines.append(f"    images using 1..E experts (%), {key:<8} {text}")
    print("\n".join(lines))
