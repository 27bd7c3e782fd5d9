"""The validation accuracy/compute curve in the manifest (format 3): what the export measures, the checks on it,
and `python -m export curve` for a folder exported before format 3."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cascade import run_cascade
from export.__main__ import main
from export.build import add_curve_to_folder, export_checkpoint
from export.manifest import MANIFEST_NAME, ManifestError, load_manifest, validate_manifest_dict
from export.ort_model import OrtModel
from tests.export.conftest import copy_folder
from training.checkpoint import load_checkpoint
from training.data import load_data, normalize

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "models" / "cifar10-lt-ride4"
BUNDLED_CONFIG = ["--config", str(REPO / "configs" / "cifar10_lt_ride4.toml"), "--set", "data.val_per_class=20"]


def validation_split(checkpoint: Path) -> tuple[np.ndarray, np.ndarray]:
    meta, _ = load_checkpoint(checkpoint)
    data = load_data(meta.config.data, None, progress=False)
    return normalize(data.val.images, meta.input.mean, meta.input.std).numpy(), data.val.labels.numpy()


def test_the_export_stores_the_curve_of_its_graphs_on_the_validation_split(
    model_dir: Path, early_exit_checkpoint: Path
) -> None:
    manifest = load_manifest(model_dir)
    curve = manifest.operating_curve
    images, labels = validation_split(early_exit_checkpoint)
    assert manifest.format_version == 3 and curve is not None and curve.num_images == len(labels) == 30
    thresholds = [p.threshold for p in curve.points]
    assert manifest.cascade.default_threshold in thresholds and {0.0, 0.5, 1.0} <= set(thresholds)
    # Each point is what the served cascade gives on the split at that threshold, run on the graphs themselves.
    model = OrtModel(model_dir, manifest.graphs)
    for point in curve.points[:: max(1, len(curve.points) // 7)]:
        result = run_cascade(model, images, thresholds=point.threshold, max_experts=manifest.cascade.num_experts)
        assert point.accuracy == pytest.approx(float((result.logits.argmax(axis=1) == labels).mean()))
        assert point.relative_compute == pytest.approx(float(result.relative_compute.mean()))
        assert point.mean_experts_used == pytest.approx(float(result.experts_used.mean()))
    # The tiny run's groups are all populated; threshold 0 runs every expert, at exactly the full cost.
    first = curve.points[0]
    assert first.relative_compute == 1.0 and None not in (first.many, first.medium, first.few)


def test_the_int8_export_stores_its_own_curve(early_exit_int8_model_dir: Path) -> None:
    manifest = load_manifest(early_exit_int8_model_dir)
    assert manifest.operating_curve is not None and manifest.operating_curve.num_images == 30


def test_a_curve_out_of_order_or_in_format_2_is_refused(model_dir: Path) -> None:
    data = json.loads((model_dir / MANIFEST_NAME).read_text())
    points = data["operating_curve"]["points"]
    reversed_points = {**data, "operating_curve": {**data["operating_curve"], "points": points[::-1]}}
    with pytest.raises(ManifestError, match="increasing threshold"):
        validate_manifest_dict(reversed_points)
    with pytest.raises(ManifestError, match="format 3"):
        validate_manifest_dict({**data, "format_version": 2})
    del data["operating_curve"]
    assert validate_manifest_dict({**data, "format_version": 2}).operating_curve is None


def test_export_curve_upgrades_a_format_2_folder_to_the_curve_the_export_measures(
    model_dir: Path, early_exit_checkpoint: Path, tmp_path: Path
) -> None:
    folder = copy_folder(model_dir, tmp_path / "old")
    data = json.loads((folder / MANIFEST_NAME).read_text())
    expected = data.pop("operating_curve")
    (folder / MANIFEST_NAME).write_text(json.dumps({**data, "format_version": 2}))
    graphs = {p.name: p.read_bytes() for p in folder.glob("*.onnx")}
    meta, _ = load_checkpoint(early_exit_checkpoint)
    add_curve_to_folder(folder, meta.config.data)
    upgraded = load_manifest(folder, check_hashes=True)
    assert upgraded.format_version == 3
    assert json.loads(upgraded.operating_curve.model_dump_json()) == expected
    assert {p.name: p.read_bytes() for p in folder.glob("*.onnx")} == graphs
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []


def test_the_bundled_curve_is_what_export_curve_measures(cifar10_dir: Path, tmp_path: Path, capsys) -> None:
    """The command that upgraded the bundled model (its model card) gives its shipped curve again."""
    folder = copy_folder(BUNDLED, tmp_path / "bundled")
    data = json.loads((folder / MANIFEST_NAME).read_text())
    shipped = data.pop("operating_curve")
    (folder / MANIFEST_NAME).write_text(json.dumps({**data, "format_version": 2}))
    assert main(["curve", str(folder), *BUNDLED_CONFIG, "--data-dir", str(cifar10_dir)]) == 0, capsys.readouterr().err
    assert json.loads(load_manifest(folder).operating_curve.model_dump_json()) == shipped


def test_export_curve_refuses_another_runs_data(model_dir: Path, cifar10_dir: Path, tmp_path: Path, capsys) -> None:
    """The tiny model with the bundled run's data config: other training counts, one error line, nothing written."""
    folder = copy_folder(model_dir, tmp_path / "tiny")
    before = (folder / MANIFEST_NAME).read_bytes()
    assert main(["curve", str(folder), *BUNDLED_CONFIG, "--data-dir", str(cifar10_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "training counts" in err
    assert (folder / MANIFEST_NAME).read_bytes() == before


def test_a_validation_split_carved_by_stage_2_gets_its_curve(tiny_data_dir: Path, tmp_path: Path) -> None:
    """Stage 1 trained on every image (no validation split, as the reference recipe); stage 2 carved its split out
    of them. The export must rebuild that split (the model's training counts include it) and store its curve:
    it stored none, and the service then had no compute budgets for the model."""
    from tests.conftest import one_torch_thread, tiny_config_dict
    from training.config import config_from_dict
    from training.route import route_checkpoint
    from training.train import train

    raw = tiny_config_dict(tiny_data_dir, tmp_path / "cache")
    raw["data"]["val_per_class"] = 0
    with one_torch_thread(), pytest.warns(UserWarning, match="part of stage 1's training set"):
        stage1 = train(config_from_dict(raw), out=tmp_path / "stage1")
        routed = route_checkpoint(stage1, overrides=["data.val_per_class=3"], out=tmp_path / "routed", progress=False)
    result = export_checkpoint(routed, tmp_path / "model", num_images=16)
    curve = result.manifest.operating_curve
    assert curve is not None and curve.num_images == 30  # 3 per class, the split stage 2 chose its threshold on
    meta, _ = load_checkpoint(routed)
    assert [c.train_count for c in result.manifest.classes] == meta.class_counts  # stage 1's, validation included
