"""Which of our models an official RIDE checkpoint is, read from its ``arch`` name and its tensor shapes, and its
weights under our names.

The name gives the family (ResNet-32 for CIFAR, ResNet-10 / ResNet-50 / ResNeXt-50 for 224x224 images) and
whether it is an expert-assignment (EA) model with routers. The shapes give the rest: the number of experts
(classifiers), the classes and the classifier kind (``NormedLinear`` [d, C] without bias is our cosine classifier,
``nn.Linear`` [C, d] with bias our linear one), the reduced or full expert width (the classifier's input width),
and the routers' top-z count, hidden width, and shared or per-router output layer. Every tensor is then checked
against our model built from that description, so a file that matches no supported architecture fails naming
the key and both shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from training.checkpoint import CheckpointError, RouterInfo
from training.config import ModelConfig
from training.models import build_model
from training.models.router import Routers
from training.official.keys import BACKBONE, CIFAR_LAYOUT, IMAGENET_LAYOUT, Layout, Naming

ROUTER_HIDDEN_PREFIX = "expert_help_pred_hidden_fcs."
SHARED_FC_WEIGHT = "expert_help_pred_fc.weight"
PER_ROUTER_FC_PREFIX = "expert_help_pred_fcs."
OFFICIAL_SCALE = 30.0  # the official models' default s; a config's arch.args.s overrides it
OFFICIAL_THRESHOLD = 0.5  # the official EA forward continues iff sigmoid(router logit) > 0.5


@dataclass(frozen=True)
class OfficialArch:
    """An official model class (``model/model.py``) and the model of ours with the same layout."""

    name: str
    our_arch: str
    layout: Layout
    routed: bool  # an EA model: its state dict holds router weights
    image_size: int
    # Classifier input width -> reduce_dimension (reduced experts: the paper's "filters reduced by 1/4").
    widths: dict[int, bool]


def _family(names: tuple[str, str], our_arch: str, layout: Layout, size: int, widths: dict[int, bool]) -> list:
    plain, routed = names
    return [
        OfficialArch(plain, our_arch, layout, False, size, widths),
        OfficialArch(routed, our_arch, layout, True, size, widths),
    ]


OFFICIAL_ARCHES: dict[str, OfficialArch] = {
    arch.name: arch
    for arch in [
        *_family(("ResNet32Model", "ResNet32EAModel"), "ride_resnet32", CIFAR_LAYOUT, 32, {48: True, 64: False}),
        *_family(("ResNet10Model", "ResNet10EAModel"), "ride_resnet10", IMAGENET_LAYOUT, 224, {384: True, 512: False}),
        *_family(
            ("ResNet50Model", "ResNet50EAModel"), "ride_resnet50", IMAGENET_LAYOUT, 224, {1536: True, 2048: False}
        ),
        *_family(
            ("ResNeXt50Model", "ResNeXt50EAModel"), "ride_resnext50", IMAGENET_LAYOUT, 224, {1536: True, 2048: False}
        ),
    ]
}
# What ``type(model).__name__`` says when the trainer wrapped the model; the config's arch.type then tells.
WRAPPER_NAMES = ("DataParallel", "DistributedDataParallel")


def resolve_arch(file_arch: Any, config_arch: Any, override: str | None) -> OfficialArch:
    """The official architecture: ``--arch`` if given, else the file's ``arch``, else (for a DataParallel
    wrapper or a file without one) the config's ``arch.type``."""
    name = override or file_arch
    if name is None or name in WRAPPER_NAMES:
        name = config_arch
    if not isinstance(name, str):
        raise CheckpointError(
            f"the checkpoint does not say which official architecture it is (arch = {file_arch!r}, no config "
            f"arch.type): give --arch, one of {', '.join(OFFICIAL_ARCHES)}"
        )
    if name not in OFFICIAL_ARCHES:
        raise CheckpointError(
            f"unknown official architecture {name!r}: supported are {', '.join(OFFICIAL_ARCHES)} (ResNet-101/152 and "
            "ResNeXt-152 are not)"
        )
    return OFFICIAL_ARCHES[name]


