"""The compute model: MACs spent per row relative to the full ensemble."""

from __future__ import annotations

import numpy as np

from cascade import CostModel


def test_relative_compute_counts_experts_and_routers() -> None:
    cost = CostModel(trunk_macs=100, expert_macs=(10, 20, 30), router_macs=(1, 2))
    assert (cost.full_ensemble_macs, cost.all_experts_macs) == (163, 160)
    used, routers = np.array([1, 1, 2, 3, 3]), np.array([0, 1, 2, 2, 1])
    spent = np.array([110, 111, 133, 163, 161])
    np.testing.assert_array_equal(cost.spent_macs(used, routers), spent)
    np.testing.assert_allclose(cost.relative_compute(used, routers), spent / 163)


def test_without_routers_all_experts_cost_one() -> None:
    cost = CostModel(trunk_macs=5, expert_macs=(3, 2))
    np.testing.assert_array_equal(cost.relative_compute(np.array([2, 1]), np.array([0, 0])), [1.0, 0.8])
