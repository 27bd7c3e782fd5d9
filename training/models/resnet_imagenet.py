"""RIDE ResNet-10 / ResNet-50 / ResNeXt-50 for 224x224 images (ImageNet-LT, iNaturalist), after the reference's
fb_resnets.

Trunk = torchvision-style stem (conv7x7 stride 2, BN, ReLU, maxpool 3x3 stride 2) + layer1 + layer2; each
expert = layer3 + layer4 + global average pool + classifier (../shared/REFERENCE-RIDE.md 5.4). Shortcuts are conv1x1 +
BN (option B). The reference pools with AvgPool2d(7), which needs 224x224 inputs; the global mean used here gives the
same result there and also works on smaller inputs.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from training.models.blocks import BasicBlock, Bottleneck, Expert, RIDEModel, init_weights, make_stage
from training.models.cosine import make_classifier

STEM_WIDTH = 64
RESNEXT_GROUPS, RESNEXT_BASE_WIDTH = 32, 4  # ResNeXt-50 32x4d


def _stem() -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, STEM_WIDTH, kernel_size=7, stride=2, padding=3, bias=False),
            bn=nn.BatchNorm2d(STEM_WIDTH),
            relu=nn.ReLU(),
            pool=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
    )


def _ride_resnet(
    block: type[BasicBlock | Bottleneck],
    layers: tuple[int, int, int, int],
    num_classes: int,
    num_experts: int,
    reduce_dimension: bool,
    classifier: str,
    scale: float,
    **block_options: int,
) -> RIDEModel:
    planes3, planes4 = (192, 384) if reduce_dimension else (256, 512)
    width1, width2 = 64 * block.expansion, 128 * block.expansion
    trunk = OrderedDict(
        stem=_stem(),
        layer1=make_stage(block, STEM_WIDTH, 64, layers[0], stride=1, shortcut="B", **block_options),
        layer2=make_stage(block, width1, 128, layers[1], stride=2, shortcut="B", **block_options),
    )
    feature_dim = planes4 * block.expansion
    experts = []
    for _ in range(num_experts):
        stages = OrderedDict(
            layer3=make_stage(block, width2, planes3, layers[2], stride=2, shortcut="B", **block_options),
            layer4=make_stage(
                block, planes3 * block.expansion, planes4, layers[3], stride=2, shortcut="B", **block_options
            ),
        )
        experts.append(Expert(nn.Sequential(stages), make_classifier(classifier, feature_dim, num_classes, scale)))
    model = RIDEModel(nn.Sequential(trunk), experts, num_classes=num_classes, feature_dim=feature_dim)
    init_weights(model, conv_mode="fan_out")
    return model


def ride_resnet10(
    num_classes: int,
    num_experts: int = 3,
    reduce_dimension: bool = True,
    classifier: str = "cosine",
    scale: float = 30.0,
) -> RIDEModel:
    """RIDE ResNet-10 (BasicBlock, [1, 1, 1, 1]); ``reduce_dimension`` gives expert widths 192 / 384."""
    return _ride_resnet(BasicBlock, (1, 1, 1, 1), num_classes, num_experts, reduce_dimension, classifier, scale)


def ride_resnet50(
    num_classes: int,
    num_experts: int = 3,
    reduce_dimension: bool = True,
    classifier: str = "cosine",
    scale: float = 30.0,
) -> RIDEModel:
    """RIDE ResNet-50 (Bottleneck, [3, 4, 6, 3]); ``reduce_dimension`` gives expert planes 192 / 384 (x4 out)."""
    return _ride_resnet(Bottleneck, (3, 4, 6, 3), num_classes, num_experts, reduce_dimension, classifier, scale)


def ride_resnext50(
    num_classes: int,
    num_experts: int = 3,
    reduce_dimension: bool = True,
    classifier: str = "cosine",
    scale: float = 30.0,
) -> RIDEModel:
    """RIDE ResNeXt-50 32x4d (grouped Bottleneck, [3, 4, 6, 3], 32 groups of base width 4), as the reference's
    ``RIDEResNeXt``: the same sharing as ResNet-50; ``reduce_dimension`` gives expert planes 192 / 384, i.e. inner
    widths 384 / 768 and outputs 768 / 1536 (full width: 512 / 1024 and 1024 / 2048)."""
    return _ride_resnet(
        Bottleneck,
        (3, 4, 6, 3),
        num_classes,
        num_experts,
        reduce_dimension,
        classifier,
        scale,
        groups=RESNEXT_GROUPS,
        base_width=RESNEXT_BASE_WIDTH,
    )
