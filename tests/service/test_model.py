"""Loading a model folder: hashes, graph I/O, providers; every failure is a one-line `ModelLoadError`."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from cascade import run_cascade
from export.manifest import MANIFEST_NAME, expert_file, folder_digest, load_manifest, router_file, sha256_file
from service.errors import ModelLoadError
from service.images import ImageDecoder
from service.model import CPU, CUDA, DeviceRows, load_model, requested_providers


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


def rewrite_graph(folder: Path, name: str, change) -> None:
    """Apply ``change(values) -> values`` to every float weight of graph ``name`` and put its new sha256 in the
    manifest: what someone who swaps a graph and edits its hash does."""
    model = onnx.load(str(folder / name))
    for weight in model.graph.initializer:
        values = onnx.numpy_helper.to_array(weight)
        if values.dtype == np.float32:
            weight.CopyFrom(onnx.numpy_helper.from_array(change(values).astype(np.float32), weight.name))
    old_hash = sha256_file(folder / name)
    onnx.save(model, str(folder / name))
    manifest_path = folder / MANIFEST_NAME
    manifest_path.write_text(manifest_path.read_text().replace(old_hash, sha256_file(folder / name)))


def edit_manifest(folder: Path, change) -> None:
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def test_a_random_trunk_with_its_hash_updated_is_refused(model_dir: Path, tmp_path: Path) -> None:
    """It used to start, and answer "automobile" at p = 1.000: the known answers catch it."""
    folder = copy_folder(model_dir, tmp_path / "random-trunk")
    rng = np.random.default_rng(0)
    rewrite_graph(folder, "trunk.onnx", lambda values: rng.normal(0.0, 0.1, values.shape))
    load_manifest(folder)  # every hash matches
    with pytest.raises(ModelLoadError, match="known-answer check failed") as refused:
        load(folder)
    assert "\n" not in str(refused.value)


def test_non_finite_outputs_are_refused(model_dir: Path, tmp_path: Path) -> None:
    folder = copy_folder(model_dir, tmp_path / "nan-router")
    rewrite_graph(folder, router_file(1), lambda values: np.full_like(values, np.nan))
    with pytest.raises(ModelLoadError, match="non-finite router logits"):
        load(folder)


def test_a_pinned_digest_refuses_any_other_folder(model_dir: Path, tmp_path: Path) -> None:
    digest = folder_digest(model_dir)
    assert digest == hashlib.sha256((model_dir / MANIFEST_NAME).read_bytes()).hexdigest()
    assert load_model(model_dir, provider="cpu", shared_thread_pool=False, expected_digest=digest).num_experts == 3
    folder = copy_folder(model_dir, tmp_path / "edited")
    rewrite_graph(folder, expert_file(3), lambda values: values * 1.001)  # within the known answers' tolerance
    load(folder)  # unpinned, it loads: the edit is too small for the known answers
    with pytest.raises(ModelLoadError, match=f"but {digest} is pinned"):
        load_model(folder, provider="cpu", shared_thread_pool=False, expected_digest=digest)


def test_a_zero_std_is_refused(model_dir: Path, tmp_path: Path) -> None:
    """std = 0 passed and served NaN probabilities as null."""
    folder = copy_folder(model_dir, tmp_path / "zero-std")
    edit_manifest(folder, lambda data: data["input"].update(std=[0.0, 0.2, 0.2]))
    with pytest.raises(ModelLoadError, match=r"input/std/0"):
        load(folder)


@pytest.mark.parametrize(
    ("names", "problem"),
    [
        ({1: "airplane", 2: "airplane"}, "unique"),
        ({0: "<img src=x onerror=alert(1)>"}, "class"),
        ({0: " cat"}, "class"),
        ({0: "cat\u202e"}, "printable"),
    ],
    ids=["duplicate", "markup", "leading-space", "control-character"],
)
def test_class_names_must_be_unique_and_printable(
    model_dir: Path, tmp_path: Path, names: dict[int, str], problem: str
) -> None:
    folder = copy_folder(model_dir, tmp_path / "names")

    def rename(data: dict) -> None:
        for index, name in names.items():
            data["classes"][index]["name"] = name

    edit_manifest(folder, rename)
    with pytest.raises(ModelLoadError, match=problem):
        load(folder)


def test_a_symlink_may_not_lead_out_of_the_folder(model_dir: Path, tmp_path: Path) -> None:
    folder = copy_folder(model_dir, tmp_path / "linked")
    outside = tmp_path / "elsewhere.onnx"
    (folder / expert_file(1)).rename(outside)
    (folder / expert_file(1)).symlink_to(outside)  # same bytes, same hash: only the place is wrong
    with pytest.raises(ModelLoadError, match="leads outside the model folder"):
        load(folder)
    # Inside the folder a link is fine (Kubernetes mounts ConfigMaps and Secrets through such links).
    (folder / expert_file(1)).unlink()
    (folder / "..data").mkdir()
    outside.rename(folder / "..data" / expert_file(1))
    (folder / expert_file(1)).symlink_to(Path("..data") / expert_file(1))
    assert load(folder).num_experts == 3


def test_a_format_1_manifest_is_refused_with_advice(model_dir: Path, tmp_path: Path) -> None:
    folder = copy_folder(model_dir, tmp_path / "format-1")

    def downgrade(data: dict) -> None:
        data["format_version"] = 1
        del data["known_answers"]

    edit_manifest(folder, downgrade)
    with pytest.raises(ModelLoadError, match=r"manifest format 1.*re-export the model"):
        load(folder)


@pytest.fixture(scope="module")
def real_images(model_dir: Path, test_images) -> np.ndarray:
    decoder = ImageDecoder(load_manifest(model_dir).input, max_pixels=10**6)
    return np.stack([decoder.decode(data) for _, data in test_images])


@pytest.mark.parametrize("folder_fixture", ["early_exit_model_dir", "early_exit_fp16_model_dir"])
def test_io_binding_gives_the_same_answers(folder_fixture: str, real_images: np.ndarray, request) -> None:
    """On the CPU provider too, where OrtValue binding works as on CUDA: every threshold mixes exits, so rows are
    selected as views (all rows, one row, consecutive runs) and through the host (scattered rows)."""
    folder = request.getfixturevalue(folder_fixture)
    plain = load_model(folder, provider="cpu", shared_thread_pool=False, io_binding="off")
    bound = load_model(folder, provider="cpu", shared_thread_pool=False, io_binding="on")
    assert (plain.io_binding, bound.io_binding) == (False, True)
    images = real_images.astype(np.float16 if folder_fixture.endswith("fp16_model_dir") else np.float32)
    for threshold in (0.0, 0.3, 0.5, 0.7, 1.0):
        for rows in (images[:1], images[1:2], images):
            expected = run_cascade(plain, rows, thresholds=threshold, max_experts=3)
            got = run_cascade(bound, rows, thresholds=threshold, max_experts=3)
            np.testing.assert_array_equal(got.experts_used, expected.experts_used)
            np.testing.assert_array_equal(got.logits, expected.logits)


def test_trunk_output_stays_on_the_device_for_consecutive_rows(model_dir: Path, real_images: np.ndarray) -> None:
    model = load_model(model_dir, provider="cpu", shared_thread_pool=False, io_binding="on")
    shared = model.trunk(real_images[:8])
    assert isinstance(shared, DeviceRows) and len(shared) == 8
    view = shared[np.arange(2, 6)]
    assert isinstance(view, DeviceRows) and (view.start, view.stop) == (2, 6)
    assert isinstance(view[np.array([1])], DeviceRows)  # one row of a view: still a view, rows 3:4
    scattered = shared[np.array([0, 3, 7])]
    assert isinstance(scattered, np.ndarray) and scattered.shape[0] == 3
    host = shared.to_host()
    np.testing.assert_array_equal(view.to_host(), host[2:6])
    np.testing.assert_array_equal(scattered, host[[0, 3, 7]])
    # An expert reading a view of the device memory answers as on the same rows copied to the host.
    for got, expected in zip(model.expert(2, view), model.expert(2, host[2:6]), strict=True):
        np.testing.assert_array_equal(got, expected)
    assert not load_model(model_dir, provider="cpu", shared_thread_pool=False).io_binding  # auto: CUDA only
