"""Load the official RIDE code's CIFAR model and loss from a checkout, for the benches that compare against it.

Only the two files these comparisons need are loaded, by path, so the checkout's package imports (tensorboard,
pandas, torchvision) are not needed. Nothing is copied from them: the checkout of
frank-xwang/RIDE-LongTailRecognition lives outside this repo and is passed in (``--official PATH``).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from training.config import TrainConfig


def _load_module(path: Path, name: str) -> ModuleType:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: is this a checkout of frank-xwang/RIDE-LongTailRecognition?")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _cuda_calls_stay_on_cpu() -> Iterator[None]:
    """The official RIDELoss calls ``.cuda()`` in its constructor (REFERENCE-RIDE.md trap 16, in ../shared); on a
    CPU-only torch that raises. Make that one call a no-op while the loss is built."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


def official_cifar_model(checkout: Path, cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The official ``ResNet_s`` (ResNet-32 RIDE, NormedLinear, s = 30) with ``cfg``'s experts and width."""
    resnets = _load_module(checkout / "model" / "ldam_drw_resnets" / "ride_resnet_cifar.py", "official_ride_resnet")
    return resnets.ResNet_s(
        resnets.BasicBlock,
        [5, 5, 5],
        num_experts=cfg.model.num_experts,
        num_classes=num_classes,
        reduce_dimension=cfg.model.reduce_dimension,
        use_norm=True,
        s=cfg.model.scale,
    )


def official_ride_loss(checkout: Path, cfg: TrainConfig, class_counts: Sequence[int], drw_epoch: int) -> nn.Module:
    """The official ``RIDELoss`` with ``cfg.loss``'s settings (LDAM base, DRW after ``drw_epoch``)."""
    losses = _load_module(checkout / "model" / "loss.py", "official_loss")
    with _cuda_calls_stay_on_cpu():
        return losses.RIDELoss(
            cls_num_list=list(class_counts),
            base_diversity_temperature=cfg.loss.diversity_temperature,
            max_m=cfg.loss.max_margin,
            s=cfg.model.scale,
            reweight=cfg.loss.drw,
            reweight_epoch=drw_epoch,
            additional_diversity_factor=cfg.loss.diversity_factor,
            reweight_factor=cfg.loss.reweight_factor,
        )
