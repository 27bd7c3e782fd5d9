"""The exporter end to end on the tiny real checkpoints (tests/conftest.py) and real CIFAR-10 test images:
graphs, manifest, parity, dynamic batch, tamper detection, safety of the output folder, float16."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
import torch

from cascade import CascadeResult, run_cascade
from export import verify as verify_module
from export.__main__ import main
from export.build import export_checkpoint
from export.graphs import ExportError, SourceModel, check_graph, convert_to_float16, load_source
from export.manifest import (
    MANIFEST_NAME,
    Manifest,
    json_schema,
    load_manifest,
    sha256_file,
    shipped_schema,
)
from export.ort_model import OrtGraph, OrtModel
from export.verify import (
    FP32,
    VERIFICATION_FILE,
    Tolerances,
    VerificationError,
    check_parity,
    judge_cascade,
    load_verification_images,
    normalized,
)
from training.checkpoint import load_checkpoint, save_checkpoint, weights_sha256
from training.macs import cascade_cost
from training.models import ExpertOutputs

REPO = Path(__file__).resolve().parents[2]
FEW_IMAGES = 32  # for the exports whose parity is not what the test is about

pytestmark = pytest.mark.usefixtures("one_thread")


def _leftovers(parent: Path) -> list[str]:
    """Hidden temp folders the exporter may have left next to its output."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _copy(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


@pytest.fixture(scope="module")
def manifest(exported_model_dir: Path) -> Manifest:
    return load_manifest(exported_model_dir)


@pytest.fixture(scope="module")
def one_expert_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trunk and first expert of ``tiny_checkpoint`` as a 1-expert checkpoint (cheap to export)."""
    meta, weights = load_checkpoint(tiny_checkpoint)
    kept = {k: v for k, v in weights.items() if k.startswith(("trunk.", "experts.0."))}
    folder = tmp_path_factory.mktemp("one-expert") / "checkpoint"
    model = meta.model.model_copy(update={"num_experts": 1})
    save_checkpoint(folder, kept, meta.model_copy(update={"model": model, "metrics": None}))
    return folder


# ----------------------------------------------------------------------------------------------------------------
# The model folder
# ----------------------------------------------------------------------------------------------------------------


def test_folder_holds_exactly_the_graphs_and_manifest(exported_model_dir: Path) -> None:
    folder = exported_model_dir
    graphs = {"trunk.onnx", "expert_1.onnx", "expert_2.onnx", "expert_3.onnx", "router_1.onnx", "router_2.onnx"}
    assert {p.name for p in folder.iterdir()} == graphs | {MANIFEST_NAME, VERIFICATION_FILE}
    assert _leftovers(folder.parent) == []
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


def test_manifest_describes_the_checkpoint(manifest: Manifest, tiny_routed_checkpoint: Path) -> None:
    source = load_source(tiny_routed_checkpoint)
    meta = source.meta
    assert manifest.model.name == "tiny" and manifest.model.version.endswith(source.weights_sha256[:8])
    assert manifest.source_checkpoint.sha256 == weights_sha256(tiny_routed_checkpoint)
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


def test_manifest_matches_the_shipped_schema(exported_model_dir: Path) -> None:
    assert json_schema() == shipped_schema()
    jsonschema.validate(json.loads((exported_model_dir / MANIFEST_NAME).read_text()), shipped_schema())


# ----------------------------------------------------------------------------------------------------------------
# Parity and dynamic batch
# ----------------------------------------------------------------------------------------------------------------


def test_export_verified_parity_with_pytorch(exported_model_dir: Path) -> None:
    report = json.loads((exported_model_dir / VERIFICATION_FILE).read_text())
    assert report["passed"] and report["problems"] == [] and report["precision"] == "float32"
    assert report["num_images"] == 128 and report["tolerances"]["atol"] == 1e-4
    diffs = report["max_abs_diff"]
    assert diffs["cascade.logits"] <= 1e-4 and diffs["cascade.router_logits"] <= 1e-4
    assert all(diffs[f"expert_{k}.logits"] <= 1e-4 for k in (1, 2, 3))
    assert diffs["router_1"] <= 1e-4 and diffs["router_2"] <= 1e-4
    assert sum(report["experts_used_histogram"]) == 128


@dataclass
class Reference:
    """The exported graphs in onnxruntime, and PyTorch's answers on 64 normalised real test images."""

    onnx_model: OrtModel
    source: SourceModel
    images: torch.Tensor
    outputs: ExpertOutputs
    router_inputs: list[tuple[torch.Tensor, torch.Tensor]]  # per router: mean logits so far, expert feature
    router_logits: list[torch.Tensor]


