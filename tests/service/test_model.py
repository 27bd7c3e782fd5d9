"""Loading a model folder: hashes, graph I/O, providers; every failure is a one-line `ModelLoadError`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from export.manifest import MANIFEST_NAME, expert_file, load_manifest, router_file, sha256_file
from service.errors import ModelLoadError
from service.model import CPU, CUDA, load_model, requested_providers


def copy_folder(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def load(folder: Path):
    return load_model(folder, provider="cpu", shared_thread_pool=False)


def test_provider_in_use_is_read_back(loaded_model) -> None:
    assert loaded_model.provider == CPU
    manifest = loaded_model.manifest
    assert set(loaded_model.providers_by_graph) == {spec.file for spec in manifest.graph_specs()}


def test_tampered_graph_is_refused(model_dir: Path, tmp_path: Path) -> None:
    folder = copy_folder(model_dir, tmp_path / "tampered")
    graph = folder / expert_file(2)
    data = bytearray(graph.read_bytes())
    data[-10] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"expert_2\.onnx has sha256") as caught:
        load(folder)
    assert "\n" not in str(caught.value)


def test_missing_graph_is_refused(model_dir: Path, tmp_path: Path) -> None:
    folder = copy_folder(model_dir, tmp_path / "missing")
    (folder / router_file(1)).unlink()
    with pytest.raises(ModelLoadError, match=r"router_1\.onnx .* missing"):
        load(folder)


def test_graph_with_the_wrong_interface_is_refused(model_dir: Path, tmp_path: Path) -> None:
    # A router graph in the expert's place, with the hash updated: hashes match, the tensor names do not.
    folder = copy_folder(model_dir, tmp_path / "swapped")
    shutil.copy(folder / router_file(1), folder / expert_file(1))
    manifest_path = folder / MANIFEST_NAME
    old_hash = load_manifest(model_dir).graphs.experts[0].sha256
    manifest_path.write_text(manifest_path.read_text().replace(old_hash, sha256_file(folder / expert_file(1))))
    with pytest.raises(ModelLoadError, match=r"expert_1\.onnx does not match the manifest"):
        load(folder)


@pytest.mark.parametrize("content", ["{not json", '{"format_version": 1}'])
def test_bad_manifest_is_refused(model_dir: Path, tmp_path: Path, content: str) -> None:
    folder = copy_folder(model_dir, tmp_path / "bad-manifest")
    (folder / MANIFEST_NAME).write_text(content)
    with pytest.raises(ModelLoadError, match=r"manifest\.json"):
        load(folder)


def test_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model folder not found"):
        load(tmp_path / "nowhere")


def test_cuda_required_but_not_running_is_refused(model_dir: Path) -> None:
    model = load(model_dir)
    if model.provider == CUDA:
        pytest.skip("CUDA really runs here")
    with pytest.raises(ModelLoadError, match="'cuda' was asked for") as refused:
        load_model(model_dir, provider="cuda", shared_thread_pool=False)
    # A container that crash-loops on this must say in its log what the host lacks, and what to do instead.
    message = str(refused.value)
    assert "\n" not in message
    for needed in ("CUDA 13", "R580", "compute capability 7.5", "NVIDIA Container Toolkit", "RIDE_PROVIDER=auto"):
        assert needed in message, message


def test_provider_choices() -> None:
    assert requested_providers("cpu") == [CPU]
    assert requested_providers("cuda") == [CUDA, CPU]
    assert requested_providers("auto")[-1] == CPU
    with pytest.raises(ValueError, match="unknown provider"):
        requested_providers("tpu")
