"""RIDE backbones: a shared trunk plus independent experts, built from a ModelConfig."""

from __future__ import annotations

from training.config import ModelConfig
from training.models.blocks import BasicBlock, Bottleneck, Expert, ExpertOutputs, RIDEModel, ShortcutA
from training.models.cosine import CosineClassifier, make_classifier
from training.models.resnet_cifar import resnet32, ride_resnet32
from training.models.resnet_imagenet import ride_resnet10, ride_resnet50, ride_resnext50

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CosineClassifier",
    "Expert",
    "ExpertOutputs",
    "RIDEModel",
    "ShortcutA",
    "build_model",
    "make_classifier",
    "resnet32",
    "ride_resnet10",
    "ride_resnet32",
    "ride_resnet50",
    "ride_resnext50",
]


def build_model(cfg: ModelConfig, num_classes: int) -> RIDEModel:
    """Build the model that ``cfg`` describes for ``num_classes`` classes.

    ``resnet32`` is the full-width baseline and ignores ``reduce_dimension``; ``share_stage2`` exists only for
    the CIFAR ResNet-32 models.
    """
    head = {"classifier": cfg.classifier, "scale": cfg.scale}
    if cfg.arch == "ride_resnet32":
        return ride_resnet32(num_classes, cfg.num_experts, cfg.reduce_dimension, cfg.share_stage2, **head)
    if cfg.arch == "resnet32":
        return resnet32(num_classes, share_stage2=cfg.share_stage2, **head)
    if cfg.share_stage2:
        raise ValueError(f"share_stage2 is only available for the CIFAR ResNet-32 models, not '{cfg.arch}'")
    if cfg.arch == "ride_resnet10":
        return ride_resnet10(num_classes, cfg.num_experts, cfg.reduce_dimension, **head)
    if cfg.arch == "ride_resnet50":
        return ride_resnet50(num_classes, cfg.num_experts, cfg.reduce_dimension, **head)
    if cfg.arch == "ride_resnext50":
        return ride_resnext50(num_classes, cfg.num_experts, cfg.reduce_dimension, **head)
    raise ValueError(f"unknown arch '{cfg.arch}'")
