"""RIDE backbones: reference parameter counts, output contract, trunk/expert split, cosine head (the graphs the
exporter writes from them are tested in tests/export)."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from training.config import ModelConfig
from training.models import CosineClassifier, ExpertOutputs, RIDEModel, ShortcutA, build_model
from training.models.router import Routers


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        # ../shared/REFERENCE-RIDE.md 2.5, measured on the official modules (100 classes).
        (ModelConfig(arch="resnet32", num_experts=1), 469_904),
        (ModelConfig(num_experts=1), 277_168),
        (ModelConfig(num_experts=2), 530_512),
        (ModelConfig(num_experts=3), 783_856),
        (ModelConfig(num_experts=4), 1_037_200),
        (ModelConfig(num_experts=6), 1_543_888),
        (ModelConfig(num_experts=3, reduce_dimension=False), 1_362_064),
        (ModelConfig(arch="resnet32", num_experts=1, classifier="linear"), 470_004),
        # Not in the reference: shared full-width stage 2 (23,824 + 88,192) + 3 x (layer3 32->48 201,408 + 4,800).
        (ModelConfig(num_experts=3, share_stage2=True), 730_640),
    ],
)
def test_parameter_counts_match_reference(cfg: ModelConfig, expected: int) -> None:
    assert _params(build_model(cfg, num_classes=100)) == expected


# Measured on the official modules (model/model.py ResNet10Model / ResNet50Model / ResNeXt50Model and their
# EA models, 1000 classes, reduce_dimension, NormedLinear; the EA models with top_choices_num 30 / 50 / 50).
IMAGENET_COUNTS = {
    # arch: (official class, {experts: params}, top-z, {experts: params with routers})
    "ride_resnet10": (
        "ResNet10Model",
        {2: 6_372_416, 3: 9_401_792, 4: 12_431_168},
        30,
        {2: 6_378_623, 3: 9_414_159, 4: 12_449_695},
    ),
    "ride_resnet50": (
        "ResNet50Model",
        {2: 29_599_808, 3: 43_677_248, 4: 57_754_688},
        50,
        {2: 29_624_467, 3: 43_726_499, 4: 57_828_531},
    ),
    "ride_resnext50": (
        "ResNeXt50Model",
        {2: 29_063_488, 3: 42_889_024, 4: 56_714_560},
        50,
        {2: 29_088_147, 3: 42_938_275, 4: 56_788_403},
    ),
}


@pytest.mark.parametrize("num_experts", [2, 3, 4])
@pytest.mark.parametrize("arch", sorted(IMAGENET_COUNTS))
def test_imagenet_parameter_counts_match_the_official_models(arch: str, num_experts: int) -> None:
    _, plain, top_z, routed = IMAGENET_COUNTS[arch]
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = build_model(ModelConfig(arch=arch, num_experts=num_experts), num_classes=1000)
        routers = Routers(num_experts, 1000, model.feature_dim, top_z)
    assert _params(model) == plain[num_experts]
    assert _params(model) + _params(routers) == routed[num_experts]


def test_resnext_experts_are_grouped_and_reduced() -> None:
    with torch.device("meta"):
        expert = build_model(ModelConfig(arch="ride_resnext50", num_experts=1), num_classes=1000).experts[0]
    block = expert.features.layer3[1]
    # 32 groups of width 12 (= 192 * 4 / 64): inner width 384, output 768; full width would be 512 / 1024.
    assert (block.conv2.groups, block.conv2.in_channels, block.conv3.out_channels) == (32, 384, 768)
    assert expert.features.layer4[0].conv2.weight.shape == (768, 24, 3, 3)


@pytest.mark.parametrize("num_experts", range(1, 9))
def test_one_to_eight_experts(num_experts: int) -> None:
    model = build_model(ModelConfig(num_experts=num_experts), num_classes=10).eval()
    assert model.num_experts == len(model.experts) == num_experts
    # Shared 23,824 (stem + layer1); each reduced expert 50,592 + 197,952 + 48 x 10 classifier.
    assert _params(model) == 23_824 + num_experts * (50_592 + 197_952 + 480)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, num_experts, 10)
    assert out.features.shape == (2, num_experts, 48)


@pytest.mark.parametrize(
    ("cfg", "image_size", "feature_dim", "trunk_shape"),
    [
        (ModelConfig(arch="ride_resnet32", num_experts=3), 32, 48, (16, 32, 32)),
        (ModelConfig(arch="ride_resnet32", num_experts=2, reduce_dimension=False), 32, 64, (16, 32, 32)),
        (ModelConfig(arch="ride_resnet32", num_experts=2, share_stage2=True), 32, 48, (32, 16, 16)),
        (ModelConfig(arch="resnet32", num_experts=1), 32, 64, (16, 32, 32)),
        (ModelConfig(arch="ride_resnet10", num_experts=2), 64, 384, (128, 8, 8)),
        (ModelConfig(arch="ride_resnet50", num_experts=2), 64, 1536, (512, 8, 8)),
        (ModelConfig(arch="ride_resnet50", num_experts=1, reduce_dimension=False), 64, 2048, (512, 8, 8)),
        (ModelConfig(arch="ride_resnext50", num_experts=2), 64, 1536, (512, 8, 8)),
    ],
)
def test_forward_shapes(cfg: ModelConfig, image_size: int, feature_dim: int, trunk_shape: tuple[int, ...]) -> None:
    model = build_model(cfg, num_classes=7)
    x = torch.randn(2, 3, image_size, image_size)
    out = model(x)
    assert isinstance(out, ExpertOutputs)
    assert model.feature_dim == feature_dim
    assert model.num_classes == 7
    assert out.logits.shape == (2, cfg.num_experts, 7)
    assert out.features.shape == (2, cfg.num_experts, feature_dim)
    assert out.mean_logits.shape == (2, 7)
    assert model.forward_trunk(x).shape == (2, *trunk_shape)


@pytest.fixture(scope="module")
def ride3() -> RIDEModel:
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_experts=3), num_classes=100)
    # A few training steps' worth of BN statistics, so that eval mode is not the identity normalisation.
    with torch.no_grad():
        model.train()(torch.randn(16, 3, 32, 32))
    return model.eval()


def test_trunk_plus_experts_equals_forward_and_mean(ride3: RIDEModel) -> None:
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = ride3(x)
        shared = ride3.forward_trunk(x)
        per_expert = [ride3.forward_expert(k, shared) for k in range(ride3.num_experts)]
    for k, (logits, feature) in enumerate(per_expert):
        torch.testing.assert_close(out.logits[:, k], logits)
        torch.testing.assert_close(out.features[:, k], feature)
    mean = sum(logits for logits, _ in per_expert) / ride3.num_experts
    torch.testing.assert_close(out.mean_logits, mean)
    # Experts have independent weights, so they disagree.
    assert not torch.allclose(per_expert[0][0], per_expert[1][0])


def test_eval_is_deterministic_and_batch_independent(ride3: RIDEModel) -> None:
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        first, second, alone = ride3(x), ride3(x), ride3(x[2:3])
    assert torch.equal(first.logits, second.logits)
    torch.testing.assert_close(alone.logits[0], first.logits[2], rtol=1e-5, atol=1e-5)


def test_forward_leaves_no_state_on_the_module(ride3: RIDEModel) -> None:
    before = {name: set(vars(m)) for name, m in ride3.named_modules()}
    with torch.no_grad():
        ride3(torch.randn(2, 3, 32, 32))
    assert {name: set(vars(m)) for name, m in ride3.named_modules()} == before


def test_model_pickles(ride3: RIDEModel) -> None:
    clone = pickle.loads(pickle.dumps(ride3))  # the reference's lambda shortcut made this impossible
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(clone(x).logits, ride3(x).logits)


def test_cosine_logits_bounded_by_scale(ride3: RIDEModel) -> None:
    with torch.no_grad():
        logits = ride3(torch.randn(8, 3, 32, 32) * 10).logits
    assert logits.abs().max() <= 30.0 + 1e-4
    assert logits.abs().max() > 1.0  # scaled, not raw cosines


def test_cosine_classifier_layout_and_values() -> None:
    head = CosineClassifier(48, 100, scale=30.0)
    assert head.weight.shape == (48, 100)
    torch.testing.assert_close(head.weight.norm(dim=0), torch.ones(100))
    # A feature parallel to class 7's weight column (any length) scores exactly s for that class.
    x = head.weight[:, 7].detach().unsqueeze(0) * 3.5
    logits = head(x)
    torch.testing.assert_close(logits[0, 7], torch.tensor(30.0))
    assert logits[0].argmax() == 7
    assert logits.abs().max() <= 30.0 + 1e-4


def test_linear_classifier_has_bias_and_no_scale() -> None:
    model = build_model(ModelConfig(num_experts=2, classifier="linear", scale=30.0), num_classes=10).eval()
    head = model.experts[0].classifier
    assert isinstance(head, nn.Linear)
    assert head.bias is not None
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, feature = model.forward_expert(0, model.forward_trunk(x))
    torch.testing.assert_close(logits, head(feature))


def test_shortcut_a_subsamples_and_zero_pads() -> None:
    x = torch.randn(2, 16, 8, 8)
    y = ShortcutA(16, 24, stride=2)(x)
    assert y.shape == (2, 24, 4, 4)
    assert torch.equal(y[:, 4:20], x[:, :, ::2, ::2])
    assert not y[:, :4].any()
    assert not y[:, 20:].any()


def test_kaiming_init_on_convs() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_experts=1), num_classes=10)
    conv = model.experts[0].features.layer3[1].conv1  # 48 x 48 x 3 x 3
    expected_std = (2.0 / (48 * 9)) ** 0.5
    assert abs(conv.weight.std().item() - expected_std) < 0.05 * expected_std


def test_share_stage2_only_for_cifar() -> None:
    with pytest.raises(ValueError, match="share_stage2"):
        build_model(ModelConfig(arch="ride_resnet10", share_stage2=True), num_classes=10)