@pytest.fixture(scope="module")
def reference(exported_model_dir: Path, manifest: Manifest, tiny_routed_checkpoint: Path, cifar10_dir: Path):
    source = load_source(tiny_routed_checkpoint)
    images = normalized(load_verification_images(source.meta, cifar10_dir, 64), source.meta)
    with torch.no_grad():
        outputs = source.model(images)
        inputs = [(outputs.logits[:, : k + 1].mean(dim=1), outputs.features[:, k]) for k in range(2)]
        logits = [source.routers(k + 1, *inputs[k]) for k in range(2)]
    return Reference(OrtModel(exported_model_dir, manifest), source, images, outputs, inputs, logits)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_every_graph_takes_any_batch_size(reference: Reference, batch: int) -> None:
    images = reference.images[:batch].numpy()
    got = reference.onnx_model.all_experts(images)
    assert got.shared.shape == (batch, 16, 32, 32)
    assert got.logits.shape == (batch, 3, 10) and got.features.shape == (batch, 3, 48)
    np.testing.assert_allclose(got.logits, reference.outputs.logits[:batch].numpy(), rtol=0, atol=1e-4)
    for k in (1, 2):
        mean, feature = (t[:batch].numpy() for t in reference.router_inputs[k - 1])
        router = reference.onnx_model.router(k, mean, feature)
        assert router.shape == (batch,)
        np.testing.assert_allclose(router, reference.router_logits[k - 1][:batch].numpy(), rtol=0, atol=1e-4)
    run = run_cascade(reference.onnx_model, images, thresholds=0.5, max_experts=3)
    assert run.logits.shape == (batch, 10) and run.experts_used.shape == (batch,)


def test_parity_holds_where_the_cascade_exits_early(early_exit_model_dir: Path) -> None:
    report = json.loads((early_exit_model_dir / VERIFICATION_FILE).read_text())
    assert report["passed"], report["problems"]
    used_1, used_2, used_3 = report["experts_used_histogram"]
    assert used_1 >= 20 and used_2 >= 5 and used_3 >= 5, report["experts_used_histogram"]
    assert report["max_abs_diff"]["cascade.logits"] <= 1e-4 and report["max_abs_diff"]["cascade.router_logits"] <= 1e-4


def test_rows_at_the_threshold_are_counted_and_may_decide_differently(
    early_exit_model_dir: Path, cifar10_dir: Path
) -> None:
    """Real data: at a threshold equal to one row's router probability, that row is counted as near-threshold
    and the export still passes whichever way the runtimes decide it."""
    manifest = load_manifest(early_exit_model_dir)
    onnx_model = OrtModel(early_exit_model_dir, manifest)
    source = load_source(Path(manifest.source_checkpoint.path))
    images = normalized(load_verification_images(source.meta, cifar10_dir, 16), source.meta)
    with torch.no_grad():
        outputs = source.model(images)
        logit = source.routers(1, outputs.logits[:, 0], outputs.features[:, 0])[3].item()
    threshold = 1.0 / (1.0 + math.exp(-logit))
    report = check_parity(onnx_model, source, images, threshold=threshold, tolerances=FP32)
    assert report.passed, report.summary()
    assert report.near_threshold_rows >= 1


