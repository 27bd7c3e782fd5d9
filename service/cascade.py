"""The early-exit expert cascade over a batch, in plain numpy around four graph calls.

Rows of one batch may carry different thresholds and expert limits. All rows run the trunk and expert 1; after
expert k, router k sees the running mean of experts 1..k's logits and expert k's feature, and a row continues to
expert k + 1 iff ``sigmoid(router_logit) >= threshold`` (and it is still under its ``max_experts``). Only the
rows that continue are fed to the next expert, so the batch shrinks as rows exit. A row's answer is the mean of
the logits of the experts it used, and does not depend on which other rows share its batch.

Cost accounting: ``relative_compute`` = MACs spent on a row / MACs of the full ensemble, where the full ensemble
means the trunk plus every expert plus every router (routers are evaluated whenever another expert could still
follow, so threshold 0 with no expert limit costs exactly 1.0). A row that stops at ``max_experts`` skips the
router after its last expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from export.manifest import Manifest


@dataclass(frozen=True)
class CostModel:
    """MACs per image of each graph, from the manifest."""

    trunk_macs: int
    expert_macs: tuple[int, ...]
    router_macs: tuple[int, ...]

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> CostModel:
        graphs = manifest.graphs
        return cls(
            trunk_macs=graphs.trunk.macs_per_image,
            expert_macs=tuple(g.macs_per_image for g in graphs.experts),
            router_macs=tuple(g.macs_per_image for g in graphs.routers),
        )

    @property
    def full_macs(self) -> int:
        """MACs of the full ensemble: trunk, every expert and every router."""
        return self.trunk_macs + sum(self.expert_macs) + sum(self.router_macs)

    def relative_compute(self, experts_used: np.ndarray, routers_evaluated: np.ndarray) -> np.ndarray:
        """Per row: MACs spent (trunk + experts 1..used + routers 1..evaluated) / ``full_macs``."""
        expert_prefix = np.concatenate([[0], np.cumsum(self.expert_macs, dtype=np.float64)])
        router_prefix = np.concatenate([[0], np.cumsum(self.router_macs, dtype=np.float64)])
        spent = self.trunk_macs + expert_prefix[experts_used] + router_prefix[routers_evaluated]
        return spent / self.full_macs if self.full_macs > 0 else np.ones_like(spent)


class CascadeGraphs(Protocol):
    """The four graph calls the cascade needs (implemented by `service.model.OnnxModel`)."""

    @property
    def num_experts(self) -> int: ...

    @property
    def has_routers(self) -> bool: ...

    @property
    def cost(self) -> CostModel: ...

    def trunk(self, images: np.ndarray) -> np.ndarray: ...

    def expert(self, k: int, shared: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

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
    relative_compute: np.ndarray  # [N] float64, in (0, 1]


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function in float64, written with tanh so that large |x| cannot overflow."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


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
    """Run the routed cascade on a batch of preprocessed images ``[N, 3, H, W]``.

    Args:
        graphs: the trunk, expert and router graphs (an `OnnxModel`).
        images: float32 batch, already normalised as the manifest says.
        thresholds: router threshold in [0, 1], one for all rows or one per row.
        max_experts: expert limit in [1, E], one for all rows or one per row.

    Returns:
        Per-row mean logits, probabilities, experts used, routers evaluated and relative compute.
    """
    n, num_experts = images.shape[0], graphs.num_experts
    thresholds = _per_row(thresholds, n, np.float64)
    limits = _per_row(max_experts, n, np.int64)
    if n and (limits.min() < 1 or limits.max() > num_experts):
        raise ValueError(f"max_experts must be in 1..{num_experts}")

    shared = graphs.trunk(images)
    logits_sum: np.ndarray | None = None
    experts_used = np.zeros(n, dtype=np.int64)
    routers_evaluated = np.zeros(n, dtype=np.int64)
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
        router_logit = graphs.router(k, mean_logits, feature[may_continue]).reshape(-1)
        routers_evaluated[asked] += 1
        active = asked[sigmoid(router_logit) >= thresholds[asked]]

    if logits_sum is None:  # empty batch
        logits_sum = np.zeros((0, 0), dtype=np.float64)
    mean_logits = (logits_sum / np.maximum(experts_used, 1)[:, None]).astype(np.float32)
    return CascadeResult(
        logits=mean_logits,
        probabilities=softmax(mean_logits) if n else mean_logits,
        experts_used=experts_used,
        routers_evaluated=routers_evaluated,
        relative_compute=graphs.cost.relative_compute(experts_used, routers_evaluated),
    )
