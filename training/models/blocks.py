"""Building blocks shared by the CIFAR and ImageNet-style RIDE backbones: residual blocks, experts, the model.

All convolutions are bias-free and followed by BatchNorm, as in the reference (../shared/REFERENCE-RIDE.md 2.1).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class ShortcutA(nn.Module):
    """Parameter-free "option A" shortcut of the CIFAR ResNets: subsample, then zero-pad channels on both sides.

    The reference builds this from a lambda; a module keeps the model picklable and ONNX-exportable
    (it exports as a strided Slice plus Pad).
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad = (planes - in_planes) // 2

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))


def shortcut_b(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """Projection ("option B") shortcut, conv1x1 + BN, as in torchvision ResNets."""
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
    )


def _shortcut(kind: str, in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    if kind == "A":
        return ShortcutA(in_planes, out_planes, stride)
    return shortcut_b(in_planes, out_planes, stride)


class BasicBlock(nn.Module):
    """conv3x3(stride) - BN - ReLU - conv3x3 - BN, plus shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(shortcut, in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """conv1x1 - conv3x3(stride) - conv1x1 (x4 channels), each with BN, plus a projection shortcut (ResNet v1.5).

    ``groups`` and ``base_width`` give the ResNeXt block: the inner width is ``int(planes * base_width / 64) *
    groups`` and the 3x3 convolution is grouped, exactly as the reference's ``RIDEResNeXt`` computes it (32x4d:
    groups 32, base_width 4). The defaults are the plain ResNet bottleneck (inner width = ``planes``).
    """

    expansion = 4

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "B", groups: int = 1, base_width: int = 64
    ) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(in_planes, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _shortcut(shortcut, in_planes, out_planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def make_stage(
    block: type[BasicBlock | Bottleneck],
    in_planes: int,
    planes: int,
    num_blocks: int,
    stride: int,
    shortcut: str,
    **block_options: int,
) -> nn.Sequential:
    """A stage of ``num_blocks`` blocks; only the first one strides (and changes width). ``block_options`` go to
    every block (``groups`` and ``base_width`` of a ResNeXt bottleneck)."""
    layers = []
    for i in range(num_blocks):
        layers.append(block(in_planes, planes, stride if i == 0 else 1, shortcut, **block_options))
        in_planes = planes * block.expansion
    return nn.Sequential(*layers)


def init_weights(model: nn.Module, conv_mode: str = "fan_in") -> None:
    """Reference ``_weights_init``: kaiming-normal (ReLU gain) on every Conv2d and nn.Linear weight.

    BatchNorm keeps its defaults, nn.Linear biases their default init, and the cosine classifier its own init.
    ``conv_mode="fan_out"`` gives the init of the reference's ImageNet ResNets (normal with std sqrt(2 / (k*k*out))).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=conv_mode)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)


class Expert(nn.Module):
    """One expert: its own stages on the shared feature map, global average pool, then its classifier."""

    def __init__(self, features: nn.Sequential, classifier: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward_features(self, shared: Tensor) -> Tensor:
        """Shared feature map -> this expert's last feature map ``[B, d, h, w]`` (before pooling)."""
        return self.features(shared)

    def forward_head(self, feature_map: Tensor) -> tuple[Tensor, Tensor]:
        """Feature map -> ``(logits [B, C], pooled feature [B, d])``."""
        # A mean over the spatial axes equals the reference's avg_pool2d(kernel = map width) on square maps and
        # also works for other input sizes; it is an op, not a module, so MAC counting gives it 0 as thop did.
        pooled = feature_map.mean(dim=(2, 3))
        return self.classifier(pooled), pooled

    def forward(self, shared: Tensor) -> tuple[Tensor, Tensor]:
        """Shared feature map -> ``(logits [B, C], pooled feature [B, d])``; logits already include the scale s."""
        return self.forward_head(self.forward_features(shared))


class ExpertOutputs(NamedTuple):
    """Per-expert outputs of a RIDE model, experts in order."""

    logits: Tensor  # [B, E, C] scaled logits of every expert
    features: Tensor  # [B, E, d] pooled features of every expert

    @property
    def mean_logits(self) -> Tensor:
        """``[B, C]`` arithmetic mean of the experts' scaled logits: the RIDE ensemble prediction before softmax."""
        return self.logits.mean(dim=1)


class RIDEModel(nn.Module):
    """A shared trunk followed by ``num_experts`` independent experts.

    ``trunk`` maps an image batch to the shared feature map; ``experts[k]`` maps that map to
    ``(logits [B, C], pooled feature [B, d])``. Both are plain modules, so each can be exported on its own and an
    early-exit cascade can run the trunk once and the experts one at a time. Nothing is stored on the module
    during forward.
    """

    def __init__(self, trunk: nn.Module, experts: list[Expert], num_classes: int, feature_dim: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(experts)
        self.num_classes = num_classes
        self.feature_dim = feature_dim

    def forward_trunk(self, x: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` -> shared feature map."""
        return self.trunk(x)

    def forward_expert(self, k: int, shared: Tensor) -> tuple[Tensor, Tensor]:
        """Run expert ``k`` on the shared feature map: ``(logits [B, C], pooled feature [B, d])``."""
        return self.experts[k](shared)

    def forward(self, x: Tensor) -> ExpertOutputs:
        """Run the trunk once and every expert in order."""
        shared = self.trunk(x)
        outputs = [expert(shared) for expert in self.experts]
        return ExpertOutputs(
            logits=torch.stack([logits for logits, _ in outputs], dim=1),
            features=torch.stack([feature for _, feature in outputs], dim=1),
        )
