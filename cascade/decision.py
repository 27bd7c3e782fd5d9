"""The decision rule: after expert k, router k's logit says whether expert k + 1 runs.

A row continues iff ``sigmoid(router_logit) >= threshold``. The sigmoid is evaluated in float64 through tanh
(no overflow at large |logit|), whatever the logit's dtype, so every caller decides identically: float64
resolves sigmoid to exactly 1.0 only above a logit of about 37, where float32 already does above about 17.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import Field

DECISION_RULE = "continue when sigmoid(router_logit) >= threshold"
THRESHOLD_MIN, THRESHOLD_MAX = 0.0, 1.0

# Every threshold setting (request, server default, router config, checkpoint, manifest) has this type. NaN is
# refused as what it is (not a number), not as "above 1".
Threshold = Annotated[float, Field(ge=THRESHOLD_MIN, le=THRESHOLD_MAX, allow_inf_nan=False)]


def sigmoid(x: np.ndarray | float) -> np.ndarray:
    """Logistic function in float64, written with tanh so that large |x| cannot overflow."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def continues(router_logits: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    """True where the next expert runs: ``sigmoid(router_logit) >= threshold`` (threshold per row or one)."""
    return sigmoid(router_logits) >= np.asarray(thresholds, dtype=np.float64)


def check_threshold(value: float, name: str = "threshold") -> float:
    """``value`` if it is a threshold in [0, 1], else ValueError naming ``name`` (NaN is refused too)."""
    if not THRESHOLD_MIN <= value <= THRESHOLD_MAX:
        raise ValueError(f"{name} must be in [0, 1] ({DECISION_RULE}), got {value}")
    return value


def check_max_experts(value: int | np.ndarray, num_experts: int, name: str = "max_experts") -> None:
    """ValueError unless every expert limit in ``value`` is in 1..``num_experts``."""
    limits = np.asarray(value).reshape(-1)
    outside = limits[(limits < 1) | (limits > num_experts)]
    if outside.size:
        raise ValueError(f"{name}: must be in 1..{num_experts}, got {outside[0]}")
