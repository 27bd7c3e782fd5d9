"""The exported graphs (`export.graphs`, run by `export.ort_model`): any batch size, float16 conversion."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from cascade import run_cascade
from export import verify as verify_module
from export.graphs import check_graph, convert_to_float16
from export.manifest import load_manifest
from export.ort_model import OrtGraph
from tests.export.conftest import Reference

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_fp16_router_graph_matches_pytorch(model_dir: Path, reference: Reference, tmp_path: Path) -> None:
    """TopK, the L2 normalisation and both layers of a router run in float16 (the expert graphs' float16 path is
    covered end to end by test_fp16_no_router_export_replaces_a_folder_only_with_force)."""
    path = tmp_path / "router_2.onnx"
    shutil.copy(model_dir / "router_2.onnx", path)
    convert_to_float16(path)
    check_graph(path, ["mean_logits", "feature"], ["router_logit"], opset=18)
    spec = load_manifest(model_dir).graphs.routers[1]
    half = spec.model_copy(update={"inputs": [t.model_copy(update={"dtype": "float16"}) for t in spec.inputs]})
    mean, feature = (t.numpy() for t in reference.router_inputs[1])
    (got,) = OrtGraph(path, half)(mean_logits=mean, feature=feature)
    assert got.shape == (64, 1)
    want = reference.router_logits[1].numpy()
    # float16 keeps ~3 significant digits of these logits (about 10 to 20 for the tiny routers).
    np.testing.assert_allclose(got[:, 0], want, rtol=2e-3, atol=verify_module.FP16.atol)
