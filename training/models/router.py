"""Expert-assignment routers (RIDE stage 2, ../shared/REFERENCE-RIDE.md section 3).

Router k (0-based, k = 0..E-2) decides whether expert k + 1 runs. It reads

1. the top-z values (sorted, descending) of the running mean logits of experts 0..k, and
2. ReLU(W1_k · v + b1_k), where v is expert k's pooled feature divided by its L2 norm,

concatenated in that order, through W2 (shared by all routers) to one logit. The decision rule everywhere is:
continue when ``sigmoid(logit) >= threshold``, stop when it is below.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def l2_normalize(features: Tensor) -> Tensor:
    """Division by the norm without an epsilon, as the reference does (pooled ReLU features are never all zero
    in practice; an all-zero feature gives NaN both here and in the exported graph, so they agree)."""
    return features / features.norm(dim=1, keepdim=True)


class Routers(nn.Module):
    """The E-1 routers of an E-expert model; ``forward(k, ...)`` evaluates router k (0-based)."""

    def __init__(self, num_experts: int, num_classes: int, feature_dim: int, top_z: int, hidden: int = 16) -> None:
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
        self.hidden_fcs = nn.ModuleList(nn.Linear(feature_dim, hidden) for _ in range(num_experts - 1))
        self.fc = nn.Linear(top_z + hidden, 1)

    def forward(self, k: int, mean_logits: Tensor, feature: Tensor) -> Tensor:
        """Router k's logit ``[B]`` from the mean logits of experts 0..k and expert k's pooled feature."""
        top = torch.topk(mean_logits, self.top_z, dim=1, sorted=True).values
        hidden = torch.relu(self.hidden_fcs[k](l2_normalize(feature)))
        return self.fc(torch.cat([top, hidden], dim=1)).squeeze(1)

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


def continue_mask(router_logit: Tensor, threshold: float | Tensor) -> Tensor:
    """True where the next expert should run: ``sigmoid(logit) >= threshold``."""
    return torch.sigmoid(router_logit) >= threshold


@torch.no_grad()
def cascade_from_outputs(
    expert_logits: Tensor,
    expert_features: Tensor,
    routers: Routers | None,
    *,
    threshold: float = 0.5,
    max_experts: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Replay the early-exit cascade on precomputed per-expert outputs.

    Because every sample's answer depends only on its own expert outputs (batch norm in eval mode), running all
    experts once and replaying the decisions gives exactly what the service computes by running experts only on
    the surviving rows. Returns ``(final mean logits [B, C], experts used [B], router logits [B, E-1])`` (router
    logits are NaN where a router was not reached).
    """
    batch, num_experts, _ = expert_logits.shape
    limit = num_experts if max_experts is None else max(1, min(max_experts, num_experts))
    device = expert_logits.device
    running_sum = expert_logits[:, 0].clone()
    used = torch.ones(batch, dtype=torch.long, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    router_logits = torch.full((batch, max(num_experts - 1, 0)), float("nan"), device=device)
    for k in range(1, limit):
        if routers is not None:
            mean_so_far = running_sum / used.unsqueeze(1)
            logit = routers(k - 1, mean_so_far, expert_features[:, k - 1])
            router_logits[:, k - 1] = torch.where(active, logit, router_logits[:, k - 1])
            active = active & continue_mask(logit, threshold)
        if not active.any():
            break
        running_sum = running_sum + torch.where(active.unsqueeze(1), expert_logits[:, k], 0.0)
        used = used + active.long()
    return running_sum / used.unsqueeze(1), used, router_logits