@dataclass
class ImportedModel:
    """An official model in our terms: its config, its routers' settings (None without routers), and its weights
    under our names (router weights under ``routers.``)."""

    model: ModelConfig
    num_classes: int
    routers: RouterInfo | None
    state: dict[str, torch.Tensor]
    naming: Naming


def _shown(key: str) -> str:
    return BACKBONE + key


def _listing(keys: list[str], shown: int = 5) -> str:
    return ", ".join(keys[:shown]) + (" ..." if len(keys) > shown else "")


def _indexed(state: dict[str, torch.Tensor], prefix: str) -> int:
    """How many ``prefix{i}.`` modules the state dict holds (1 + the largest index; 0 when none)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = [int(m.group(1)) for key in state if (m := pattern.match(key))]
    return max(indices) + 1 if indices else 0


def _classifier(state: dict[str, torch.Tensor]) -> tuple[int, str, torch.Tensor, bool]:
    """(experts, name of the first classifier weight, that weight, has a bias)."""
    experts = _indexed(state, "linears.")
    prefix = "linears.0." if experts else "linear."
    weight = state.get(prefix + "weight")
    if weight is None:
        raise CheckpointError(f"missing key {_shown('linears.0.weight')} (or {_shown('linear.weight')}): no classifier")
    if weight.dim() != 2:
        raise CheckpointError(f"{_shown(prefix + 'weight')} has shape {list(weight.shape)}; a classifier is 2-D")
    return max(experts, 1), prefix + "weight", weight, prefix + "bias" in state


def _model_config(arch: OfficialArch, state: dict[str, torch.Tensor], scale: float) -> tuple[ModelConfig, int, int]:
    """(our model config, classes, feature width = the classifier's input width)."""
    experts, key, weight, has_bias = _classifier(state)
    # NormedLinear stores [in, out] without a bias; nn.Linear [out, in] with one.
    width, num_classes = (weight.shape[1], weight.shape[0]) if has_bias else (weight.shape[0], weight.shape[1])
    if width not in arch.widths:
        expected = " or ".join(str(w) for w in arch.widths)
        raise CheckpointError(
            f"{_shown(key)} has shape {list(weight.shape)}: an input width of {width} matches no {arch.name} "
            f"(expected {expected}, the reduced or the full expert width)"
        )
    if experts > 8:
        raise CheckpointError(f"the checkpoint has {experts} experts; at most 8 are supported")
    model = ModelConfig(
        arch=arch.our_arch,
        num_experts=experts,
        reduce_dimension=arch.widths[width],
        classifier="linear" if has_bias else "cosine",
        scale=scale,
    )
    return model, num_classes, width


def _router_info(
    state: dict[str, torch.Tensor], num_experts: int, num_classes: int, feature_dim: int, config_top_z: Any
) -> RouterInfo:
    count = _indexed(state, ROUTER_HIDDEN_PREFIX)
    if count != num_experts - 1:
        missing = _shown(f"{ROUTER_HIDDEN_PREFIX}{count}.weight")
        raise CheckpointError(
            f"an EA model with {num_experts} experts has {num_experts - 1} routers, but the checkpoint holds {count} "
            f"router hidden layers (missing key {missing} or extra ones)"
        )
    hidden_weight = state[f"{ROUTER_HIDDEN_PREFIX}0.weight"]
    hidden, feature_in = hidden_weight.shape
    if feature_in != feature_dim:
        # The official EA code has a hard-coded switch (layer3_feat / layer4_feat) to feed the router the feature
        # of the stage before the last. Our expert graphs output only the last stage's pooled feature, so such a
        # router cannot run in the exported cascade: refuse rather than feed it another feature.
        raise CheckpointError(
            f"{_shown(ROUTER_HIDDEN_PREFIX + '0.weight')} has shape {list(hidden_weight.shape)}: the routers read a "
            f"feature of width {feature_in}, but the experts' last stage gives {feature_dim}. Routers that read an "
            "earlier stage (layer3_feat / layer4_feat = False in the official code) are not supported: the "
            "exported expert graphs output only the last stage's pooled feature"
        )
    shared_fc = SHARED_FC_WEIGHT in state
    fc_key = SHARED_FC_WEIGHT if shared_fc else f"{PER_ROUTER_FC_PREFIX}0.weight"
    if fc_key not in state:
        raise CheckpointError(
            f"missing key {_shown(SHARED_FC_WEIGHT)} (or {_shown(PER_ROUTER_FC_PREFIX + '0.weight')}): the routers' "
            "output layer"
        )
    top_z = state[fc_key].shape[1] - hidden
    if not 1 <= top_z <= num_classes:
        raise CheckpointError(
            f"{_shown(fc_key)} has shape {list(state[fc_key].shape)}: {top_z} top logits for {num_classes} classes "
            f"(with a hidden width of {hidden}) matches no router"
        )
    if config_top_z is not None and config_top_z != top_z:
        raise CheckpointError(
            f"the checkpoint's config says top_choices_num = {config_top_z}, but {_shown(fc_key)} has shape "
            f"{list(state[fc_key].shape)}, i.e. {top_z} top logits: the file contradicts itself"
        )
    return RouterInfo(
        top_z=top_z,
        hidden=hidden,
        shared_fc=shared_fc,
        threshold=OFFICIAL_THRESHOLD,
        threshold_source="official (continue when sigmoid(router logit) > 0.5)",
    )


def _expected_state(model: ModelConfig, num_classes: int, routers: RouterInfo | None) -> dict[str, torch.Tensor]:
    """Our model's (and routers') state dict for this description: names and shapes to check the file against
    (built on the meta device: shapes only, no memory, no initialisation)."""
    with torch.device("meta"):
        built = build_model(model, num_classes)
        state = dict(built.state_dict())
        if routers is not None:
            router_module = Routers(
                model.num_experts, num_classes, built.feature_dim, routers.top_z, routers.hidden, routers.shared_fc
            )
            state.update({f"routers.{key}": value for key, value in router_module.state_dict().items()})
    return state


def convert(arch: OfficialArch, state: dict[str, torch.Tensor], config_args: dict[str, Any]) -> ImportedModel:
    """Our model description and weights from the official state dict ``state`` (below ``backbone.``).

    ``config_args`` are the official config's ``arch.args`` (may be empty): ``s`` and ``top_choices_num`` are
    read from it. Raises CheckpointError naming the key for a missing, unexpected or mis-shaped tensor.
    """
    not_tensors = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"the state dict holds non-tensors, e.g. {_shown(not_tensors[0])}")
    model, num_classes, feature_dim = _model_config(arch, state, float(config_args.get("s", OFFICIAL_SCALE)))
    has_router_weights = any(key.startswith("expert_help_pred") for key in state)
    routers = None
    if arch.routed:
        routers = _router_info(state, model.num_experts, num_classes, feature_dim, config_args.get("top_choices_num"))
    elif has_router_weights:
        raise CheckpointError(
            f"the checkpoint holds router weights (expert_help_pred_*) but its architecture {arch.name} has none: "
            f"give --arch with the EA model, e.g. {arch.name.replace('Model', 'EAModel')}"
        )
    naming = Naming(
        arch.layout,
        model.num_experts,
        num_routers=0 if routers is None else model.num_experts - 1,
        shared_fc=routers is None or routers.shared_fc,
    )
    expected = _expected_state(model, num_classes, routers)
    ours: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in state.items():
        name = naming.to_ours(key)
        if name is None or name not in expected:
            unexpected.append(_shown(key))
            continue
        if value.shape != expected[name].shape:
            raise CheckpointError(
                f"{_shown(key)} has shape {list(value.shape)}, but {arch.name} with {model.num_experts} experts, "
                f"{'reduced' if model.reduce_dimension else 'full'} width and {num_classes} classes needs "
                f"{list(expected[name].shape)}"
            )
        ours[name] = value.float() if value.is_floating_point() else value
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} keys match no part of {arch.name}: {_listing(sorted(unexpected))}")
    missing = [key for key in expected if key not in ours]
    if missing:
        names = [_shown(naming.to_official(key) or key) for key in missing]
        raise CheckpointError(f"{len(missing)} keys of {arch.name} are missing: {_listing(names)}")
    return ImportedModel(model, num_classes, routers, ours, naming)
