"""int8 export (`export.quantize`, `export.int8`, `export.parity_gate`): quantized graphs, calibration on training
images only, routers kept in float32 when int8 moves their decisions, the gate's figures, its refusal, the
`quantize` command for a float32 folder, and `verify` on an int8 folder."""

from __future__ import annotations

import json
import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from cascade import CascadeResult, run_cascade
from export import int8 as int8_module
from export.__main__ import main
from export.build import export_checkpoint
from export.int8_data import int8_images, load_splits
from export.manifest import MANIFEST_NAME, ManifestError, load_manifest, validate_manifest_dict
from export.ort_model import OrtModel
from export.parity_gate import judge
from export.quantize import decisions_moved, quantize_folder
from export.verify import VERIFICATION_FILE, VerificationError
from tests.export.conftest import leftovers
from training.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def _ops(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def _tiny_data(checkpoint: Path):
    meta, _ = load_checkpoint(checkpoint)
    return meta, load_splits(meta.config.data, None, class_names=meta.class_names, class_counts=meta.class_counts)


def test_int8_export_quantizes_the_body_and_records_it(
    early_exit_int8_model_dir: Path, early_exit_model_dir: Path
) -> None:
    folder = early_exit_int8_model_dir
    manifest = load_manifest(folder)
    quantization = manifest.quantization
    assert manifest.precision == "int8" and quantization is not None
    assert manifest.model.name == "tiny-early-exit-int8" and manifest.model.version.endswith("-int8")
    assert quantization.quantized_from.version == manifest.model.version.removesuffix("-int8")
    assert manifest.input.dtype == "float32"  # QDQ graphs take and give float32
    assert leftovers(folder.parent) == []
    for spec in [manifest.graphs.trunk, *manifest.graphs.experts]:
        ops = _ops(folder / spec.file)
        assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops, spec.file
        assert quantization.graphs[spec.file] == "int8"
        # The cosine head stays float32: its MatMul reads a float feature, and no logit is quantized.
        model = onnx.load(str(folder / spec.file))
        producers = {out: node.op_type for node in model.graph.node for out in node.output}
        assert all(producers[o.name] != "DequantizeLinear" for o in model.graph.output), spec.file
        # Every convolution's weight is stored as int8 (per output channel).
        int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
        assert len(int8_weights) == sum(node.op_type == "Conv" for node in model.graph.node) > 0, spec.file
    for spec, moved in zip(manifest.graphs.routers, quantization.router_decisions_moved, strict=True):
        kept_float32 = quantization.graphs[spec.file] == "float32"
        assert kept_float32 == (moved > 0), spec.file
        if kept_float32:  # the float32 router itself, byte for byte
            assert (folder / spec.file).read_bytes() == (early_exit_model_dir / spec.file).read_bytes()
    assert quantization.calibration.split == "train" and quantization.calibration.num_images == 129
    assert (quantization.weights, quantization.activations, quantization.reduce_range) == (
        "int8 per-channel symmetric",
        "uint8 per-tensor asymmetric",
        True,
    )
    record = json.loads((folder / VERIFICATION_FILE).read_text())
    assert record["precision"] == "int8" and record["int8_parity_gate"]["passed"]
    assert record["float32"]["passed"] and record["float32"]["precision"] == "float32"


def test_gate_figures_are_what_the_two_cascades_give(
    early_exit_int8_model_dir: Path, early_exit_model_dir: Path, early_exit_checkpoint: Path
) -> None:
    """Recomputed here from the two model folders on the run's validation split."""
    manifest8, manifest32 = load_manifest(early_exit_int8_model_dir), load_manifest(early_exit_model_dir)
    meta, data = _tiny_data(early_exit_checkpoint)
    images = int8_images(data, calibration_images=1, mean=meta.input.mean, std=meta.input.std)
    labels, threshold = images.validation_labels, manifest32.cascade.default_threshold
    runs = [
        run_cascade(OrtModel(folder, m.graphs), images.validation, thresholds=threshold, max_experts=3)
        for folder, m in ((early_exit_model_dir, manifest32), (early_exit_int8_model_dir, manifest8))
    ]
    predicted = [run.logits.argmax(axis=1) for run in runs]
    gate = manifest8.quantization.parity_gate
    assert gate.split == "validation" and gate.num_images == len(labels) == 30
    assert gate.threshold == threshold
    assert gate.top1_agreement == pytest.approx(np.mean(predicted[0] == predicted[1]))
    assert gate.float32_accuracy == pytest.approx(np.mean(predicted[0] == labels))
    assert gate.int8_accuracy == pytest.approx(np.mean(predicted[1] == labels))
    assert gate.accuracy_change_points == pytest.approx(100 * (gate.int8_accuracy - gate.float32_accuracy))
    assert gate.float32_mean_experts == pytest.approx(runs[0].experts_used.mean())
    assert gate.int8_mean_experts == pytest.approx(runs[1].experts_used.mean())
    assert gate.max_accuracy_drop_points == 100.0


def test_calibration_reads_training_images_only(early_exit_checkpoint: Path) -> None:
    meta, data = _tiny_data(early_exit_checkpoint)
    images = int8_images(data, calibration_images=50, mean=meta.input.mean, std=meta.input.std)
    assert len(images.calibration) == 50

    def rows(array: np.ndarray) -> set[bytes]:
        return {row.tobytes() for row in array}

    train = int8_images(data, calibration_images=10_000, mean=meta.input.mean, std=meta.input.std).calibration
    assert len(train) == len(data.train) == 129  # asking for more than there are gives all of them
    assert rows(images.calibration) <= rows(train)
    assert not rows(images.calibration) & rows(images.validation)


def test_routers_stay_int8_when_no_decision_can_move(early_exit_model_dir: Path, tmp_path: Path) -> None:
    """At threshold 0 every row continues whatever the router says, so int8 routers move nothing and are kept;
    at the model's threshold the record says which were kept float32 and why."""
    manifest = load_manifest(early_exit_model_dir)
    rng = np.random.default_rng(0)
    calibration = rng.standard_normal((32, 3, 32, 32)).astype(np.float32)
    at_zero = quantize_folder(early_exit_model_dir, manifest, tmp_path, calibration, threshold=0.0)
    assert at_zero.router_decisions_moved == [0, 0]
    for spec in manifest.graphs.routers:
        assert at_zero.precision[spec.file] == "int8" and "QuantizeLinear" in _ops(tmp_path / spec.file)


def test_decisions_moved_counts_rows_across_the_threshold() -> None:
    float32 = np.array([-1.0, 0.2, 0.0, 3.0], dtype=np.float32)
    int8 = np.array([-1.0, -0.2, 0.0, 2.0], dtype=np.float32)
    assert decisions_moved(float32, int8, 0.5) == 1  # logit(0.5) = 0: only the second row crosses it
    assert decisions_moved(float32, int8, 0.0) == 0


def _result(predictions: list[int], experts: list[int]) -> CascadeResult:
    logits = np.eye(3, dtype=np.float32)[predictions]
    n = len(predictions)
    return CascadeResult(
        logits=logits,
        probabilities=logits,
        experts_used=np.array(experts),
        routers_evaluated=np.array(experts) - 1,
        router_logits=np.zeros((n, 2), dtype=np.float32),
        relative_compute=np.ones(n),
    )


def test_gate_passes_a_drop_of_exactly_the_bound_and_refuses_more() -> None:
    labels = np.array([0, 1, 2, 0] * 50)  # 200 images: one image is 0.5 points
    float32 = _result(labels.tolist(), [1] * 200)
    one_wrong = _result([1, *labels[1:].tolist()], [1] * 199 + [2])
    two_wrong = _result([1, 0, *labels[2:].tolist()], [2] * 200)
    report = judge(float32, one_wrong, labels, threshold=0.9, max_accuracy_drop_points=0.5)
    assert report.passed and report.accuracy_change_points == pytest.approx(-0.5)
    assert report.top1_agreement == pytest.approx(199 / 200) and report.experts_change == pytest.approx(0.005)
    refused = judge(float32, two_wrong, labels, threshold=0.9, max_accuracy_drop_points=0.5)
    assert not refused.passed and refused.accuracy_change_points == pytest.approx(-1.0)
    assert refused.int8_mean_experts == 2.0 and "FAILED" in refused.summary()
    assert judge(two_wrong, float32, labels, threshold=0.9, max_accuracy_drop_points=0.0).passed  # a gain


def test_refused_int8_export_leaves_nothing_behind(
    early_exit_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The gate's figures are made to show a drop beyond the bound (the rule itself is tested above): this checks
    the refusal's exit status, message and clean-up."""
    real_gate = int8_module.run_gate

    def losing_gate(*args, **kwargs):
        report = real_gate(*args, **kwargs)
        return replace(report, int8_correct=report.float32_correct - 5, max_accuracy_drop_points=0.5)

    monkeypatch.setattr(int8_module, "run_gate", losing_gate)
    parent = tmp_path / "models"
    out = parent / "refused"
    status = main(["--checkpoint", str(early_exit_checkpoint), "--out", str(out), "--int8", "--num-images", "16"])
    assert status == 1
    err = capsys.readouterr().err
    assert "refused by its parity gate" in err and "FAILED" in err
    assert not parent.exists()


def test_fp16_and_int8_exclude_each_other(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "models" / "both"
    assert main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--fp16", "--int8"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert not out.parent.exists()


def _tiny_config_file(checkpoint: Path, folder: Path) -> Path:
    """The tiny run's data section as a TOML config file (what `python -m export quantize` reads)."""
    meta, _ = load_checkpoint(checkpoint)
    data = meta.config.data.model_dump(exclude_none=True)
    lines = ["[data]"] + [f"{key} = {json.dumps(value)}" for key, value in data.items()]
    path = folder / "tiny.toml"
    path.write_text("\n".join(lines) + "\n")
    tomllib.loads(path.read_text())  # valid TOML
    return path


def test_quantize_command_makes_an_int8_folder_from_a_float32_one(
    early_exit_model_dir: Path, early_exit_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    config = _tiny_config_file(early_exit_checkpoint, tmp_path)
    out = tmp_path / "models" / "q8"
    command = ["quantize", str(early_exit_model_dir), "--out", str(out), "--config", str(config)]
    assert main([*command, "--calibration-images", "64", "--max-accuracy-drop", "100"]) == 0, capsys.readouterr()
    manifest = load_manifest(out)
    assert manifest.precision == "int8" and manifest.quantization.calibration.num_images == 64
    source = load_manifest(early_exit_model_dir)
    assert manifest.quantization.quantized_from == source.model
    assert manifest.source_checkpoint == source.source_checkpoint
    assert "int8 parity gate on 30 validation images" in capsys.readouterr().err
    # Another split (no validation images held out) is refused before anything is written.
    again = tmp_path / "models" / "q8-other-split"
    assert main([*command[:2], "--out", str(again), "--config", str(config), "--set", "data.val_per_class=0"]) == 2
    assert "the model was trained on" in capsys.readouterr().err and not again.exists()
    # Only a float32 folder can be quantized.
    assert main(["quantize", str(out), "--out", str(again), "--config", str(config)]) == 2
    assert "only float32 models" in capsys.readouterr().err and not again.exists()


def test_verify_judges_an_int8_folder_by_its_gate(early_exit_int8_model_dir: Path, capsys) -> None:
    assert main(["verify", str(early_exit_int8_model_dir)]) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert "OK" in captured.out and "int8 parity gate on 30 validation images" in captured.err


def test_int8_manifest_needs_its_quantization_record(early_exit_int8_model_dir: Path) -> None:
    data = json.loads((early_exit_int8_model_dir / MANIFEST_NAME).read_text())
    validate_manifest_dict(data)
    without = {key: value for key, value in data.items() if key != "quantization"}
    with pytest.raises(ManifestError, match="quantization record is required"):
        validate_manifest_dict(without)
    with pytest.raises(ManifestError, match="quantization record is required"):
        validate_manifest_dict({**data, "precision": "float32"})
    partial = json.loads(json.dumps(data))
    del partial["quantization"]["graphs"]["trunk.onnx"]
    with pytest.raises(ManifestError, match="every graph file"):
        validate_manifest_dict(partial)


def test_int8_export_refuses_a_run_without_validation_split(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Data problems are found before the float32 export starts; the tiny run does hold out 3 images per class,
    so a checkpoint whose config holds out none is made by editing a copy's sidecar."""
    import shutil

    folder = Path(shutil.copytree(tiny_checkpoint, tmp_path / "no-val"))
    meta = json.loads((folder / "checkpoint.json").read_text())
    meta["config"]["data"]["val_per_class"] = 0
    meta["class_counts"] = [n + 3 for n in meta["class_counts"]]
    (folder / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="validation split") as caught:
        export_checkpoint(folder, tmp_path / "models" / "x", int8=True)
    assert not isinstance(caught.value, VerificationError)
    assert not (tmp_path / "models").exists()
