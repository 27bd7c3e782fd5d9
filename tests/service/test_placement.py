"""Where nodes ran, read from real onnxruntime profiles (made here on the CPU provider), and the start-up rule
built on it: with RIDE_PROVIDER=cuda a compute node outside CUDA refuses the start, shape arithmetic does not."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from export.manifest import expert_file
from service.errors import ModelLoadError
from service.model import CPU, CUDA, check_placement
from service.placement import NodeRun, compute_nodes_off, read_profile


@pytest.fixture(scope="module")
def expert_runs(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[NodeRun]:
    """The node runs of one real run of an expert graph, profiled by onnxruntime."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path_factory.mktemp("profile") / "expert")
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_dir / expert_file(1)), options, providers=[CPU])
    (spec,) = session.get_inputs()
    session.run(None, {spec.name: np.zeros((2, *spec.shape[1:]), dtype=np.float32)})
    return read_profile(Path(session.end_profiling()), expert_file(1))


def test_the_profile_names_every_node_its_operator_provider_and_outputs(expert_runs: list[NodeRun]) -> None:
    assert expert_runs and {run.provider for run in expert_runs} == {CPU}
    ops = {run.op_type for run in expert_runs}
    assert "Conv" in ops
    convolution = next(run for run in expert_runs if run.op_type == "Conv")
    assert convolution.graph == "expert_1.onnx" and convolution.output_types == ("float",) and convolution.computes
    # The expert's graph computes a shape for its reshape: integer outputs only, which is not compute.
    shapes = [run for run in expert_runs if not run.computes]
    assert shapes and {run.op_type for run in shapes} <= {"Shape", "Concat", "Gather", "Unsqueeze", "Slice", "Cast"}
    assert all(set(run.output_types) == {"int64"} for run in shapes)


def test_compute_on_the_cpu_refuses_a_cuda_start_and_names_the_nodes(expert_runs: list[NodeRun]) -> None:
    off = compute_nodes_off(expert_runs, CUDA)
    assert off and all(run.computes for run in off)
    assert compute_nodes_off(expert_runs, CPU) == []
    with pytest.raises(ModelLoadError, match=r"compute nodes ran outside CUDA: expert_1\.onnx: \S+ \(\w+\) on CPU"):
        check_placement(expert_runs, required=True)


def test_auto_serves_anyway_and_says_which_nodes(expert_runs: list[NodeRun], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="service.model"):
        check_placement(expert_runs, required=False)
    assert "compute nodes ran outside CUDA" in caplog.text and "RIDE_PROVIDER=cuda would refuse" in caplog.text


def test_shape_arithmetic_on_the_cpu_is_allowed(expert_runs: list[NodeRun]) -> None:
    """The same run as CUDA would place it: compute on CUDA, the shape nodes kept on the CPU."""
    on_cuda = [dataclasses.replace(run, provider=CUDA) if run.computes else run for run in expert_runs]
    assert any(run.provider == CPU for run in on_cuda)
    check_placement(on_cuda, required=True)
