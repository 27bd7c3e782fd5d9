"""The export end to end (`export.build`): the model folder, its manifest, all-or-nothing writes, float16."""

from __future__ import annotations

import json
import math
from pathlib import Path

import onnx
import pytest
import torch

from export import verify as verify_module
from export.__main__ import main
from export.build import export_checkpoint
from export.graphs import ExportError, load_source
from export.manifest import MANIFEST_NAME, Manifest, load_manifest
from export.verify import VERIFICATION_FILE, Tolerances, VerificationError
from tests.export.conftest import FEW_IMAGES, copy_folder, leftovers
from training.checkpoint import weights_sha256
from training.macs import cascade_cost

pytestmark = pytest.mark.usefixtures("one_thread")


def test_folder_holds_exactly_the_graphs_and_manifest(model_dir: Path) -> None:
    folder = model_dir
    graphs = {"trunk.onnx", "expert_1.onnx", "expert_2.onnx", "expert_3.onnx", "router_1.onnx", "router_2.onnx"}
    assert {p.name for p in folder.iterdir()} == graphs | {MANIFEST_NAME, VERIFICATION_FILE}
    assert leftovers(folder.parent) == []
    for name in graphs:
        model = onnx.load(str(folder / name))
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version == 18
        ops = {node.op_type for node in model.graph.node}
        assert "BatchNormalization" not in ops, name
        if name.startswith(("trunk", "expert")):
            assert "Conv" in ops, name
        if name.startswith("router"):
            assert {"TopK", "ReduceL2"} <= ops, name  # top-z and the L2 normalisation live in the graph
        # Single file: every weight is inside the graph.
        assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert (folder.stat().st_mode & 0o777) == 0o755


def test_manifest_describes_the_checkpoint(manifest: Manifest, early_exit_checkpoint: Path) -> None:
    source = load_source(early_exit_checkpoint)
    meta = source.meta
    assert manifest.model.name == "tiny-early-exit" and manifest.model.version.endswith(source.weights_sha256[:8])
    assert manifest.source_checkpoint.sha256 == weights_sha256(early_exit_checkpoint)
    assert [c.name for c in manifest.classes] == meta.class_names
    assert [c.train_count for c in manifest.classes] == meta.class_counts
    assert [c.group for c in manifest.classes] == meta.class_groups
    assert {c.group for c in manifest.classes} == {"many", "medium", "few"}
    assert (manifest.input.height, manifest.input.width) == (32, 32)
    assert manifest.input.mean == meta.input.mean and manifest.input.std == meta.input.std
    assert (manifest.input.resize, manifest.input.crop, manifest.input.scale) == ("bilinear", "none", 1 / 255)
    cascade = manifest.cascade
    assert (cascade.num_experts, cascade.has_routers, cascade.top_z) == (3, True, meta.routers.top_z)
    assert cascade.default_threshold == meta.routers.threshold and not cascade.all_experts_without_routers
    cost = cascade_cost(source.model, source.routers, 32)
    assert manifest.cost_model() == cost
    assert manifest.metrics.all_experts_accuracy == meta.metrics.all_experts.top1
    assert manifest.metrics.routed_accuracy == meta.metrics.routed.top1
    assert manifest.metrics.mean_experts_used == meta.metrics.routed.mean_experts_used
    assert manifest.exported_with.opset == 18 and manifest.exported_with.torch == torch.__version__
    trunk_out = manifest.graphs.trunk.outputs[0]
    assert (trunk_out.name, trunk_out.shape, trunk_out.dtype) == ("shared", ["N", 16, 32, 32], "float32")
    assert [(t.name, t.shape) for t in manifest.graphs.experts[2].outputs] == [
        ("logits", ["N", 10]),
        ("feature", ["N", 48]),
    ]
    assert [(t.name, t.shape) for t in manifest.graphs.routers[1].inputs] == [
        ("mean_logits", ["N", 10]),
        ("feature", ["N", 48]),
    ]
    assert [(t.name, t.shape) for t in manifest.graphs.routers[1].outputs] == [("router_logit", ["N", 1])]


