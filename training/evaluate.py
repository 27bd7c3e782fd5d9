"""Evaluation: accuracy overall and per many / medium / few-shot group, per class, per expert; cost.

Group accuracy is the unweighted mean of the per-class accuracies in the group (the reference's definition);
overall accuracy is the sample accuracy.

A checkpoint with routers is also evaluated as the early-exit cascade (``metrics.routed``): the per-expert
outputs are computed once and the service's cascade is replayed on them (`training.replay`). The compute
actually spent is counted per image (../shared/REFERENCE-RIDE.md 6, trap 19): the trunk + the experts it ran + the
routers it evaluated, in thop-rule MACs (`cascade.CostModel`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cascade import CostModel
from training.checkpoint import CheckpointMeta
from training.data import ImageSet, LongTailData, channel_vector, normalize
from training.macs import cascade_cost
from training.metrics import (
    AccuracyMetrics,
    AllExpertsMetrics,
    CheckpointMetrics,
    CostMetrics,
    GroupNumbers,
    MacsPerImage,
    RoutedMetrics,
)
from training.models import ExpertOutputs, RIDEModel
from training.models.router import Routers
from training.replay import ReplayGraphs

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
    """Per-expert logits and features for ``uint8`` images (on any device), in eval mode and fp32, returned on the
    CPU. On a GPU the host never waits for it between batches: images go over from pinned memory without
    blocking, and the outputs are gathered on the device and copied back once."""
    model.eval()
    logits, features = [], []
    mean_t, std_t = channel_vector(mean, device), channel_vector(std, device)
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            out = model(normalize(_to_device(images[start : start + batch_size], device), mean_t, std_t))
            logits.append(out.logits.float())
            features.append(out.features.float())
    # Concatenated outside inference mode, so callers get ordinary tensors they may modify in place.
    return ExpertOutputs(torch.cat(logits).cpu(), torch.cat(features).cpu())


def _to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda" and batch.device.type == "cpu":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[true class, predicted class]`` counts."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def group_mean(values: Sequence[float], groups: Sequence[str]) -> GroupNumbers:
    """Mean of per-class values within each group (None for an empty group)."""
    result: dict[str, float | None] = {}
    for group in GROUPS:
        members = [v for v, g in zip(values, groups, strict=True) if g == group]
        result[group] = sum(members) / len(members) if members else None
    return GroupNumbers(**result)


def accuracy_metrics(
    predictions: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], groups: Sequence[str]
) -> AccuracyMetrics:
    """Overall and per-group top-1, per-class accuracy and the confusion matrix."""
    confusion = confusion_matrix(predictions, labels, len(class_names))
    support = confusion.sum(dim=1)
    per_class = [
        (confusion[c, c].item() / support[c].item()) if support[c] > 0 else 0.0 for c in range(len(class_names))
    ]
    return AccuracyMetrics(
        top1=(predictions == labels).double().mean().item(),
        groups=group_mean(per_class, groups),
        per_class=dict(zip(class_names, per_class, strict=True)),
        confusion_matrix=confusion.tolist(),
    )


def evaluate_model(
    model: RIDEModel,
    data: LongTailData,
    meta: CheckpointMeta,
    *,
    device: torch.device,
    routers: Routers | None = None,
    threshold: float = 0.5,
    batch_size: int = 512,
) -> CheckpointMetrics:
    """Metrics of the all-experts model on the test split, per-expert accuracy, parameters and MACs; with
    ``routers`` also the routed cascade at ``threshold`` (``metrics.routed``)."""
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
) -> CheckpointMetrics:
    """:func:`evaluate_model` on outputs already predicted (so a caller that needs them too predicts once)."""
    cost = cascade_cost(model, routers, meta.input.image_size)
    routed = None
    if routers is not None:
        routed = routed_metrics(
            outputs, test.labels, meta.class_names, meta.class_groups, routers, threshold=threshold, cost=cost
        )
    return CheckpointMetrics(
        split="test",
        num_images=len(test),
        all_experts=evaluate_outputs(outputs, test, meta.class_names, meta.class_groups),
        cost=cost_metrics(model, cost),
        routed=routed,
    )


def evaluate_outputs(
    outputs: ExpertOutputs, test: ImageSet, class_names: Sequence[str], groups: Sequence[str]
) -> AllExpertsMetrics:
    """Accuracy of the all-experts ensemble and of every single expert."""
    accuracy = accuracy_metrics(outputs.mean_logits.argmax(dim=1), test.labels, class_names, groups)
    per_expert = [
        (outputs.logits[:, e].argmax(dim=1) == test.labels).double().mean().item()
        for e in range(outputs.logits.shape[1])
    ]
    return AllExpertsMetrics(**dict(accuracy), per_expert_top1=per_expert)


def cost_metrics(model: RIDEModel, cost: CostModel) -> CostMetrics:
    """Parameters, and MACs per image of each part (routers only when the model has them)."""
    macs = MacsPerImage(
        trunk=cost.trunk_macs,
        experts=list(cost.expert_macs),
        total=cost.all_experts_macs,
        routers=list(cost.router_macs) if cost.router_macs else None,
    )
    return CostMetrics(parameters=sum(p.numel() for p in model.parameters()), macs_per_image=macs)


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
) -> RoutedMetrics:
    """Accuracy, experts used and MACs spent by the early-exit cascade at ``threshold``.

    Groups of the histogram and of the mean experts used are those of each image's true class.
    """
    num_experts = outputs.logits.shape[1]
    result = ReplayGraphs(outputs, routers, cost).replay(threshold=threshold, max_experts=max_experts)
    accuracy = accuracy_metrics(torch.from_numpy(result.logits.argmax(axis=1)), labels, class_names, groups)
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
    return RoutedMetrics(
        **dict(accuracy),
        threshold=threshold,
        max_experts=num_experts if max_experts is None else max_experts,
        mean_experts_used=mean_used["overall"],
        mean_experts_used_per_group=GroupNumbers(**{g: mean_used[g] for g in GROUPS}),
        experts_used_histogram=histogram,
        experts_used_counts=counts,
        mean_macs_per_image=mean_spent,
        mean_macs_per_image_per_group=GroupNumbers(**{g: mean_macs[g] for g in GROUPS}),
        full_ensemble_macs=cost.full_ensemble_macs,
        relative_compute=mean_spent / cost.full_ensemble_macs,
        relative_compute_vs_plain_model=mean_spent / cost.all_experts_macs,
    )
