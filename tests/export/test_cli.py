"""The exporter's command line (`python -m export`, run in-process): verify on demand, tampering, and one
``error:`` line for every expected problem."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
import pytest

from export.__main__ import main
from export.manifest import MANIFEST_NAME, sha256_file
from tests.export.conftest import copy_folder
from tests.service.test_model import rewrite_graph

pytestmark = pytest.mark.usefixtures("one_thread")


def test_verify_command_accepts_an_intact_folder_and_prints_its_digest(
    model_dir: Path, cifar10_dir: Path, capsys
) -> None:
    status = main(["verify", str(model_dir), "--data-dir", str(cifar10_dir / "test"), "--num-images", "32"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "OK" in out
    # The digest to pin is the sha256 of manifest.json: `sha256sum manifest.json` gives it too.
    assert f"RIDE_MODEL_SHA256={hashlib.sha256((model_dir / MANIFEST_NAME).read_bytes()).hexdigest()}" in out


def test_a_graph_swapped_with_its_hash_fails_verify_without_the_checkpoint(
    model_dir: Path, tmp_path: Path, capsys
) -> None:
    """The known answers catch a replaced graph before any checkpoint is needed (the service runs them too)."""
    folder = copy_folder(model_dir, tmp_path / "swapped")
    rewrite_graph(folder, "trunk.onnx", lambda values: values[::-1].copy() if values.ndim else values)
    assert main(["verify", str(folder), "--checkpoint", str(tmp_path / "no-checkpoint-needed")]) == 2
    err = capsys.readouterr().err
    assert "known-answer check failed" in err and "checkpoint" not in err.split("known-answer")[0]


def test_verify_on_cuda_says_why_where_cuda_cannot_run(model_dir: Path, cifar10_dir: Path, capsys) -> None:
    """``--provider cuda`` runs the graphs on the CUDA provider (TF32 off, as served). Without it (onnxruntime's
    CPU build, or no GPU) the check does not quietly run on the CPU: it stops with the reason."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider: bench/gpu_check.sh exercises it on a GPU")
    args = ["verify", str(model_dir), "--data-dir", str(cifar10_dir / "test"), "--num-images", "8"]
    assert main([*args, "--provider", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: CUDA cannot run trunk.onnx here") and "--provider cpu" in err, err


def test_flipped_byte_in_a_graph_fails_verify(model_dir: Path, tmp_path: Path, cifar10_dir: Path, capsys) -> None:
    folder = copy_folder(model_dir, tmp_path / "tampered")
    graph = folder / "expert_2.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    assert main(["verify", str(folder), "--data-dir", str(cifar10_dir)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "graph expert_2.onnx has sha256" in errors[0], err


def test_changed_weights_with_a_matching_hash_fail_parity(
    model_dir: Path, tmp_path: Path, cifar10_dir: Path, capsys
) -> None:
    """Someone edits a weight and updates the manifest's hash too: the parity check still catches it."""
    folder = copy_folder(model_dir, tmp_path / "edited")
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


def test_manifest_that_breaks_the_schema_fails_verify(model_dir: Path, tmp_path: Path, capsys) -> None:
    folder = copy_folder(model_dir, tmp_path / "bad-manifest")
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["graphs"]["trunk"]["macs_per_image"] = -1
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    assert main(["verify", str(folder)]) == 2
    assert "does not match the manifest schema at graphs/trunk/macs_per_image" in capsys.readouterr().err


def test_verify_refuses_a_different_checkpoint(model_dir: Path, tiny_checkpoint: Path, capsys) -> None:
    assert main(["verify", str(model_dir), "--checkpoint", str(tiny_checkpoint)]) == 2
    assert "but the model folder was exported from" in capsys.readouterr().err


def test_missing_or_corrupt_checkpoint_is_one_clear_error(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "models" / "m"
    assert main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().startswith("error: checkpoint folder not found")
    corrupt = copy_folder(tiny_checkpoint, tmp_path / "corrupt")
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["--checkpoint", str(corrupt), "--out", str(out)]) == 2
    assert "is corrupt or unreadable" in capsys.readouterr().err
    assert not out.parent.exists()
