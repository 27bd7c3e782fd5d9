"""One table of cases through every runner of the cascade, with identical decisions required.

Each case gives, per row, the logits that routers 1 and 2 of a 3-expert model produce, the thresholds and the
expert limits, and the experts each row must use. The runners: plain numpy graphs that return the table's
logits, and training's replay of PyTorch outputs (`training.replay.ReplayGraphs`) through real `Routers`
whose weights make their logit the table's. The service's and the exporter's onnxruntime graphs run the same
`run_cascade`; tests/service/test_cascade.py and the export parity tests cover those on real graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from cascade import CascadeResult, CostModel, run_cascade
from training.models import ExpertOutputs
from training.models.router import Routers
from training.replay import ReplayGraphs

NUM_EXPERTS, NUM_CLASSES, FEATURE_DIM = 3, 2, 4
COST = CostModel(trunk_macs=100, expert_macs=(10, 20, 30), router_macs=(1, 2))
LOW = -1000.0  # the other class's logit: never the top value a router reads


@dataclass(frozen=True)
class Case:
    name: str
    router_logits: list[tuple[float, float]]  # per row: router 1's and router 2's logit
    thresholds: float | list[float]
    max_experts: int | list[int]
    experts_used: list[int]
    routers_evaluated: list[int]


CASES = [
    Case("threshold-0", [(-50, -50), (0, 0), (40, 40)], 0.0, 3, [3, 3, 3], [2, 2, 2]),
    Case("threshold-0.5", [(-1e-3, 5), (0, -1e-3), (0, 0), (2, 3)], 0.5, 3, [1, 2, 3, 3], [1, 2, 2, 2]),
    # float32 sigmoid is 1.0 at logits 20 and 30; the rule's is not, so those rows stop at threshold 1.
    Case("threshold-1-saturated", [(20, 20), (30, 30), (40, 20), (40, 40)], 1.0, 3, [1, 1, 2, 3], [1, 1, 2, 2]),
    Case("per-row-thresholds", [(0.5, 0.5)] * 3, [0.6, 0.6225, 0.7], 3, [3, 1, 1], [2, 1, 1]),
    # A row at its limit stops without asking the router after its last expert.
    Case("per-row-limits", [(40, 40)] * 3, 0.5, [1, 2, 3], [1, 2, 3], [0, 1, 2]),
    Case("empty-batch", [], 0.5, 3, [], []),
]


def expert_logits(case: Case) -> np.ndarray:
    """``[N, 3, 2]`` float32 logits whose running means put the table's router logit on top of class 0:
    router k reads max(mean of experts 1..k), so expert 1 carries L1 and expert 2 carries 2 * L2 - L1."""
    logits = np.full((len(case.router_logits), NUM_EXPERTS, NUM_CLASSES), LOW, dtype=np.float32)
    for row, (first, second) in enumerate(case.router_logits):
        logits[row, :, 0] = [first, 2 * second - first, 0.0]
    return logits


class TableGraphs:
    """Plain numpy graphs: the trunk passes row numbers through, router k returns the table's logit."""

    num_experts, has_routers, cost = NUM_EXPERTS, True, COST

    def __init__(self, case: Case) -> None:
        self.logits = expert_logits(case)
        self.router_logits = np.asarray(case.router_logits, dtype=np.float32).reshape(-1, 2)

    def trunk(self, rows: np.ndarray) -> np.ndarray:
        return rows

    def expert(self, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.logits[rows, k - 1], rows[:, None].astype(np.float32)  # the feature says which row it is

    def router(self, k: int, mean_logits: np.ndarray, feature: np.ndarray) -> np.ndarray:
        return self.router_logits[feature[:, 0].astype(np.int64), k - 1]


def run_on_numpy_graphs(case: Case) -> CascadeResult:
    rows = np.arange(len(case.router_logits))
    return run_cascade(
        TableGraphs(case), rows, thresholds=np.asarray(case.thresholds), max_experts=np.asarray(case.max_experts)
    )


def top_value_routers() -> Routers:
    """Real routers whose logit is the top mean logit: top_z 1 with weight 1, everything else 0."""
    routers = Routers(NUM_EXPERTS, NUM_CLASSES, FEATURE_DIM, top_z=1, hidden=3)
    with torch.no_grad():
        for parameter in routers.parameters():
            parameter.zero_()
        routers.fc.weight[0, 0] = 1.0
    return routers


def run_on_pytorch_replay(case: Case) -> CascadeResult:
    logits = torch.from_numpy(expert_logits(case))
    outputs = ExpertOutputs(logits, torch.ones(len(logits), NUM_EXPERTS, FEATURE_DIM))
    graphs = ReplayGraphs(outputs, top_value_routers(), COST)
    rows = np.arange(len(logits))
    return run_cascade(graphs, rows, thresholds=np.asarray(case.thresholds), max_experts=np.asarray(case.max_experts))


RUNNERS: dict[str, Callable[[Case], CascadeResult]] = {
    "numpy-graphs": run_on_numpy_graphs,
    "pytorch-replay": run_on_pytorch_replay,
}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_runner_decides_as_the_table_says(case: Case) -> None:
    results = {name: run(case) for name, run in RUNNERS.items()}
    for name, result in results.items():
        assert result.experts_used.tolist() == case.experts_used, name
        assert result.routers_evaluated.tolist() == case.routers_evaluated, name
    first, *others = results.values()
    for other in others:
        np.testing.assert_array_equal(other.logits, first.logits)
        np.testing.assert_array_equal(other.router_logits, first.router_logits)
        np.testing.assert_array_equal(other.relative_compute, first.relative_compute)


@pytest.mark.parametrize("case", CASES[:-1], ids=[c.name for c in CASES[:-1]])
def test_outputs_follow_the_experts_used(case: Case) -> None:
    result = run_on_numpy_graphs(case)
    logits = expert_logits(case).astype(np.float64)
    for row, used in enumerate(result.experts_used):
        np.testing.assert_allclose(result.logits[row], logits[row, :used].mean(axis=0), rtol=1e-6)
        reached = np.isfinite(result.router_logits[row])
        assert reached.tolist() == [k <= result.routers_evaluated[row] for k in (1, 2)]
        table = np.asarray(case.router_logits[row], dtype=np.float32)
        np.testing.assert_array_equal(result.router_logits[row, reached], table[reached])
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(
        result.relative_compute, COST.relative_compute(result.experts_used, result.routers_evaluated)
    )


def test_empty_batch_has_empty_outputs() -> None:
    result = run_on_numpy_graphs(CASES[-1])
    assert result.experts_used.shape == (0,) and result.router_logits.shape == (0, NUM_EXPERTS - 1)


def test_out_of_range_expert_limit_is_refused() -> None:
    with pytest.raises(ValueError, match=r"max_experts: must be in 1\.\.3, got 4"):
        run_cascade(TableGraphs(CASES[0]), np.arange(3), thresholds=0.5, max_experts=4)
