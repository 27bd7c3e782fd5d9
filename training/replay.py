"""The served cascade (`cascade.run_cascade`) replayed on PyTorch outputs computed once.

Every image's answer depends only on its own expert outputs (batch norm in eval mode), so running all experts
once and replaying the cascade's decisions on those outputs gives what running the experts only on the
surviving images gives. Evaluation, the accuracy-compute curve and the exporter's PyTorch reference all replay
through the same `run_cascade` as the service, so they decide exactly as the service does.
"""

from __future__ import annotations

import numpy as np
import torch

from cascade import CascadeResult, CostModel, run_cascade
from training.models import ExpertOutputs
from training.models.router import Routers


class ReplayGraphs:
    """`cascade.CascadeGraphs` over precomputed per-expert outputs; the cascade's "images" are row numbers."""

    def __init__(self, outputs: ExpertOutputs, routers: Routers | None, cost: CostModel) -> None:
        self._logits = outputs.logits.detach().float().cpu().numpy()
        self._features = outputs.features.detach().float().cpu().numpy()
        self._routers = routers
        self._cost = cost

    @property
    def num_experts(self) -> int:
        return self._logits.shape[1]

    @property
    def has_routers(self) -> bool:
        return self._routers is not None

    @property
    def cost(self) -> CostModel:
        return self._cost

    def trunk(self, rows: np.ndarray) -> np.ndarray:
        return rows

    def expert(self, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._logits[rows, k - 1], self._features[rows, k - 1]

    @torch.no_grad()
    def router(self, k: int, mean_logits: np.ndarray, feature: np.ndarray) -> np.ndarray:
        assert self._routers is not None
        device = next(self._routers.parameters()).device
        logits = self._routers(k, torch.from_numpy(mean_logits).to(device), torch.from_numpy(feature).to(device))
        return logits.float().cpu().numpy()

    def replay(self, *, threshold: float, max_experts: int | None = None) -> CascadeResult:
        """The cascade at ``threshold`` with at most ``max_experts`` experts (default: all) on every row."""
        rows = np.arange(self._logits.shape[0])
        limit = self.num_experts if max_experts is None else max_experts
        return run_cascade(self, rows, thresholds=threshold, max_experts=limit)
