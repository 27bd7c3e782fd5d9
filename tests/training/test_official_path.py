"""The whole path for a checkpoint of the official RIDE code: ``import-official`` -> ``evaluate`` -> ``export`` ->
``python -m service``.

The official file is made from the tiny routed checkpoint of tests/conftest.py (``early_exit_checkpoint``, whose
routers really exit early): its weights under the official names (the inverse mapping), in the official trainer's
format with a pickled ConfigParser of a class that no longer exists. Imported, it must be that checkpoint again,
bit for bit, evaluate to the same numbers, export to the same graphs, and be served with the same answers."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from cascade import run_cascade
from export.build import export_checkpoint
from export.manifest import load_manifest
from service.images import ImageDecoder
from service.model import load_model
from tests.server_process import cifar10_test_images, start_server
from training.checkpoint import load_checkpoint, load_meta
from training.official.keys import CIFAR_LAYOUT, Naming, to_official_state_dict
from training.run import main

from .official_files import official_config, save_official_checkpoint

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def official_file(early_exit_checkpoint, tmp_path_factory):
    meta, weights = load_checkpoint(early_exit_checkpoint)
    naming = Naming(CIFAR_LAYOUT, meta.model.num_experts, num_routers=meta.model.num_experts - 1)
    args = {
        "num_classes": meta.num_classes,
        "reduce_dimension": True,
        "use_norm": True,
        "num_experts": meta.model.num_experts,
        "top_choices_num": meta.routers.top_z,
        "pos_weight": 100,
    }
    path = tmp_path_factory.mktemp("official-file") / "checkpoint-epoch5.pth"
    config = official_config("ResNet32EAModel", args, resume_state_dict_only=True)
    state = to_official_state_dict(weights, naming)
    return save_official_checkpoint(path, state, arch="ResNet32EAModel", config=config, epoch=5)


@pytest.fixture(scope="module")
def imported(official_file, early_exit_checkpoint, tiny_data_dir, tmp_path_factory):
    """``import-official`` as a user runs it, with the tiny data set's settings (the official file knows CIFAR-10
    as 5,000 images per class at imbalance 100; the tiny set has 40 per class at imbalance 10)."""
    meta = load_meta(early_exit_checkpoint)
    base = tmp_path_factory.mktemp("official-import")
    counts = base / "counts.txt"
    counts.write_text("".join(f"{n}\n" for n in meta.class_counts))
    settings = ["data.dataset=folder", "data.imbalance_factor=10", "data.many_shot_above=15", "data.few_shot_below=5"]
    settings.append(f"data.cache_dir={base / 'cache'}")
    command = ["import-official", "--checkpoint", str(official_file), "--out", str(base / "imported")]
    command += ["--data-dir", str(tiny_data_dir), "--class-counts", str(counts)]
    command += [arg for setting in settings for arg in ("--set", setting)]
    assert main(command) == 0
    return base / "imported"


def test_the_import_is_the_checkpoint_bit_for_bit(imported, early_exit_checkpoint) -> None:
    meta, weights = load_checkpoint(early_exit_checkpoint)
    new_meta, new_weights = load_checkpoint(imported)
    assert sorted(new_weights) == sorted(weights)
    for key, value in weights.items():
        assert new_weights[key].dtype == value.dtype and torch.equal(new_weights[key], value), key
    assert new_meta.model == meta.model and new_meta.routers.top_z == meta.routers.top_z
    assert (new_meta.class_names, new_meta.class_groups) == (meta.class_names, meta.class_groups)
    assert new_meta.routers.threshold == meta.routers.threshold == 0.5
    assert new_meta.imported_from.arch == "ResNet32EAModel" and new_meta.imported_from.epoch == 5


def test_evaluate_gives_the_checkpoint_own_numbers(imported, early_exit_checkpoint) -> None:
    assert main(["evaluate", "--checkpoint", str(imported), "--device", "cpu"]) == 0
    ours, theirs = load_meta(early_exit_checkpoint).metrics, load_meta(imported).metrics
    assert theirs.all_experts == ours.all_experts
    assert theirs.routed == ours.routed
    assert theirs.cost == ours.cost
    assert set(theirs.routed.experts_used_counts["overall"]) != {0}  # the cascade really exits early


def test_export_and_serve_give_the_checkpoint_own_answers(
    imported, early_exit_model_dir, cifar10_dir, tmp_path
) -> None:
    folder = export_checkpoint(imported, tmp_path / "official-model", data_dir=cifar10_dir, num_images=64).folder
    manifest, original = load_manifest(folder), load_manifest(early_exit_model_dir)
    # Same weights, same graphs: every graph file is byte-identical to the one exported from our own checkpoint.
    assert [g.sha256 for g in manifest.graph_specs()] == [g.sha256 for g in original.graph_specs()]
    assert (manifest.input, manifest.cascade, manifest.classes) == (original.input, original.cascade, original.classes)

    images = [data for _, data in cifar10_test_images(per_class=2)]
    decoder = ImageDecoder(original.input, max_pixels=10**6)
    reference = load_model(early_exit_model_dir, provider="cpu", shared_thread_pool=False)
    expected = run_cascade(reference, np.stack([decoder.decode(d) for d in images]), thresholds=0.5, max_experts=3)
    server = start_server(folder, tmp_path / "server.log")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            bodies = []
            for data in images:
                reply = client.post("/classify", content=data, headers={"content-type": "image/jpeg"})
                assert reply.status_code == 200, reply.text
                bodies.append(reply.json())
    finally:
        assert server.stop() == 0
    assert [b["experts_used"] for b in bodies] == expected.experts_used.tolist()
    assert [b["class_id"] for b in bodies] == expected.probabilities.argmax(axis=1).tolist()
    assert len({b["experts_used"] for b in bodies}) > 1  # early exits are served, not only all-expert answers
    assert all(b["model"]["name"] == manifest.model.name for b in bodies)
