"""The bundled default model and its int8 variant: they load with every manifest and hash check, and classify the
bundled samples as recorded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cascade import run_cascade
from export.manifest import load_manifest
from service.images import ImageDecoder
from service.model import load_model
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "models" / "cifar10-lt-ride4"
INT8_MODEL = REPO / "models" / "cifar10-lt-ride4-int8"
SAMPLES = REPO / "models" / "samples"


def test_settings_default_to_the_bundled_model() -> None:
    assert Path(Settings().model_dir).resolve() == DEFAULT_MODEL.resolve()


def test_bundled_model_passes_its_manifest_checks() -> None:
    manifest = load_manifest(DEFAULT_MODEL, check_hashes=True)
    assert manifest.model.name == "cifar10-lt-ride4"
    assert manifest.cascade.num_experts == 4 and manifest.cascade.has_routers
    assert [c.name for c in manifest.classes] == sorted(p.stem for p in SAMPLES.glob("*.jpg"))
    # The card's headline numbers come from the same evaluation that the manifest carries.
    assert manifest.metrics.routed_accuracy is not None and manifest.metrics.all_experts_accuracy is not None


def test_bundled_samples_are_small_real_images() -> None:
    samples = sorted(SAMPLES.glob("*.jpg"))
    assert len(samples) == 10
    assert sum(p.stat().st_size for p in samples) < 100_000


def test_bundled_model_classifies_the_samples() -> None:
    model = load_model(DEFAULT_MODEL, provider="cpu", shared_thread_pool=False)
    decoder = ImageDecoder(model.manifest.input, max_pixels=25_000_000)
    samples = sorted(SAMPLES.glob("*.jpg"))
    images = np.stack([decoder.decode(p.read_bytes()) for p in samples])
    names = [c.name for c in model.manifest.classes]
    routed = run_cascade(model, images, thresholds=model.manifest.cascade.default_threshold, max_experts=4)
    full = run_cascade(model, images, thresholds=0.0, max_experts=4)
    assert np.all(full.experts_used == 4)
    assert np.all((routed.experts_used >= 1) & (routed.experts_used <= 4))
    np.testing.assert_allclose(routed.probabilities.sum(axis=1), 1.0, rtol=1e-5)
    predicted = {p.stem: names[i] for p, i in zip(samples, routed.logits.argmax(axis=1), strict=True)}
    # Recorded when the model was bundled: a change in preprocessing or graphs shows up here.
    expected = json.loads((SAMPLES / "expected.json").read_text())
    assert predicted == expected["routed_predictions"]
    assert routed.experts_used.tolist() == expected["routed_experts_used"]


@pytest.mark.parametrize("name", ["MODEL_CARD.md", "curve.png"])
def test_model_card_and_curve_are_bundled(name: str) -> None:
    assert (DEFAULT_MODEL / name).is_file()


def test_bundled_int8_variant_is_the_default_model_quantized_and_gated() -> None:
    float32, int8 = load_manifest(DEFAULT_MODEL), load_manifest(INT8_MODEL, check_hashes=True)
    quantization = int8.quantization
    assert int8.precision == "int8" and quantization is not None
    assert quantization.quantized_from == float32.model and int8.classes == float32.classes
    assert int8.input == float32.input and int8.cascade == float32.cascade
    for spec32, spec8 in zip(float32.graph_specs(), int8.graph_specs(), strict=True):
        assert (spec8.file, spec8.inputs, spec8.outputs) == (spec32.file, spec32.inputs, spec32.outputs)
        if quantization.graphs[spec8.file] == "float32":  # a router kept as it was
            assert spec8.sha256 == spec32.sha256
    assert {quantization.graphs[g.file] for g in [int8.graphs.trunk, *int8.graphs.experts]} == {"int8"}
    assert quantization.calibration.split == "train" and quantization.calibration.num_images == 512
    gate = quantization.parity_gate
    assert gate.split == "validation" and gate.num_images == 200
    assert -gate.accuracy_change_points <= gate.max_accuracy_drop_points == 0.5


def test_bundled_int8_variant_classifies_the_samples() -> None:
    model = load_model(INT8_MODEL, provider="cpu", shared_thread_pool=False)
    decoder = ImageDecoder(model.manifest.input, max_pixels=25_000_000)
    samples = sorted(SAMPLES.glob("*.jpg"))
    images = np.stack([decoder.decode(p.read_bytes()) for p in samples])
    names = [c.name for c in model.manifest.classes]
    routed = run_cascade(model, images, thresholds=model.manifest.cascade.default_threshold, max_experts=4)
    expected = json.loads((SAMPLES / "expected.json").read_text())
    predicted = {p.stem: names[i] for p, i in zip(samples, routed.logits.argmax(axis=1), strict=True)}
    assert predicted == expected["int8_routed_predictions"]
    assert routed.experts_used.tolist() == expected["int8_routed_experts_used"]
