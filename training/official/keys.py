"""Parameter names of the official RIDE models and of ours, in both directions.

The official models keep everything under ``backbone.`` (``module.backbone.`` when saved from DataParallel): a
stem ``conv1`` / ``bn1``, shared stages ``layer1`` (CIFAR) or ``layer1``, ``layer2`` (ImageNet), per-expert stages
in ModuleLists ``layer2s`` / ``layer3s`` (CIFAR) or ``layer3s`` / ``layer4s`` (ImageNet), classifiers
``linears``, projection shortcuts ``downsample``, and for the expert-assignment (EA) models
``expert_help_pred_hidden_fcs`` (W1, one per router) and ``expert_help_pred_fc`` (W2, shared) or
``expert_help_pred_fcs`` (one W2 per router). Their one-expert models use singular names (``layer2``,
``linear``). Ours: ``trunk.stem.conv`` / ``trunk.stem.bn``, ``trunk.layerN``, ``experts.{e}.features.layerN``,
``experts.{e}.classifier``, ``shortcut``, and ``routers.hidden_fcs`` / ``routers.fc`` / ``routers.fcs``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BACKBONE = "backbone."
DATA_PARALLEL = "module."
OFFICIAL_SHORTCUT, OUR_SHORTCUT = ".downsample.", ".shortcut."


@dataclass(frozen=True)
class Layout:
    """Which of the official model's stages are shared and which belong to each expert."""

    shared_stages: tuple[str, ...]
    expert_stages: tuple[str, ...]


CIFAR_LAYOUT = Layout(shared_stages=("layer1",), expert_stages=("layer2", "layer3"))
IMAGENET_LAYOUT = Layout(shared_stages=("layer1", "layer2"), expert_stages=("layer3", "layer4"))


@dataclass(frozen=True)
class Naming:
    """Everything that decides the names: the layout, the number of experts and the routers' form."""

    layout: Layout
    num_experts: int
    num_routers: int = 0
    shared_fc: bool = True

    def prefix_pairs(self) -> list[tuple[str, str]]:
        """(official prefix below ``backbone.``, our prefix) for every module that holds weights."""
        pairs = [("conv1.", "trunk.stem.conv."), ("bn1.", "trunk.stem.bn.")]
        pairs += [(f"{stage}.", f"trunk.{stage}.") for stage in self.layout.shared_stages]
        if self.num_experts == 1:
            pairs += [(f"{stage}.", f"experts.0.features.{stage}.") for stage in self.layout.expert_stages]
            pairs.append(("linear.", "experts.0.classifier."))
        else:
            for e in range(self.num_experts):
                pairs += [(f"{stage}s.{e}.", f"experts.{e}.features.{stage}.") for stage in self.layout.expert_stages]
                pairs.append((f"linears.{e}.", f"experts.{e}.classifier."))
        pairs += [(f"expert_help_pred_hidden_fcs.{i}.", f"routers.hidden_fcs.{i}.") for i in range(self.num_routers)]
        if self.num_routers and self.shared_fc:
            pairs.append(("expert_help_pred_fc.", "routers.fc."))
        elif self.num_routers:
            pairs += [(f"expert_help_pred_fcs.{i}.", f"routers.fcs.{i}.") for i in range(self.num_routers)]
        return pairs

    def to_ours(self, official_key: str) -> str | None:
        """Our name of an official key given below ``backbone.``; None when no module of ours holds it."""
        return _rename(official_key, self.prefix_pairs(), OFFICIAL_SHORTCUT, OUR_SHORTCUT)

    def to_official(self, our_key: str) -> str | None:
        """The official name (below ``backbone.``) of one of our keys; None when the official model has none."""
        swapped = [(ours, official) for official, ours in self.prefix_pairs()]
        return _rename(our_key, swapped, OUR_SHORTCUT, OFFICIAL_SHORTCUT)


def _rename(key: str, pairs: list[tuple[str, str]], old_shortcut: str, new_shortcut: str) -> str | None:
    for source, target in pairs:
        if key.startswith(source):
            # A shortcut always sits inside a numbered block ("0.downsample.0.weight"), so it has dots on both sides.
            return target + key[len(source) :].replace(old_shortcut, new_shortcut)
    return None


def strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official state dict below ``backbone.``: the DataParallel ``module.`` prefix and ``backbone.`` removed.
    Keys outside ``backbone.`` are kept as they are (they then match nothing, and are reported)."""
    stripped = {}
    for key, value in state.items():
        name = key.removeprefix(DATA_PARALLEL)
        stripped[name.removeprefix(BACKBONE)] = value
    return stripped


def to_official_state_dict(state: dict[str, torch.Tensor], naming: Naming) -> dict[str, torch.Tensor]:
    """Our state dict (routers under ``routers.``) with the official names, ``backbone.`` included: what the
    official model's ``state_dict()`` holds for the same weights. Raises KeyError for a key it cannot name."""
    official = {}
    for key, value in state.items():
        name = naming.to_official(key)
        if name is None:
            raise KeyError(f"{key} has no counterpart in the official model")
        official[BACKBONE + name] = value
    return official
