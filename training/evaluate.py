"""Evaluation: accuracy overall and per many / medium / few-shot group, per class, per expert; cost; report files.

Group accuracy is the unweighted mean of the per-class accuracies in the group (the reference's definition);
overall accuracy is the sample accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from training.atomic import atomic_write, atomic_write_json
from training.checkpoint import CheckpointMeta
from training.data import ImageSet, LongTailData, normalize
from training.macs import model_macs
from training.models import ExpertOutputs, RIDEModel

METRICS_FILE = "metrics.json"
PER_CLASS_PLOT = "per_class_accuracy.png"
GROUPS = ("many", "medium", "few")


@torch.no_grad()
def predict(
    model: RIDEModel,
    images: torch.Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    batch_size: int = 500,
) -> ExpertOutputs:
    """Per-expert logits and features for ``uint8`` images, in eval mode, gathered on the CPU."""
    model.eval()
    logits, features = [], []
    for start in range(0, len(images), batch_size):
        batch = normalize(images[start : start + batch_size].to(device), mean, std)
        out = model(batch)
        logits.append(out.logits.float().cpu())
        features.append(out.features.float().cpu())
    return ExpertOutputs(torch.cat(logits), torch.cat(features))


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[true class, predicted class]`` counts."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def group_mean(values: Sequence[float], groups: Sequence[str]) -> dict[str, float | None]:
    """Mean of per-class values within each group (None for an empty group)."""
    result: dict[str, float | None] = {}
    for group in GROUPS:
        members = [v for v, g in zip(values, groups, strict=True) if g == group]
        result[group] = sum(members) / len(members) if members else None
    return result


def accuracy_metrics(
    predictions: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], groups: Sequence[str]
) -> dict[str, Any]:
    """Overall and per-group top-1, per-class accuracy and the confusion matrix."""
    confusion = confusion_matrix(predictions, labels, len(class_names))
    support = confusion.sum(dim=1)
    per_class = [
        (confusion[c, c].item() / support[c].item()) if support[c] > 0 else 0.0 for c in range(len(class_names))
    ]
    return {
        "top1": (predictions == labels).double().mean().item(),
        "groups": group_mean(per_class, groups),
        "per_class": dict(zip(class_names, per_class, strict=True)),
        "confusion_matrix": confusion.tolist(),
    }


def evaluate_model(
    model: RIDEModel, data: LongTailData, meta: CheckpointMeta, *, device: torch.device
) -> dict[str, Any]:
    """Metrics of the all-experts model on the test split, per-expert accuracy, parameters and MACs."""
    outputs = predict(model, data.test.images, mean=meta.input.mean, std=meta.input.std, device=device)
    return {
        "split": "test",
        "num_images": len(data.test),
        "all_experts": evaluate_outputs(outputs, data.test, meta.class_names, meta.class_groups),
        "cost": cost_metrics(model, meta.input.image_size),
    }


def evaluate_outputs(
    outputs: ExpertOutputs, test: ImageSet, class_names: Sequence[str], groups: Sequence[str]
) -> dict[str, Any]:
    """Accuracy of the all-experts ensemble and of every single expert."""
    metrics = accuracy_metrics(outputs.mean_logits.argmax(dim=1), test.labels, class_names, groups)
    metrics["per_expert_top1"] = [
        (outputs.logits[:, e].argmax(dim=1) == test.labels).double().mean().item()
        for e in range(outputs.logits.shape[1])
    ]
    return metrics


def cost_metrics(model: RIDEModel, image_size: int) -> dict[str, Any]:
    macs = model_macs(model, image_size)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "macs_per_image": {"shared": macs.shared, "experts": macs.experts, "total": macs.total},
    }


def plot_per_class(path: Path, metrics: dict[str, Any], meta: CheckpointMeta) -> None:
    """Bar chart of per-class accuracy, coloured by group, with the training count on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = meta.class_names
    accuracy = [metrics["all_experts"]["per_class"][n] * 100 for n in names]
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
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    ax.legend(handles, [f"{g}-shot" for g in colours], loc="upper right", fontsize=8)
    overall = metrics["all_experts"]["top1"] * 100
    ax.set_title(f"{meta.name}: per-class accuracy (overall {overall:.2f} %)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_report(folder: Path, metrics: dict[str, Any], meta: CheckpointMeta) -> None:
    atomic_write_json(Path(folder) / METRICS_FILE, metrics)
    plot_per_class(Path(folder) / PER_CLASS_PLOT, metrics, meta)


def _pct(value: float | None) -> str:
    return "  n/a" if value is None else f"{value * 100:5.2f}"


def print_summary(metrics: dict[str, Any], title: str) -> None:
    """A short readable table of the headline numbers."""
    lines = [title, f"  {'':<22}{'overall':>8}{'many':>8}{'medium':>8}{'few':>8}"]
    for key, label in (("all_experts", "all experts"), ("routed", "routed")):
        if key in metrics:
            block = metrics[key]
            groups = block["groups"]
            lines.append(
                f"  {label:<22}{_pct(block['top1']):>8}{_pct(groups['many']):>8}"
                f"{_pct(groups['medium']):>8}{_pct(groups['few']):>8}"
            )
    cost = metrics.get("cost", {})
    if cost:
        lines.append(
            f"  parameters {cost['parameters']:,}; MACs/image (all experts) {cost['macs_per_image']['total']:,}"
        )
    if "routed" in metrics:
        routed = metrics["routed"]
        lines.append(
            f"  routed: mean experts {routed['mean_experts_used']:.3f}, relative compute "
            f"{routed['relative_compute']:.3f} at threshold {routed['threshold']}"
        )
    print("\n".join(lines))
