"""Fixtures of the exporter tests: the served tiny model folder (``model_dir``, tests/conftest.py), PyTorch's
answers on real test images beside it, and a cheap one-expert checkpoint."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from export.graphs import SourceModel, load_source
from export.manifest import Manifest, load_manifest
from export.ort_model import OrtModel
from export.verify import load_verification_images, normalized
from training.checkpoint import load_checkpoint, save_checkpoint
from training.models import ExpertOutputs

FEW_IMAGES = 32  # for the exports whose parity is not what the test is about


def leftovers(parent: Path) -> list[str]:
    """Hidden temp folders the exporter may have left next to its output."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def copy_folder(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


@pytest.fixture(scope="module")
def manifest(model_dir: Path) -> Manifest:
    return load_manifest(model_dir)


@pytest.fixture(scope="module")
def one_expert_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trunk and first expert of ``tiny_checkpoint`` as a 1-expert checkpoint (cheap to export)."""
    meta, weights = load_checkpoint(tiny_checkpoint)
    kept = {k: v for k, v in weights.items() if k.startswith(("trunk.", "experts.0."))}
    folder = tmp_path_factory.mktemp("one-expert") / "checkpoint"
    model = meta.model.model_copy(update={"num_experts": 1})
    save_checkpoint(folder, kept, meta.model_copy(update={"model": model, "metrics": None}))
    return folder


@dataclass
class Reference:
    """The exported graphs in onnxruntime, and PyTorch's answers on 64 normalised real test images."""

    folder: Path
    onnx_model: OrtModel
    source: SourceModel
    images: torch.Tensor
    outputs: ExpertOutputs
    router_inputs: list[tuple[torch.Tensor, torch.Tensor]]  # per router: mean logits so far, expert feature
    router_logits: list[torch.Tensor]


@pytest.fixture(scope="module")
def reference(model_dir: Path, manifest: Manifest, early_exit_checkpoint: Path, cifar10_dir: Path) -> Reference:
    """``model_dir`` in onnxruntime beside its checkpoint's PyTorch outputs on 64 real test images."""
    source = load_source(early_exit_checkpoint)
    images = normalized(load_verification_images(source.meta, cifar10_dir, 64), source.meta)
    with torch.no_grad():
        outputs = source.model(images)
        inputs = [(outputs.logits[:, : k + 1].mean(dim=1), outputs.features[:, k]) for k in range(2)]
        logits = [source.routers(k + 1, *inputs[k]) for k in range(2)]
    return Reference(model_dir, OrtModel(model_dir, manifest.graphs), source, images, outputs, inputs, logits)