def _result(logits, experts_used, router_logits) -> CascadeResult:
    """A hand-made cascade result (the fields the parity judge reads; the rest are placeholders)."""
    used = np.asarray(experts_used)
    return CascadeResult(
        logits=np.asarray(logits, dtype=np.float32),
        probabilities=np.asarray(logits, dtype=np.float32),
        experts_used=used,
        routers_evaluated=used,
        router_logits=np.asarray(router_logits, dtype=np.float32),
        relative_compute=np.ones(len(used)),
    )


def test_decision_flips_are_allowed_only_at_the_threshold() -> None:
    """The rule itself, on hand-made outputs: row 0 flips with its router logit 5e-6 from logit(0.5) = 0 (allowed,
    counted); row 1 flips with its logit at 0.3 (a failure); row 2 agrees."""
    logits = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]], dtype=np.float32)
    ref_router = np.array([[5e-6], [0.3], [-2.0]], dtype=np.float32)
    run = _result([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0]], [1, 1, 1], [[-5e-6], [-0.3], [-2.0]])
    report = judge_cascade(run, _result(logits, [2, 2, 1], ref_router), threshold=0.5, tolerances=FP32)
    assert (report.near_threshold_rows, report.decision_flips) == (1, 1)
    assert len(report.problems) == 2  # row 1's flip, and its router logit differing by 0.6
    assert any("1 rows used a different number of experts" in p for p in report.problems)
    assert report.experts_used_histogram == [3, 0]
    # The same, with row 1 agreeing with PyTorch: only the allowed flip remains.
    agreeing = np.array([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]], dtype=np.float32)
    fine_router = np.array([[5e-6], [-0.3], [-2.0]], dtype=np.float32)
    fine = judge_cascade(run, _result(agreeing, [2, 1, 1], fine_router), threshold=0.5, tolerances=FP32)
    assert fine.passed and fine.decision_flips == 1


def test_parity_check_detects_a_changed_weight(reference: Reference, tiny_routed_checkpoint: Path) -> None:
    """The comparison is not vacuous: the same graphs against a model with one expert weight nudged fail."""
    source = load_source(tiny_routed_checkpoint)
    with torch.no_grad():
        source.model.experts[1].features.layer3[4].conv2.weight[0, 0, 1, 1] += 0.05
    report = check_parity(reference.onnx_model, source, reference.images[:32], threshold=0.5, tolerances=FP32)
    assert not report.passed
    assert any(p.startswith("expert_2.") for p in report.problems), report.problems
    assert report.max_abs_diff["expert_1.logits"] <= 1e-4  # the untouched experts still agree


def test_fp16_router_graph_matches_pytorch(exported_model_dir: Path, reference: Reference, tmp_path: Path) -> None:
    """TopK, the L2 normalisation and both layers of a router run in float16 (the expert graphs' float16 path is
    covered end to end by test_fp16_no_router_export_replaces_a_folder_only_with_force)."""
    path = tmp_path / "router_2.onnx"
    shutil.copy(exported_model_dir / "router_2.onnx", path)
    convert_to_float16(path)
    check_graph(path, ["mean_logits", "feature"], ["router_logit"], opset=18)
    spec = load_manifest(exported_model_dir).graphs.routers[1]
    half = spec.model_copy(update={"inputs": [t.model_copy(update={"dtype": "float16"}) for t in spec.inputs]})
    mean, feature = (t.numpy() for t in reference.router_inputs[1])
    (got,) = OrtGraph(path, half)(mean_logits=mean, feature=feature)
    assert got.shape == (64, 1)
    want = reference.router_logits[1].numpy()
    # float16 keeps ~3 significant digits of these logits (about 10 to 20 for the tiny routers).
    np.testing.assert_allclose(got[:, 0], want, rtol=2e-3, atol=verify_module.FP16.atol)


