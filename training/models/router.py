"""Expert-assignment routers (RIDE stage 2, ../shared/REFERENCE-RIDE.md section 3).

Experts and routers are numbered from 1, as in the model folder: router k (k = 1..E-1) decides whether expert
k + 1 runs. It reads

1. the top-z values (sorted, descending) of the running mean logits of experts 1..k, and
2. ReLU(W1_k · v + b1_k), where v is expert k's pooled feature divided by its L2 norm,

concatenated in that order, through W2 to one logit. W2 is shared by all routers, as in every configuration of
the reference; ``shared_fc=False`` gives each router its own W2, the reference's unused
``share_expert_help_pred_fc=False`` variant, so that such checkpoints import too. The decision on that logit is
the cascade's (`cascade.continues`); this module only computes the logits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def l2_normalize(features: Tensor) -> Tensor:
    """Division by the norm without an epsilon, as the reference does (pooled ReLU features are never all zero
    in practice; an all-zero feature gives NaN both here and in the exported graph, so they agree)."""
    return features / features.norm(dim=1, keepdim=True)


class Routers(nn.Module):
    """The E-1 routers of an E-expert model; ``forward(k, ...)`` evaluates router k (1-based)."""

    def __init__(
        self,
        num_experts: int,
        num_classes: int,
        feature_dim: int,
        top_z: int,
        hidden: int = 16,
        shared_fc: bool = True,
    ) -> None:
        super().__init__()
        if num_experts < 2:
            raise ValueError("routers need at least 2 experts: with one expert there is nothing to route to")
        if not 1 <= top_z <= num_classes:
            raise ValueError(f"top_z must be in 1..{num_classes}, got {top_z}")
        self.num_experts = num_experts
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.top_z = top_z
        self.hidden = hidden
        self.shared_fc = shared_fc
        self.hidden_fcs = nn.ModuleList(nn.Linear(feature_dim, hidden) for _ in range(num_experts - 1))
        if shared_fc:
            self.fc = nn.Linear(top_z + hidden, 1)
        else:
            self.fcs = nn.ModuleList(nn.Linear(top_z + hidden, 1) for _ in range(num_experts - 1))

    def forward(self, k: int, mean_logits: Tensor, feature: Tensor) -> Tensor:
        """Router k's logit ``[B]`` from the mean logits of experts 1..k and expert k's pooled feature."""
        if not 1 <= k < self.num_experts:
            raise ValueError(f"there is no router {k}: routers are numbered 1..{self.num_experts - 1}")
        top = torch.topk(mean_logits, self.top_z, dim=1, sorted=True).values
        hidden = torch.relu(self.hidden_fcs[k - 1](l2_normalize(feature)))
        output = self.fc if self.shared_fc else self.fcs[k - 1]
        return output(torch.cat([top, hidden], dim=1)).squeeze(1)

    def single(self, k: int) -> SingleRouter:
        """Router k as its own module (for export): ``(mean_logits, feature) -> logit [B, 1]``."""
        return SingleRouter(self, k)


class SingleRouter(nn.Module):
    def __init__(self, routers: Routers, k: int) -> None:
        super().__init__()
        self.routers = routers
        self.k = k

    def forward(self, mean_logits: Tensor, feature: Tensor) -> Tensor:
        return self.routers(self.k, mean_logits, feature).unsqueeze(1)
