"""The decision rule and the checks of its settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade import check_max_experts, check_threshold, continues, sigmoid


def test_continue_when_sigmoid_reaches_the_threshold() -> None:
    logits = np.array([-1e-3, 0.0, 1e-3], dtype=np.float32)
    np.testing.assert_array_equal(continues(logits, 0.5), [False, True, True])
    np.testing.assert_array_equal(continues(logits, np.array([0.4, 0.6, 0.5])), [True, False, True])
    assert continues(np.float32(-50.0), 0.0) and continues(np.float32(np.inf), 1.0)


def test_sigmoid_saturates_in_float64_not_float32() -> None:
    """float32 sigmoid is exactly 1 from a logit of about 17; the rule's float64 sigmoid only from about 37, so a
    logit of 20 or 30 stops at threshold 1 however it was computed."""
    logits = np.array([20.0, 30.0, 37.0], dtype=np.float32)
    assert (torch.sigmoid(torch.from_numpy(logits)) == 1.0).all()
    np.testing.assert_array_equal(continues(logits, 1.0), [False, False, True])
    assert sigmoid(-800.0) == 0.0 and sigmoid(800.0) == 1.0  # no overflow warning, no NaN


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_threshold_outside_zero_one_is_refused(value: float) -> None:
    with pytest.raises(ValueError, match=r"--threshold must be in \[0, 1\]"):
        check_threshold(value, "--threshold")
    assert check_threshold(0.0) == 0.0 and check_threshold(1.0) == 1.0


def test_expert_limit_outside_one_to_e_is_refused() -> None:
    check_max_experts(np.array([1, 2, 3]), 3)
    check_max_experts(np.zeros(0, dtype=np.int64), 3)
    with pytest.raises(ValueError, match=r"max_experts: must be in 1\.\.3, got 4"):
        check_max_experts(4, 3)
    with pytest.raises(ValueError, match="got 0"):
        check_max_experts(np.array([2, 0, 3]), 3)
