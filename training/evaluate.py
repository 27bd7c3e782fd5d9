"""Evaluation: accuracy overall and per many / medium / few-shot group, per class, per expert; cost; report files.

Group accuracy is the unweighted mean of the per-class accuracies in the group (the reference's definition);
overall accuracy is the sample accuracy.

A checkpoint with routers is also evaluated as the early-exit cascade (``metrics["routed"]``): the per-expert
outputs are computed once and the service's cascade is replayed on them (`training.replay`). The compute
actually spent is counted per image (../shared/REFERENCE-RIDE.md 6, trap 19): the trunk + the experts it ran + the
routers it evaluated, in thop-rule MACs (`cascade.CostModel`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cascade import CostModel
from training.atomic import atomic_write, atomic_write_json
from training.checkpoint import CheckpointMeta
from training.data import ImageSet, LongTailData, normalize
from training.macs import cascade_cost, model_macs
from training.models import ExpertOutputs, RIDEModel
from training.models.router import Routers
from training.replay import ReplayGraphs

METRICS_FILE = "metrics.json"
PER_CLASS_PLOT = "per_class_accuracy.png"
GROUPS = ("many", "medium", "few")


def predict(
    model: RIDEModel,
    images: torch.Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    batch_size: int = 512,
) -> ExpertOutputs:
    """Per-expert logits and features for ``uint8`` images, in eval mode and fp32, gathered on the CPU."""
    model.eval()
    logits, features = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = normalize(images[start : start + batch_size].to(device), mean, std)
            out = model(batch)
            logits.append(out.logits.float().cpu())
            features.append(out.features.float().cpu())
    # Concatenated outside inference mode, so callers get ordinary tensors they may modify in place.
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
    model: RIDEModel,
    data: LongTailData,
    meta: CheckpointMeta,
    *,
    device: torch.device,
    routers: Routers | None = None,
    threshold: float = 0.5,
    batch_size: int = 512,
) -> dict[str, Any]:
    """Metrics of the all-experts model on the test split, per-expert accuracy, parameters and MACs; with
    ``routers`` also the routed cascade at ``threshold`` (``metrics["routed"]``)."""
    outputs = predict(
        model, data.test.images, mean=meta.input.mean, std=meta.input.std, device=device, batch_size=batch_size
    )
    return metrics_from_outputs(model, outputs, data.test, meta, routers=routers, threshold=threshold)


def metrics_from_outputs(
    model: RIDEModel,
    outputs: ExpertOutputs,
    test: ImageSet,
    meta: CheckpointMeta,
    *,
    routers: Routers | None = None,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """:func:`evaluate_model` on outputs already predicted (so a caller that needs them too predicts once)."""
    metrics: dict[str, Any] = {
        "split": "test",
        "num_images": len(test),
        "all_experts": evaluate_outputs(outputs, test, meta.class_names, meta.class_groups),
        "cost": cost_metrics(model, meta.input.image_size),
    }
    if routers is not None:
        cost = cascade_cost(model, routers, meta.input.image_size)
        metrics["cost"]["macs_per_image"]["routers"] = list(cost.router_macs)
        metrics["routed"] = routed_metrics(
            outputs, test.labels, meta.class_names, meta.class_groups, routers, threshold=threshold, cost=cost
        )
    return metrics


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
        "macs_per_image": {"trunk": macs.trunk_macs, "experts": list(macs.expert_macs), "total": macs.all_experts_macs},
    }


def _per_group(values: torch.Tensor, labels: torch.Tensor, groups: Sequence[str]) -> dict[str, torch.Tensor]:
    """``values`` of the images whose true class is in each group (and of all images under "overall")."""
    sample_group = [groups[c] for c in labels.tolist()]
    selected = {"overall": values}
    for group in GROUPS:
        mask = torch.tensor([g == group for g in sample_group], dtype=torch.bool)
        selected[group] = values[mask]
    return selected


def routed_metrics(
    outputs: ExpertOutputs,
    labels: torch.Tensor,
    class_names: Sequence[str],
    groups: Sequence[str],
    routers: Routers,
    *,
    threshold: float,
    cost: CostModel,
    max_experts: int | None = None,
) -> dict[str, Any]:
    """Accuracy, experts used and MACs spent by the early-exit cascade at ``threshold``.

    Groups of the histogram and of the mean experts used are those of each image's true class.
    """
    num_experts = outputs.logits.shape[1]
    result = ReplayGraphs(outputs, routers, cost).replay(threshold=threshold, max_experts=max_experts)
    metrics = accuracy_metrics(torch.from_numpy(result.logits.argmax(axis=1)), labels, class_names, groups)
    used = torch.from_numpy(result.experts_used)
    spent = torch.from_numpy(cost.spent_macs(result.experts_used, result.routers_evaluated))
    histogram, counts, mean_used, mean_macs = {}, {}, {}, {}
    for key, values in _per_group(torch.stack([used.double(), spent], 1), labels, groups).items():
        group_used = values[:, 0].long()
        count = torch.bincount(group_used - 1, minlength=num_experts)[:num_experts] if len(values) else None
        counts[key] = count.tolist() if count is not None else [0] * num_experts
        histogram[key] = (count.double() / len(values)).tolist() if count is not None else None
        mean_used[key] = values[:, 0].mean().item() if len(values) else None
        mean_macs[key] = values[:, 1].mean().item() if len(values) else None
    mean_spent = spent.mean().item()
    metrics.update(
        {
            "threshold": threshold,
            "max_experts": num_experts if max_experts is None else max_experts,
            "mean_experts_used": mean_used["overall"],
            "mean_experts_used_per_group": {g: mean_used[g] for g in GROUPS},
            "experts_used_histogram": histogram,
            "experts_used_counts": counts,
            "mean_macs_per_image": mean_spent,
            "mean_macs_per_image_per_group": {g: mean_macs[g] for g in GROUPS},
            "full_ensemble_macs": cost.full_ensemble_macs,
            "relative_compute": mean_spent / cost.full_ensemble_macs,
            "relative_compute_vs_plain_model": mean_spent / cost.all_experts_macs,
        }
    )
    return metrics


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
    handles: list[Any] = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    labels = [f"{g}-shot" for g in colours]
    overall = metrics["all_experts"]["top1"] * 100
    title = f"{meta.name}: per-class accuracy (all experts {overall:.2f} %"
    if "routed" in metrics:
        # Routed accuracy as a marker over each bar: where early exit costs (or gains) accuracy, per class.
        routed = [metrics["routed"]["per_class"][n] * 100 for n in names]
        handles += ax.plot(range(len(names)), routed, linestyle="none", marker="_", markersize=14, color="black")
        labels.append("routed")
        title += f", routed {metrics['routed']['top1'] * 100:.2f} %"
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    ax.set_title(title + ")")
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
        if "experts_used_histogram" in routed:
            for key, shares in routed["experts_used_histogram"].items():
                if shares is not None:
                    text = " / ".join(f"{100 * share:.1f}" for share in shares)
                    lines.append(f"    images using 1..E experts (%), {key:<8} {text}")
    print("\n".join(lines))
