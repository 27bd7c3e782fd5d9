"""The cascade over a batch, around four graph calls.

Rows of one batch may carry different thresholds and expert limits. All rows run the trunk and expert 1; after
expert k, router k sees the running mean of experts 1..k's logits and expert k's feature, and a row continues to
expert k + 1 when the decision rule says so (and it is still under its ``max_experts``). Only the rows that
continue are fed to the next expert, so the batch shrinks as rows exit. A row's answer is the mean of the logits
of the experts it used, and does not depend on which other rows share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from cascade.cost import CostModel
from cascade.decision import check_max_experts, continues


class CascadeGraphs(Protocol):
    """The graph calls the cascade needs. Experts and routers are numbered from 1, as in the model folder:
    router k decides whether expert k + 1 runs. Implemented by the service's `OnnxModel`, the exporter's
    `OrtModel` and training's `ReplayGraphs`."""

    @property
    def num_experts(self) -> int: ...

    @property
    def has_routers(self) -> bool: ...

    @property
    def cost(self) -> CostModel: ...

    def trunk(self, images: np.ndarray) -> Any:
        """The shared feature map of every row: an array, or anything whose rows an index array selects (the
        service keeps it on the device that computed it); the cascade only selects rows and hands them on."""
        ...

    def expert(self, k: int, shared: Any) -> tuple[np.ndarray, np.ndarray]:
        """Expert k's logits ``[n, C]`` and pooled feature ``[n, d]``, from rows of the trunk's output."""
        ...

    def router(self, k: int, mean_logits: np.ndarray, feature: np.ndarray) -> np.ndarray:
        """Router k's logit per row, shape [n] or [n, 1]."""
        ...


@dataclass(frozen=True)
class CascadeResult:
    """Per-row outputs of one cascade run over a batch of N rows."""

    logits: np.ndarray  # [N, C] float32: mean of the used experts' logits
    probabilities: np.ndarray  # [N, C] float32: softmax of `logits`
    experts_used: np.ndarray  # [N] int64, 1..E
    routers_evaluated: np.ndarray  # [N] int64, 0..E-1
    router_logits: np.ndarray  # [N, E-1] float32: router k's logit in column k - 1, NaN where it did not run
    relative_compute: np.ndarray  # [N] float64, in (0, 1]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, computed in float64 and returned as float32."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def _per_row(value: float | np.ndarray, n: int, dtype: type) -> np.ndarray:
    return np.broadcast_to(np.asarray(value, dtype=dtype), (n,))


def run_cascade(
    graphs: CascadeGraphs,
    images: np.ndarray,
    *,
    thresholds: float | np.ndarray,
    max_experts: int | np.ndarray,
) -> CascadeResult:
    """Run the routed cascade on a batch of inputs (for the graphs of a model folder: preprocessed images
    ``[N, 3, H, W]``, normalised as the manifest says).

    Args:
        graphs: the trunk, expert and router graphs.
        images: the batch, N rows.
        thresholds: router threshold in [0, 1], one for all rows or one per row.
        max_experts: expert limit in [1, E], one for all rows or one per row.

    Returns:
        Per-row mean logits, probabilities, experts used, routers evaluated, router logits and relative compute.
    """
    n, num_experts = images.shape[0], graphs.num_experts
    thresholds = _per_row(thresholds, n, np.float64)
    limits = _per_row(max_experts, n, np.int64)
    check_max_experts(limits, num_experts)

    shared = graphs.trunk(images)
    logits_sum: np.ndarray | None = None
    experts_used = np.zeros(n, dtype=np.int64)
    routers_evaluated = np.zeros(n, dtype=np.int64)
    router_logits = np.full((n, num_experts - 1), np.nan, dtype=np.float32)
    active = np.arange(n)
    for k in range(1, num_experts + 1):
        if active.size == 0:
            break
        logits, feature = graphs.expert(k, shared[active])
        if logits_sum is None:
            logits_sum = np.zeros((n, logits.shape[1]), dtype=np.float64)
        logits_sum[active] += logits
        experts_used[active] = k
        # Rows at their limit stop here without paying for the router.
        may_continue = limits[active] > k
        if not graphs.has_routers or k == num_experts:
            active = active[may_continue]
            continue
        asked = active[may_continue]
        if asked.size == 0:
            break
        mean_logits = (logits_sum[asked] / k).astype(np.float32)
        logit = graphs.router(k, mean_logits, feature[may_continue]).reshape(-1)
        routers_evaluated[asked] += 1
        router_logits[asked, k - 1] = logit
        active = asked[continues(logit, thresholds[asked])]

    if logits_sum is None:  # empty batch
        logits_sum = np.zeros((0, 0), dtype=np.float64)
    mean_logits = (logits_sum / np.maximum(experts_used, 1)[:, None]).astype(np.float32)
    return CascadeResult(
        logits=mean_logits,
        probabilities=softmax(mean_logits) if n else mean_logits,
        experts_used=experts_used,
        routers_evaluated=routers_evaluated,
        router_logits=router_logits,
        relative_compute=graphs.cost.relative_compute(experts_used, routers_evaluated),
    )
