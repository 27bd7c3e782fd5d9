"""Cosine ("NormedLinear") classifier of RIDE, and the factory that picks cosine or linear heads."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class CosineClassifier(nn.Module):
    """Scaled cosine similarity between features and class vectors: ``logit = s * cos(x, w_c)``.

    The weight is stored as ``[in_features, out_features]`` (transposed against nn.Linear) exactly as the
    reference NormedLinear, so parameter layouts and counts match (../shared/REFERENCE-RIDE.md 2.2, trap 4). There is no
    bias. The scale lives here, not in the loss, so every consumer (loss, distillation, router, service) sees
    the same already-scaled logits.
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 30.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # uniform(-1, 1), then every class column renormed to unit L2 norm (reference: renorm to 1e-5, times 1e5).
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, x: Tensor) -> Tensor:
        """Map features ``[B, in_features]`` to scaled logits ``[B, out_features]`` in ``[-s, s]``.

        Always computed in fp32: under bf16 autocast the cosine (8 significant bits) times s = 30 moves logits by
        up to about 0.1, which is the size of the LDAM margins the loss works with.
        """
        # Checked first so that exported graphs hold no autocast scope; a device type without autocast (the meta
        # device that stands in for a GPU in tests/training/test_device.py) has none to leave.
        device_type = x.device.type
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return self._scaled_cosine(x.float())
        return self._scaled_cosine(x)

    def _scaled_cosine(self, x: Tensor) -> Tensor:
        return self.scale * (F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale}"


def make_classifier(kind: str, in_features: int, num_classes: int, scale: float) -> nn.Module:
    """``"cosine"``: CosineClassifier with scale ``scale``; ``"linear"``: nn.Linear with bias (scale forced to 1)."""
    if kind == "cosine":
        return CosineClassifier(in_features, num_classes, scale)
    if kind == "linear":
        return nn.Linear(in_features, num_classes)
    raise ValueError(f"unknown classifier '{kind}'; expected 'cosine' or 'linear'")