# ----------------------------------------------------------------------------------------------------------------
# verify on demand and tampering
# ----------------------------------------------------------------------------------------------------------------


def test_verify_command_accepts_an_intact_folder(exported_model_dir: Path, cifar10_dir: Path, capsys) -> None:
    status = main(["verify", str(exported_model_dir), "--data-dir", str(cifar10_dir / "test"), "--num-images", "32"])
    assert status == 0, capsys.readouterr().err
    assert "OK" in capsys.readouterr().out


def test_flipped_byte_in_a_graph_fails_verify(exported_model_dir: Path, tmp_path: Path, cifar10_dir: Path) -> None:
    folder = _copy(exported_model_dir, tmp_path / "tampered")
    graph = folder / "expert_2.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    result = subprocess.run(
        [sys.executable, "-m", "export", "verify", str(folder), "--data-dir", str(cifar10_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "graph expert_2.onnx has sha256" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_changed_weights_with_a_matching_hash_fail_parity(
    exported_model_dir: Path, tmp_path: Path, cifar10_dir: Path, capsys
) -> None:
    """Someone edits a weight and updates the manifest's hash too: the parity check still catches it."""
    folder = _copy(exported_model_dir, tmp_path / "edited")
    model = onnx.load(str(folder / "expert_3.onnx"))
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[0] += 1.0
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(model, str(folder / "expert_3.onnx"))
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["graphs"]["experts"][2]["sha256"] = sha256_file(folder / "expert_3.onnx")
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    assert main(["verify", str(folder), "--data-dir", str(cifar10_dir), "--num-images", "32"]) == 1
    assert "expert_3.logits differs from PyTorch" in capsys.readouterr().err


def test_manifest_that_breaks_the_schema_fails_verify(exported_model_dir: Path, tmp_path: Path, capsys) -> None:
    folder = _copy(exported_model_dir, tmp_path / "bad-manifest")
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["graphs"]["trunk"]["macs_per_image"] = -1
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    assert main(["verify", str(folder)]) == 2
    assert "does not match the manifest schema at graphs/trunk/macs_per_image" in capsys.readouterr().err


def test_verify_refuses_a_different_checkpoint(exported_model_dir: Path, tiny_checkpoint: Path, capsys) -> None:
    assert main(["verify", str(exported_model_dir), "--checkpoint", str(tiny_checkpoint)]) == 2
    assert "but the model folder was exported from" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Safety of the output folder
# ----------------------------------------------------------------------------------------------------------------


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


def test_missing_or_corrupt_checkpoint_is_one_clear_error(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "models" / "m"
    assert main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().startswith("error: checkpoint folder not found")
    corrupt = _copy(tiny_checkpoint, tmp_path / "corrupt")
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["--checkpoint", str(corrupt), "--out", str(out)]) == 2
    assert "is corrupt or unreadable" in capsys.readouterr().err
    assert not out.parent.exists()


def test_force_never_replaces_a_folder_that_is_not_a_model_folder(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "models"
    (out / "other").mkdir(parents=True)
    with pytest.raises(ExportError, match="not a model folder"):
        export_checkpoint(tiny_checkpoint, out, force=True)
    assert (out / "other").is_dir()


def test_fp16_no_router_export_replaces_a_folder_only_with_force(
    exported_model_dir: Path, tiny_checkpoint: Path, cifar10_dir: Path, tmp_path: Path, capsys
) -> None:
    """A stage-1 checkpoint (no routers) exported with --fp16 over an existing model folder."""
    out = _copy(exported_model_dir, tmp_path / "models" / "tiny")
    before = (out / MANIFEST_NAME).read_bytes()
    command = ["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--fp16", "--data-dir", str(cifar10_dir)]
    command += ["--num-images", str(FEW_IMAGES)]
    assert main(command) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (out / MANIFEST_NAME).read_bytes() == before

    assert main([*command, "--force"]) == 0, capsys.readouterr().err
    assert _leftovers(out.parent) == []
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
