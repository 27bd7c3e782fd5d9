"""Rebuild a model from a checkpoint folder and evaluate it on its test split (routed too, if it has routers)."""

from __future__ import annotations

from pathlib import Path

from training.checkpoint import check_same_classes, model_from_checkpoint, routers_from_checkpoint, save_meta
from training.data import load_data
from training.evaluate import evaluate_model
from training.metrics import CheckpointMetrics
from training.report import print_summary, write_report
from training.runtime import resolve_device

# Training-time records that re-evaluating cannot recompute (the test metrics themselves are recomputed).
KEPT_METRICS = ("training", "distillation", "router_training", "validation", "threshold_selection")


def evaluate_checkpoint(
    folder: Path, *, data_dir: Path | None = None, device_choice: str = "auto"
) -> CheckpointMetrics:
    """Evaluate, print a summary, write ``metrics.json`` and the plot, and store the metrics in the sidecar.

    A checkpoint with routers is also evaluated as the early-exit cascade at its stored threshold
    (``metrics.routed``), next to the all-experts metrics of the same weights.
    """
    device = resolve_device(device_choice)
    model, meta, rest = model_from_checkpoint(folder)
    routers = routers_from_checkpoint(meta, rest, model.feature_dim)
    model.to(device)
    data = load_data(meta.config.data, data_dir)
    check_same_classes(meta, data.class_names, "the data")
    threshold = meta.routers.threshold if meta.routers is not None else 0.5
    metrics = evaluate_model(model, data, meta, device=device, routers=routers, threshold=threshold)
    if meta.metrics is not None:
        metrics = metrics.model_copy(update={key: getattr(meta.metrics, key) for key in KEPT_METRICS})
    write_report(folder, metrics, meta)
    save_meta(folder, meta.model_copy(update={"metrics": metrics}))
    print_summary(metrics, title=f"{meta.name} (epoch {meta.epoch}) on the test split")
    return metrics
