"""Which threshold stage 2 stores: ``--threshold``, the config's, or the most accurate one on the validation curve
within a compute budget (``--target-compute``). The test set is never used for a choice."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cascade import CostModel
from training.config import ConfigError, TrainConfig
from training.curve import CurvePoint


@dataclass(frozen=True)
class ThresholdChoice:
    value: float
    source: str  # how it was chosen, for the checkpoint's records
    point: CurvePoint | None  # its point on the validation curve, when it has one


def check_target_compute(target_compute: float) -> None:
    """ConfigError unless ``target_compute`` is a fraction of the all-experts cost in (0, 1]."""
    if not 0.0 < target_compute <= 1.0:
        raise ConfigError(
            f"--target-compute must be in (0, 1] (a fraction of the all-experts cost), got {target_compute}"
        )


def check_reachable(target_compute: float, cost: CostModel) -> None:
    """Fail before training when even stopping every image after expert 1 costs more than the target."""
    one = np.ones(1, dtype=np.int64)  # one expert run, its router asked
    cheapest = float(cost.relative_compute(experts_used=one, routers_evaluated=one)[0])
    if target_compute < cheapest:
        raise ConfigError(
            f"--target-compute {target_compute} is below what any threshold can reach: stopping every image after "
            f"the first expert already costs {cheapest:.3f} of the all-experts compute"
        )


def choose_threshold(points: Sequence[CurvePoint], target_compute: float, num_experts: int) -> CurvePoint:
    """The full cascade's (limit E) validation point with the best accuracy whose relative compute is at most
    ``target_compute``; ties go to the cheaper point, then to the larger threshold."""
    check_target_compute(target_compute)
    candidates = [p for p in points if p.split == "val" and p.max_experts == num_experts and p.threshold is not None]
    if not candidates:
        raise ConfigError("no validation points to choose a threshold from (is data.val_per_class 0?)")
    feasible = [p for p in candidates if p.relative_compute <= target_compute]
    if not feasible:
        cheapest = min(p.relative_compute for p in candidates)
        raise ConfigError(
            f"no threshold meets --target-compute {target_compute}: the cheapest routed setting on the validation "
            f"split costs {cheapest:.3f} of the all-experts compute (every image runs the trunk and expert 1)"
        )
    return max(feasible, key=lambda p: (p.top1, -p.relative_compute, p.threshold))


def pick_threshold(
    cfg: TrainConfig, threshold: float | None, target_compute: float | None, curve: Sequence[CurvePoint]
) -> ThresholdChoice:
    """The threshold to store: chosen on ``curve`` for ``target_compute``, else ``threshold``, else the config's."""
    num_experts = cfg.model.num_experts
    if target_compute is not None:
        chosen = choose_threshold(curve, target_compute, num_experts)
        source = f"target-compute {target_compute} on validation split ({cfg.data.val_per_class} per class)"
        return ThresholdChoice(float(chosen.threshold), source, chosen)
    value = cfg.router.threshold if threshold is None else threshold
    source = "--threshold" if threshold is not None else "default" if value == 0.5 else "config router.threshold"
    match = [p for p in curve if p.split == "val" and p.max_experts == num_experts and p.threshold == value]
    return ThresholdChoice(value, source, match[0] if match else None)
