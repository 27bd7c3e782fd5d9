"""ResNet-32 for 32x32 images (CIFAR): the RIDE multi-expert model and the plain one-expert baseline.

Layout (../shared/REFERENCE-RIDE.md 2.1): trunk = stem (conv3x3 3->16, BN, ReLU) + layer1 (5 BasicBlocks, 16 ch, 32x32);
each expert = layer2 (5 blocks, stride 2, 16x16) + layer3 (5 blocks, stride 2, 8x8) + global average pool +
classifier. Shortcuts are the parameter-free option A.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from training.models.blocks import BasicBlock, Expert, RIDEModel, init_weights, make_stage
from training.models.cosine import make_classifier

BLOCKS_PER_STAGE = 5  # ResNet-32 = 6n + 2 layers with n = 5
STEM_WIDTH = 16


def _stem() -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, STEM_WIDTH, kernel_size=3, stride=1, padding=1, bias=False),
            bn=nn.BatchNorm2d(STEM_WIDTH),
            relu=nn.ReLU(),
        )
    )


def _stage(in_planes: int, planes: int, stride: int) -> nn.Sequential:
    return make_stage(BasicBlock, in_planes, planes, BLOCKS_PER_STAGE, stride, shortcut="A")


def ride_resnet32(
    num_classes: int,
    num_experts: int = 3,
    reduce_dimension: bool = True,
    share_stage2: bool = False,
    classifier: str = "cosine",
    scale: float = 30.0,
) -> RIDEModel:
    """RIDE ResNet-32 with ``num_experts`` experts.

    Args:
        num_classes: number of output classes C.
        num_experts: number of experts E (1..8).
        reduce_dimension: expert stage widths 24 / 48 (the paper's "filters reduced by 1/4") instead of 32 / 64.
        share_stage2: move stage 2 into the trunk (one shared copy); experts keep only stage 3. The shared
            stage 2 always has the full width 32 (it is paid for once, not per expert), and the experts' stage 3
            has 48 channels with ``reduce_dimension`` (option-A padding 8 + 8) or 64 without. This is not a
            reference configuration: it trades expert diversity for a cheaper per-expert cost in a cascade.
        classifier: ``"cosine"`` (scaled cosine, the RIDE default) or ``"linear"`` (nn.Linear, scale 1).
        scale: cosine scale s.

    Returns:
        A RIDEModel with ``feature_dim`` = width of stage 3.
    """
    width2, width3 = (24, 48) if reduce_dimension else (32, 64)
    trunk = OrderedDict(stem=_stem(), layer1=_stage(STEM_WIDTH, STEM_WIDTH, stride=1))
    if share_stage2:
        width2 = 32
        trunk["layer2"] = _stage(STEM_WIDTH, width2, stride=2)
    experts = []
    for _ in range(num_experts):
        stages = OrderedDict()
        if not share_stage2:
            stages["layer2"] = _stage(STEM_WIDTH, width2, stride=2)
        stages["layer3"] = _stage(width2, width3, stride=2)
        experts.append(Expert(nn.Sequential(stages), make_classifier(classifier, width3, num_classes, scale)))
    model = RIDEModel(nn.Sequential(trunk), experts, num_classes=num_classes, feature_dim=width3)
    init_weights(model)
    return model


def resnet32(
    num_classes: int, share_stage2: bool = False, classifier: str = "cosine", scale: float = 30.0
) -> RIDEModel:
    """The plain full-width (32 / 64) one-expert ResNet-32 baseline, with the RIDEModel interface (E = 1)."""
    return ride_resnet32(
        num_classes,
        num_experts=1,
        reduce_dimension=False,
        share_stage2=share_stage2,
        classifier=classifier,
        scale=scale,
    )
