"""The typed evaluation report: what a checkpoint's metrics hold, under their current and their earlier names."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from training.metrics import CheckpointMetrics


def accuracy(top1: float) -> dict:
    return {
        "top1": top1,
        "groups": {"many": 0.75, "medium": 0.5, "few": None},
        "per_class": {"cat": 1.0, "dog": 0.5},
        "confusion_matrix": [[2, 0], [1, 1]],
    }


def stage1_metrics() -> dict:
    return {
        "split": "test",
        "num_images": 4,
        "all_experts": {**accuracy(0.75), "per_expert_top1": [0.5, 0.75]},
        "cost": {"parameters": 10, "macs_per_image": {"trunk": 100, "experts": [10, 20], "total": 130}},
        "training": {"epochs": 2, "last_epoch_log": {"epoch": 2, "loss": 1.5}},
    }


def routed_section(**names: int) -> dict:
    counts = {"overall": [2, 2], "many": [1, 1], "medium": [1, 1], "few": [0, 0]}
    shares = {"overall": [0.5, 0.5], "many": [0.5, 0.5], "medium": [0.5, 0.5], "few": None}
    return {
        **accuracy(0.5),
        "threshold": 0.5,
        "max_experts": 2,
        "mean_experts_used": 1.5,
        "mean_experts_used_per_group": {"many": 1.5, "medium": 1.5, "few": None},
        "experts_used_histogram": shares,
        "experts_used_counts": counts,
        "mean_macs_per_image": 121.0,
        "mean_macs_per_image_per_group": {"many": 121.0, "medium": 121.0, "few": None},
        **names,
        "relative_compute": 0.9,
        "relative_compute_vs_plain_model": 0.93,
    }


def test_a_stage1_report_round_trips_without_empty_sections() -> None:
    data = stage1_metrics()
    metrics = CheckpointMetrics.model_validate(data)
    assert metrics.routed is None and metrics.all_experts.groups.few is None
    assert metrics.model_dump(mode="json") == data  # no "routed": null, no "routers": null; group nulls kept


def test_reports_written_under_the_earlier_names_still_load() -> None:
    data = stage1_metrics()
    data["cost"]["macs_per_image"] = {"shared": 100, "experts": [10, 20], "total": 130, "routers": [1]}
    data["routed"] = routed_section(macs_all_experts_and_routers=131)
    metrics = CheckpointMetrics.model_validate(data)
    assert metrics.cost.macs_per_image.trunk == 100 and metrics.routed.full_ensemble_macs == 131
    dumped = metrics.model_dump(mode="json")
    assert dumped["cost"]["macs_per_image"]["trunk"] == 100 and dumped["routed"]["full_ensemble_macs"] == 131
    assert CheckpointMetrics.model_validate(dumped) == metrics


def test_an_unknown_key_is_refused() -> None:
    data = stage1_metrics()
    data["all_experts"]["top5"] = 1.0
    with pytest.raises(ValidationError, match="top5"):
        CheckpointMetrics.model_validate(data)
