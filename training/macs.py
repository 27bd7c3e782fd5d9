"""Multiply-accumulate (MAC) counts measured on the real model with forward hooks.

The rules reproduce thop 0.1.1, which the reference's ``utils/gflops.py`` uses and whose MAC counts the paper calls
"FLOPs" (../shared/REFERENCE-RIDE.md 6), so the numbers are comparable with the paper's:

- Conv: output elements x (in_channels / groups) x kernel area (thop 0.1.1 ignores a conv bias);
- BatchNorm: 2 x input elements, doubled when affine (thop does not assume BN is fused);
- nn.Linear: in_features x output elements (bias ignored);
- CosineClassifier: numel(W) + in_features per sample (the reference's custom NormedLinear rule; the two
  normalisations are otherwise ignored);
- everything else counts 0: ReLU, max pooling, the option-A shortcut, residual additions, and the functional
  global average pool, exactly as thop saw the reference model.

On 1x3x32x32 with 100 classes this gives 70,080,832 for the ResNet-32 baseline (reference 70.08 M) and, for
RIDE reduce_dim, 24,756,224 trunk + 25,809,648 per expert (50.57 M for one expert). The reference figures for
E >= 2 (76.37 / 102.17 / 127.98 M) are 4,848 MACs per extra expert lower: they are reproduced exactly when the
multi-expert model's classifiers count 0, i.e. thop's custom NormedLinear rule did not reach the classifier
class of the multi-expert reference model. Here every classifier is counted (<= 0.02 % difference).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor, nn

from cascade import CostModel
from training.models import CosineClassifier, RIDEModel
from training.models.router import Routers


def _conv_macs(m: nn.Conv2d, x: Tensor, y: Tensor) -> int:
    return y.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)


def _batchnorm_macs(m: nn.modules.batchnorm._BatchNorm, x: Tensor, y: Tensor) -> int:
    return x.numel() * (4 if m.affine else 2)


def _linear_macs(m: nn.Linear, x: Tensor, y: Tensor) -> int:
    return m.in_features * y.numel()


def _cosine_macs(m: CosineClassifier, x: Tensor, y: Tensor) -> int:
    return x.shape[0] * (m.weight.numel() + m.in_features)


_RULES = (
    (nn.modules.conv._ConvNd, _conv_macs),
    (nn.modules.batchnorm._BatchNorm, _batchnorm_macs),
    (nn.Linear, _linear_macs),
    (CosineClassifier, _cosine_macs),
)


def _rule_for(module: nn.Module) -> Callable[[nn.Module, Tensor, Tensor], int] | None:
    for kind, rule in _RULES:
        if isinstance(module, kind):
            return rule
    return None


def _run_counted(module: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[int, object]:
    """Run ``module`` once in eval mode under no_grad with counting hooks; return (MACs of the batch, output)."""
    total = 0

    def hook(m: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal total
        total += _rule_for(m)(m, args[0], output)

    handles = [m.register_forward_hook(hook) for m in module.modules() if _rule_for(m) is not None]
    # Eval mode so that counting never updates BatchNorm running statistics; every flag is restored afterwards
    # (some submodules may deliberately be in a different mode, e.g. frozen BN in stage 2).
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            output = module(*inputs)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
    return total, output


def count_macs(module: nn.Module, *inputs: Tensor) -> int:
    """MACs per sample of one forward of ``module`` on ``inputs`` (batch = first dimension of the first input).

    The module runs once, in eval mode under no_grad; its training flags are restored afterwards.
    """
    total, _ = _run_counted(module, inputs)
    return total // inputs[0].shape[0]


def model_macs(model: RIDEModel, image_size: int) -> CostModel:
    """MACs of ``model`` on one ``3 x image_size x image_size`` image: the trunk and each expert (no routers)."""
    parameter = next(model.parameters())
    image = torch.zeros(1, 3, image_size, image_size, device=parameter.device, dtype=parameter.dtype)
    trunk, shared = _run_counted(model.trunk, (image,))
    return CostModel(trunk_macs=trunk, expert_macs=tuple(count_macs(expert, shared) for expert in model.experts))


def router_macs(routers: Routers) -> tuple[int, ...]:
    """MACs per image of each router, 1..E-1."""
    parameter = next(routers.parameters())
    mean_logits = torch.ones(1, routers.num_classes, device=parameter.device)
    feature = torch.ones(1, routers.feature_dim, device=parameter.device)
    return tuple(count_macs(routers.single(k), mean_logits, feature) for k in range(1, routers.num_experts))


def cascade_cost(model: RIDEModel, routers: Routers | None, image_size: int) -> CostModel:
    """The compute model of ``model`` and its routers (if any) on ``image_size`` images: the MACs the export
    writes into the manifest, per graph."""
    cost = model_macs(model, image_size)
    return cost if routers is None else replace(cost, router_macs=router_macs(routers))