def test_failed_verification_leaves_nothing_behind(
    one_expert_checkpoint: Path, cifar10_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a zero tolerance the (correct) graphs cannot pass, so this checks the clean-up after a failed
    verification, not the detection itself (see test_parity_check_detects_a_changed_weight)."""
    exact = Tolerances(atol=0.0, rtol=0.0, router_rtol=0.0, threshold_band=0.0, tie_margin=0.0)
    monkeypatch.setattr(verify_module, "FP32", exact)
    parent = tmp_path / "models"
    with pytest.raises(VerificationError, match="do not match the checkpoint"):
        export_checkpoint(one_expert_checkpoint, parent / "one", data_dir=cifar10_dir, num_images=16)
    assert not parent.exists()  # not even the parent folder it had to create
    parent.mkdir()
    with pytest.raises(VerificationError, match="do not match the checkpoint"):
        export_checkpoint(one_expert_checkpoint, parent / "one", data_dir=cifar10_dir, num_images=16)
    assert list(parent.iterdir()) == []


def test_opset_below_18_is_refused(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "models" / "old"
    with pytest.raises(ExportError, match="opset 18 or newer"):
        export_checkpoint(tiny_checkpoint, out, opset=17)
    assert main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--opset", "17"]) == 2
    assert "opset 18 or newer" in capsys.readouterr().err
    assert not out.parent.exists()


def test_force_never_replaces_a_folder_that_is_not_a_model_folder(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "models"
    (out / "other").mkdir(parents=True)
    with pytest.raises(ExportError, match="not a model folder"):
        export_checkpoint(tiny_checkpoint, out, force=True)
    assert (out / "other").is_dir()


def test_fp16_no_router_export_replaces_a_folder_only_with_force(
    model_dir: Path, tiny_checkpoint: Path, cifar10_dir: Path, tmp_path: Path, capsys
) -> None:
    """A stage-1 checkpoint (no routers) exported with --fp16 over an existing model folder."""
    out = copy_folder(model_dir, tmp_path / "models" / "tiny")
    before = (out / MANIFEST_NAME).read_bytes()
    command = ["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--fp16", "--data-dir", str(cifar10_dir)]
    command += ["--num-images", str(FEW_IMAGES)]
    assert main(command) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (out / MANIFEST_NAME).read_bytes() == before

    assert main([*command, "--force"]) == 0, capsys.readouterr().err
    assert leftovers(out.parent) == []
    manifest = load_manifest(out)
    # No routers: no router graphs (the old folder's are gone) and every request runs all experts.
    assert not manifest.cascade.has_routers and manifest.cascade.all_experts_without_routers
    assert manifest.graphs.routers == [] and manifest.cascade.top_z is None
    assert len(manifest.graphs.experts) == 3 and not list(out.glob("router_*.onnx"))
    assert manifest.source_checkpoint.sha256 == weights_sha256(tiny_checkpoint)
    # float16 weights, inputs and outputs.
    assert manifest.precision == "float16" and manifest.input.dtype == "float16"
    assert {t.dtype for g in manifest.graph_specs() for t in [*g.inputs, *g.outputs]} == {"float16"}
    weight_types = {t.data_type for t in onnx.load(str(out / "expert_1.onnx")).graph.initializer}
    assert onnx.TensorProto.FLOAT16 in weight_types and onnx.TensorProto.FLOAT not in weight_types
    report = json.loads((out / VERIFICATION_FILE).read_text())
    assert report["passed"] and report["precision"] == "float16"
    assert report["experts_used_histogram"] == [0, 0, FEW_IMAGES]
    assert report["max_abs_diff"]["cascade.logits"] <= verify_module.FP16.atol
    assert not math.isnan(report["max_abs_diff"]["trunk"])
