"""The compute model: MACs spent on a row, relative to the full ensemble.

The full ensemble is the trunk, every expert and every router: routers run whenever another expert could still
follow, so threshold 0 with no expert limit costs exactly 1.0. A row that stops at its expert limit skips the
router after its last expert, so its cost counts the routers it really evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CostModel:
    """MACs per image of each part of the cascade (thop rules, as counted at export)."""

    trunk_macs: int
    expert_macs: tuple[int, ...]
    router_macs: tuple[int, ...] = ()  # one per expert but the last; empty without routers

    @property
    def full_ensemble_macs(self) -> int:
        """MACs of the trunk, every expert and every router: the denominator of relative compute."""
        return self.trunk_macs + sum(self.expert_macs) + sum(self.router_macs)

    @property
    def all_experts_macs(self) -> int:
        """MACs of the plain model: the trunk and every expert, no router."""
        return self.trunk_macs + sum(self.expert_macs)

    def spent_macs(self, experts_used: np.ndarray, routers_evaluated: np.ndarray) -> np.ndarray:
        """Per row, float64: trunk + experts 1..used + routers 1..evaluated."""
        expert_prefix = np.concatenate([[0], np.cumsum(self.expert_macs, dtype=np.float64)])
        router_prefix = np.concatenate([[0], np.cumsum(self.router_macs, dtype=np.float64)])
        return self.trunk_macs + expert_prefix[experts_used] + router_prefix[routers_evaluated]

    def relative_compute(self, experts_used: np.ndarray, routers_evaluated: np.ndarray) -> np.ndarray:
        """Per row: :meth:`spent_macs` / :attr:`full_ensemble_macs`."""
        spent = self.spent_macs(experts_used, routers_evaluated)
        full = self.full_ensemble_macs
        return spent / full if full > 0 else np.ones_like(spent)
