"""MAC counts against the reference's thop numbers (../shared/REFERENCE-RIDE.md 6) and against hand counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cascade import CostModel
from training.config import ModelConfig
from training.macs import cascade_cost, count_macs, model_macs
from training.models import CosineClassifier, build_model
from training.models.router import Routers

REL_TOL = 5e-4  # 0.05 %


@pytest.mark.parametrize(
    ("cfg", "reference_millions"),
    [
        (ModelConfig(arch="resnet32", num_experts=1), 70.08),
        (ModelConfig(num_experts=1), 50.57),
        (ModelConfig(num_experts=2), 76.37),
        (ModelConfig(num_experts=3), 102.17),
        (ModelConfig(num_experts=4), 127.98),
        (ModelConfig(num_experts=6), 179.59),
    ],
)
def test_cifar_macs_match_reference(cfg: ModelConfig, reference_millions: float) -> None:
    breakdown = model_macs(build_model(cfg, num_classes=100), image_size=32)
    assert breakdown.all_experts_macs == pytest.approx(reference_millions * 1e6, rel=REL_TOL)


def test_ride_breakdown_trunk_and_per_expert() -> None:
    breakdown = model_macs(build_model(ModelConfig(num_experts=3), num_classes=100), image_size=32)
    # Trunk: stem conv 32*32*16*27 + layer1 10 convs of 32*32*16*144 + BN 4 * 11 * 16*32*32.
    assert breakdown.trunk_macs == 442_368 + 10 * 2_359_296 + 4 * 11 * 16_384 == 24_756_224
    # Expert: layer2 (16->24 then 9 x 24->24 at 16x16), layer3 (24->48 then 9 x 48->48 at 8x8), 20 BN,
    # cosine head 48*100 + 48. The reference quotes "~25.80 M per expert".
    layer2 = 16 * 16 * 24 * (16 * 9) + 9 * 16 * 16 * 24 * (24 * 9)
    layer3 = 8 * 8 * 48 * (24 * 9) + 9 * 8 * 8 * 48 * (48 * 9)
    bn = 4 * 10 * (24 * 16 * 16 + 48 * 8 * 8)
    assert breakdown.expert_macs == (layer2 + layer3 + bn + 4_848,) * 3
    assert breakdown.expert_macs[0] == pytest.approx(25.80e6, rel=REL_TOL)
    assert breakdown.router_macs == () and breakdown.full_ensemble_macs == breakdown.all_experts_macs


def test_breakdown_adds_up_to_whole_model() -> None:
    model = build_model(ModelConfig(num_experts=2, share_stage2=True), num_classes=10)
    breakdown = model_macs(model, image_size=32)
    assert count_macs(model, torch.zeros(1, 3, 32, 32)) == breakdown.all_experts_macs
    # Sharing stage 2 moves cost from every expert into the trunk.
    reference_layout = model_macs(build_model(ModelConfig(num_experts=2), num_classes=10), image_size=32)
    assert breakdown.trunk_macs > reference_layout.trunk_macs
    assert breakdown.expert_macs[0] < reference_layout.expert_macs[0]


def test_hand_counted_layers_per_sample() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=True),  # bias not counted (thop 0.1.1)
        nn.BatchNorm2d(8),  # affine: 4 per input element
        nn.ReLU(),  # 0
        nn.Conv2d(8, 8, kernel_size=3, stride=2, padding=1, groups=2, bias=False),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 5),
    )
    expected = 8 * 4 * 4 * 3 * 9 + 4 * 8 * 4 * 4 + 8 * 2 * 2 * 4 * 9 + 32 * 5
    assert count_macs(net, torch.randn(1, 3, 4, 4)) == expected
    assert count_macs(net, torch.randn(6, 3, 4, 4)) == expected  # per sample, whatever the batch


def test_cosine_classifier_rule() -> None:
    assert count_macs(CosineClassifier(48, 100), torch.randn(3, 48)) == 48 * 100 + 48


def test_counting_changes_no_state() -> None:
    model = build_model(ModelConfig(num_experts=2), num_classes=10).train()
    frozen_bn = model.trunk.stem.bn.eval()
    stats = {name: buf.clone() for name, buf in model.named_buffers()}
    model_macs(model, image_size=32)
    count_macs(model, torch.randn(2, 3, 32, 32))
    assert model.training and model.experts[1].training and not frozen_bn.training
    for name, buf in model.named_buffers():
        assert torch.equal(buf, stats[name]), name
    assert not any(m._forward_hooks for m in model.modules())


def test_cost_model_totals() -> None:
    cost = CostModel(trunk_macs=10, expert_macs=(3, 4), router_macs=(2,))
    assert (cost.all_experts_macs, cost.full_ensemble_macs) == (17, 19)


def test_cascade_cost_counts_each_router() -> None:
    model = build_model(ModelConfig(num_experts=3), num_classes=10)
    routers = Routers(num_experts=3, num_classes=10, feature_dim=model.feature_dim, top_z=5, hidden=16)
    cost = cascade_cost(model, routers, image_size=32)
    assert cost.expert_macs == model_macs(model, image_size=32).expert_macs
    # Each router: W1 (48 -> 16) and W2 (5 top values + 16 hidden -> 1); top-k and the norm count 0.
    assert cost.router_macs == (48 * 16 + 21,) * 2
