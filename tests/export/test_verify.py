"""Parity with PyTorch (`export.verify`): what passes, what must fail, and the rows allowed to decide differently."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade import CascadeResult
from export.graphs import load_source
from export.manifest import load_manifest
from export.ort_model import OrtModel
from export.verify import (
    FP32,
    VERIFICATION_FILE,
    check_parity,
    judge_cascade,
    load_verification_images,
    normalized,
)
from tests.export.conftest import Reference

pytestmark = pytest.mark.usefixtures("one_thread")


def test_exported_graphs_match_pytorch_on_every_output(reference: Reference) -> None:
    """The parity check run afresh on the exported folder (not the record the export wrote after passing it)."""
    report = check_parity(reference.onnx_model, reference.source, reference.images, threshold=0.5, tolerances=FP32)
    assert report.problems == [] and report.precision == "float32" and report.num_images == 64
    diffs = report.max_abs_diff
    outputs = {"trunk", "cascade.logits", "cascade.router_logits", "router_1", "router_2"}
    outputs |= {f"expert_{k}.{name}" for k in (1, 2, 3) for name in ("logits", "feature")}
    assert set(diffs) == outputs
    assert all(diffs[name] <= 1e-4 for name in outputs if not name.endswith(("feature", "trunk")))
    assert sum(report.experts_used_histogram) == 64 and report.experts_used_histogram[0] > 0
    # The record the export wrote says the same of its 128 images.
    record = json.loads((reference.folder / VERIFICATION_FILE).read_text())
    assert record["passed"] and record["num_images"] == 128 and record["precision"] == "float32"


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
    onnx_model = OrtModel(early_exit_model_dir, manifest.graphs)
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


def test_parity_check_detects_a_changed_weight(reference: Reference, early_exit_checkpoint: Path) -> None:
    """The comparison is not vacuous: the same graphs against a model with one expert weight nudged fail."""
    source = load_source(early_exit_checkpoint)
    with torch.no_grad():
        source.model.experts[1].features.layer3[4].conv2.weight[0, 0, 1, 1] += 0.05
    report = check_parity(reference.onnx_model, source, reference.images[:32], threshold=0.5, tolerances=FP32)
    assert not report.passed
    assert any(p.startswith("expert_2.") for p in report.problems), report.problems
    assert report.max_abs_diff["expert_1.logits"] <= 1e-4  # the untouched experts still agree
