"""The cascade on the service's onnxruntime graphs, checked against a row-by-row reference built on raw
onnxruntime sessions (the decision itself is `cascade.continues`; tests/cascade holds the rule's own table)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from cascade import continues, run_cascade, softmax
from export.manifest import load_manifest, write_manifest
from service.images import ImageDecoder
from service.model import load_model
from tests.service.conftest import NUM_EXPERTS


def without_routers(source: Path, folder: Path) -> Path:
    """A copy of the model folder ``source`` whose manifest has no routers (every request runs all experts)."""
    manifest = load_manifest(source)
    folder.mkdir(parents=True, exist_ok=True)
    for graph in (manifest.graphs.trunk, *manifest.graphs.experts):
        shutil.copy(source / graph.file, folder / graph.file)
    changed = manifest.model_copy(
        update={
            "graphs": manifest.graphs.model_copy(update={"routers": []}),
            "cascade": manifest.cascade.model_copy(
                update={"has_routers": False, "all_experts_without_routers": True, "top_z": None}
            ),
            # The known answers' class logits are every expert's mean already; without routers, no router logits.
            "known_answers": manifest.known_answers.model_copy(
                update={"router_logits": [[] for _ in manifest.known_answers.images]}
            ),
            # One operating point (every expert): no curve, as an export without routers has none.
            "operating_curve": None,
        }
    )
    write_manifest(changed, folder)
    return folder


@pytest.fixture(scope="module")
def images(model_dir: Path, test_images: list[tuple[str, bytes]]) -> np.ndarray:
    decoder = ImageDecoder(load_manifest(model_dir).input, max_pixels=10**6)
    return np.stack([decoder.decode(data) for _, data in test_images])


def reference_cascade(model_dir: Path, images: np.ndarray, threshold: float, max_experts: int) -> tuple:
    """Every expert and router on every row with plain sessions, then the decision rule applied row by row."""
    manifest = load_manifest(model_dir)

    def session(spec):
        return ort.InferenceSession(str(model_dir / spec.file), providers=["CPUExecutionProvider"])

    shared = session(manifest.graphs.trunk).run(None, {"image": images})[0]
    outputs = [session(spec).run(["logits", "feature"], {"shared": shared}) for spec in manifest.graphs.experts]
    running = np.cumsum([logits for logits, _ in outputs], axis=0) / np.arange(1, NUM_EXPERTS + 1)[:, None, None]
    router_logits = [
        session(spec).run(None, {"mean_logits": running[k].astype(np.float32), "feature": outputs[k][1]})[0][:, 0]
        for k, spec in enumerate(manifest.graphs.routers)
    ]
    used = np.ones(len(images), dtype=np.int64)
    for row in range(len(images)):
        while used[row] < max_experts and continues(router_logits[used[row] - 1][row], threshold):
            used[row] += 1
    mean_logits = running[used - 1, np.arange(len(images))]
    return used, mean_logits, np.stack(router_logits, axis=1)


@pytest.mark.parametrize(("threshold", "max_experts"), [(0.5, NUM_EXPERTS), (0.3, 2), (0.7, NUM_EXPERTS)])
def test_matches_row_by_row_reference(
    loaded_model, model_dir: Path, images: np.ndarray, threshold: float, max_experts: int
) -> None:
    result = run_cascade(loaded_model, images, thresholds=threshold, max_experts=max_experts)
    used, mean_logits, router_logits = reference_cascade(model_dir, images, threshold, max_experts)
    np.testing.assert_array_equal(result.experts_used, used)
    # Router k ran where the row used k experts and could still go on.
    reached = np.arange(1, NUM_EXPERTS)[None, :] <= np.minimum(used, max_experts - 1)[:, None]
    np.testing.assert_array_equal(np.isfinite(result.router_logits), reached)
    np.testing.assert_allclose(result.router_logits[reached], router_logits[reached], atol=1e-4)
    np.testing.assert_allclose(result.logits, mean_logits, atol=1e-4)
    np.testing.assert_allclose(result.probabilities, softmax(mean_logits), atol=1e-5)
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_rows_exit_early_at_the_default_threshold(loaded_model, images: np.ndarray) -> None:
    result = run_cascade(loaded_model, images, thresholds=0.5, max_experts=NUM_EXPERTS)
    counts = np.bincount(result.experts_used, minlength=NUM_EXPERTS + 1)[1:]
    assert (counts > 0).all(), counts  # some rows stop at expert 1, some at expert 2, some run all three
    assert (result.relative_compute < 1.0).any()


def test_threshold_zero_runs_every_expert_at_full_cost(loaded_model, images: np.ndarray) -> None:
    result = run_cascade(loaded_model, images, thresholds=0.0, max_experts=NUM_EXPERTS)
    assert (result.experts_used == NUM_EXPERTS).all()
    assert (result.routers_evaluated == NUM_EXPERTS - 1).all()
    np.testing.assert_allclose(result.relative_compute, 1.0)


def test_max_experts_one_skips_every_router(loaded_model, images: np.ndarray) -> None:
    result = run_cascade(loaded_model, images, thresholds=0.0, max_experts=1)
    cost = loaded_model.cost
    assert (result.experts_used == 1).all() and (result.routers_evaluated == 0).all()
    np.testing.assert_allclose(
        result.relative_compute, (cost.trunk_macs + cost.expert_macs[0]) / cost.full_ensemble_macs
    )
    logits, _ = loaded_model.expert(1, loaded_model.trunk(images))
    np.testing.assert_allclose(result.logits, logits, atol=1e-6)


def test_per_row_settings_give_the_same_answer_as_alone(loaded_model, images: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    rows = images[:24]
    thresholds = rng.uniform(0.2, 0.8, size=len(rows))
    limits = rng.integers(1, NUM_EXPERTS + 1, size=len(rows))
    batched = run_cascade(loaded_model, rows, thresholds=thresholds, max_experts=limits)
    for i in range(len(rows)):
        alone = run_cascade(loaded_model, rows[i : i + 1], thresholds=thresholds[i], max_experts=int(limits[i]))
        assert alone.experts_used[0] == batched.experts_used[i]
        assert alone.experts_used[0] <= limits[i]
        np.testing.assert_allclose(alone.logits[0], batched.logits[i], atol=1e-5)
        np.testing.assert_allclose(alone.relative_compute[0], batched.relative_compute[i])


def test_out_of_range_max_experts_is_refused(loaded_model, images: np.ndarray) -> None:
    with pytest.raises(ValueError, match="max_experts"):
        run_cascade(loaded_model, images[:2], thresholds=0.5, max_experts=NUM_EXPERTS + 1)


def test_empty_batch(loaded_model, images: np.ndarray) -> None:
    result = run_cascade(loaded_model, images[:0], thresholds=0.5, max_experts=NUM_EXPERTS)
    assert result.experts_used.shape == (0,)


def test_without_routers_every_row_runs_max_experts(model_dir: Path, tmp_path: Path, images: np.ndarray) -> None:
    model = load_model(without_routers(model_dir, tmp_path / "no-routers"), provider="cpu", shared_thread_pool=False)
    assert not model.has_routers
    full = run_cascade(model, images, thresholds=1.0, max_experts=NUM_EXPERTS)
    assert (full.experts_used == NUM_EXPERTS).all()
    np.testing.assert_allclose(full.relative_compute, 1.0)
    shared = model.trunk(images)
    mean = np.mean([model.expert(k, shared)[0] for k in range(1, NUM_EXPERTS + 1)], axis=0)
    np.testing.assert_allclose(full.logits, mean, atol=1e-5)
    two = run_cascade(model, images, thresholds=0.0, max_experts=2)
    assert (two.experts_used == 2).all() and (two.routers_evaluated == 0).all()


def test_float16_model_takes_float16_inputs(loaded_model, early_exit_fp16_model_dir: Path, images: np.ndarray) -> None:
    half = load_model(early_exit_fp16_model_dir, provider="cpu", shared_thread_pool=False)
    assert half.manifest.precision == "float16" and half.manifest.input.dtype == "float16"
    assert half.manifest.source_checkpoint == loaded_model.manifest.source_checkpoint  # the same weights
    rows = images[:16]
    result = run_cascade(half, rows, thresholds=0.0, max_experts=NUM_EXPERTS)
    reference = run_cascade(loaded_model, rows, thresholds=0.0, max_experts=NUM_EXPERTS)
    assert result.logits.dtype == np.float32
    # The exporter's own float16 tolerance on logits; the tiny model's probabilities then agree far closer.
    np.testing.assert_allclose(result.logits, reference.logits, atol=0.05)
    np.testing.assert_allclose(result.probabilities, reference.probabilities, atol=5e-3)
