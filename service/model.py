"""Loading a model folder into onnxruntime sessions: provider choice, one thread pool, sanity run, warm-up.

Only onnxruntime and numpy here (no torch): this is what the serving environment installs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cascade import CostModel, run_cascade
from export.manifest import (
    EXPERT_FEATURE,
    EXPERT_INPUT,
    EXPERT_LOGITS,
    ROUTER_FEATURE,
    ROUTER_MEAN_LOGITS,
    ROUTER_OUTPUT,
    TRUNK_INPUT,
    TRUNK_OUTPUT,
    GraphSpec,
    Manifest,
    ManifestError,
    load_manifest,
)
from service.errors import ModelLoadError, first_line

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


def requested_providers(choice: str) -> list[str]:
    """The provider list to ask onnxruntime for: ``auto`` adds CUDA only when this build has it compiled in."""
    if choice == "cpu":
        return [CPU]
    if choice == "cuda":
        return [CUDA, CPU]
    if choice == "auto":
        # get_available_providers() says what was compiled in, not what can run: the session tells the truth.
        return [CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU]
    raise ValueError(f"unknown provider choice {choice!r}: expected auto, cpu or cuda")


# What the GPU image's onnxruntime-gpu (1.31, built for CUDA 13) needs from the host; deploy/README.md says the same.
GPU_REQUIREMENTS = (
    "the GPU image's onnxruntime-gpu is built for CUDA 13: it needs an NVIDIA driver R580 or newer, a GPU of "
    "compute capability 7.5 or newer (Turing and later), and the NVIDIA Container Toolkit in a container"
)


def cuda_unavailable_message(provider_in_use: str) -> str:
    """Why ``provider='cuda'`` is refused, and what would make CUDA run (one line, for a crash-looping container)."""
    if CUDA not in ort.get_available_providers():
        why = f"this onnxruntime {ort.__version__} has no CUDA support (the CPU build: build the image with ORT=gpu)"
    else:
        why = (
            f"onnxruntime {ort.__version__} has CUDA support but could not run it, so it fell back to "
            f"{provider_in_use} (its own log above says why)"
        )
    return (
        f"provider 'cuda' was asked for (RIDE_PROVIDER=cuda) but CUDA cannot run here: {why}; {GPU_REQUIREMENTS}. "
        "Set RIDE_PROVIDER=auto to serve on the CPU instead."
    )


def configure_global_thread_pool(intra_op_threads: int, inter_op_threads: int) -> None:
    """Create onnxruntime's process-wide CPU thread pool (sessions then share it instead of fighting).

    onnxruntime allows this once per process, before the sessions that use it: a second call (a second model in
    the same process, as in tests) keeps the existing pool.
    """
    try:
        ort.set_global_thread_pool_sizes(intra_op_threads, inter_op_threads)
    except Exception as error:  # onnxruntime raises its own pybind Fail type
        if "already been created" not in str(error):
            raise
        logger.debug("onnxruntime global thread pool already exists; reusing it")


def _session_options(shared_thread_pool: bool, intra_op_threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if shared_thread_pool:
        options.use_per_session_threads = False
    else:
        options.intra_op_num_threads = intra_op_threads
    # ENABLE_ALL is the default; EXTENDED was measured 2x slower on these graphs.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def _create_session(
    folder: Path, spec: GraphSpec, providers: list[str], options: ort.SessionOptions
) -> ort.InferenceSession:
    path = folder / spec.file
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as error:
        raise ModelLoadError(f"onnxruntime cannot load {spec.file}: {first_line(error)}") from None
    actual_inputs = sorted(i.name for i in session.get_inputs())
    actual_outputs = {o.name for o in session.get_outputs()}
    expected_inputs = sorted(t.name for t in spec.inputs)
    missing_outputs = {t.name for t in spec.outputs} - actual_outputs
    if actual_inputs != expected_inputs or missing_outputs:
        raise ModelLoadError(
            f"{spec.file} does not match the manifest: inputs {actual_inputs} (manifest {expected_inputs}), "
            f"outputs {sorted(actual_outputs)}"
        )
    return session


@dataclass(frozen=True)
class _Graph:
    session: ort.InferenceSession
    input_dtypes: dict[str, type]  # from the manifest: float16 graphs take float16 inputs
    output_names: list[str]

    def run(self, **inputs: np.ndarray) -> list[np.ndarray]:
        feed = {name: np.ascontiguousarray(value, dtype=self.input_dtypes[name]) for name, value in inputs.items()}
        outputs = self.session.run(self.output_names, feed)
        return [np.asarray(o, dtype=np.float32) for o in outputs]

    @classmethod
    def create(
        cls, folder: Path, spec: GraphSpec, providers: list[str], options: ort.SessionOptions, output_names: list[str]
    ) -> _Graph:
        session = _create_session(folder, spec, providers, options)
        dtypes = {t.name: _NUMPY_DTYPES[t.dtype] for t in spec.inputs}
        return cls(session=session, input_dtypes=dtypes, output_names=output_names)


class OnnxModel:
    """A loaded model folder: the manifest plus one onnxruntime session per graph.

    Implements `cascade.CascadeGraphs`, so ``run_cascade(model, images, ...)`` runs it.
    """

    def __init__(self, manifest: Manifest, folder: Path, graphs: Sequence[_Graph]) -> None:
        self.manifest = manifest
        self.folder = folder
        num_experts = manifest.cascade.num_experts
        self._trunk = graphs[0]
        self._experts = list(graphs[1 : 1 + num_experts])
        self._routers = list(graphs[1 + num_experts :])
        self._cost = manifest.cost_model()
        self.providers_by_graph = {
            spec.file: g.session.get_providers() for spec, g in zip(manifest.graph_specs(), graphs, strict=True)
        }

    @property
    def num_experts(self) -> int:
        return self.manifest.cascade.num_experts

    @property
    def has_routers(self) -> bool:
        return self.manifest.cascade.has_routers

    @property
    def cost(self) -> CostModel:
        return self._cost

    @property
    def provider(self) -> str:
        """The execution provider really in use (read back from the sessions, not the one asked for)."""
        first = {providers[0] for providers in self.providers_by_graph.values()}
        return first.pop() if len(first) == 1 else "mixed:" + ",".join(sorted(first))

    def trunk(self, images: np.ndarray) -> np.ndarray:
        return self._trunk.run(**{TRUNK_INPUT: images})[0]

    def expert(self, k: int, shared: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, feature = self._experts[k - 1].run(**{EXPERT_INPUT: shared})
        return logits, feature

    def router(self, k: int, mean_logits: np.ndarray, feature: np.ndarray) -> np.ndarray:
        return self._routers[k - 1].run(**{ROUTER_MEAN_LOGITS: mean_logits, ROUTER_FEATURE: feature})[0]

    def dummy_batch(self, size: int) -> np.ndarray:
        """A zero batch of the model's input shape (for warm-up and the start-up check)."""
        spec = self.manifest.input
        return np.zeros((size, spec.channels, spec.height, spec.width), dtype=np.float32)


def load_model(
    folder: Path,
    *,
    provider: str = "auto",
    intra_op_threads: int = 0,
    inter_op_threads: int = 1,
    shared_thread_pool: bool = True,
) -> OnnxModel:
    """Load and check a model folder, and create its sessions.

    The manifest is validated against its schema and every graph's sha256 is verified; then each graph gets an
    onnxruntime session and one image runs through every graph, so that a folder that loads is a folder that
    runs. Any problem raises `ModelLoadError` with a one-line message.

    With ``shared_thread_pool`` (the server's choice) all sessions share onnxruntime's process-wide CPU pool:
    per-session pools fight over the cores and made the split cascade up to 5x slower. That pool is process
    state: once it exists, every later session in the process must set ``use_per_session_threads = False``
    (an onnxruntime rule), so code that shares a process with other onnxruntime users (tests) passes False.
    """
    folder = Path(folder)
    try:
        manifest = load_manifest(folder, check_hashes=True)
    except ManifestError as error:
        raise ModelLoadError(str(error)) from None
    if shared_thread_pool:
        configure_global_thread_pool(intra_op_threads, inter_op_threads)
    options = _session_options(shared_thread_pool, intra_op_threads)
    providers = requested_providers(provider)
    if CUDA in providers and hasattr(ort, "preload_dlls"):
        # onnxruntime-gpu finds the CUDA / cuDNN libraries installed by its pip extras only after this call.
        ort.preload_dlls()
    graphs = [_Graph.create(folder, manifest.graphs.trunk, providers, options, [TRUNK_OUTPUT])]
    for spec in manifest.graphs.experts:
        graphs.append(_Graph.create(folder, spec, providers, options, [EXPERT_LOGITS, EXPERT_FEATURE]))
    for spec in manifest.graphs.routers:
        graphs.append(_Graph.create(folder, spec, providers, options, [ROUTER_OUTPUT]))
    model = OnnxModel(manifest, folder, graphs)
    if provider == "cuda" and model.provider != CUDA:
        raise ModelLoadError(cuda_unavailable_message(model.provider))
    try:
        warm_up(model, batch_sizes=(1,))
    except Exception as error:
        raise ModelLoadError(f"the graphs of {folder} do not run together: {first_line(error)}") from None
    return model


def warm_up(model: OnnxModel, batch_sizes: Sequence[int], repeats: int = 2) -> None:
    """Run every graph (threshold 0, all experts) at each batch size, so first requests pay no set-up cost."""
    for size in batch_sizes:
        for _ in range(repeats):
            run_cascade(model, model.dummy_batch(size), thresholds=0.0, max_experts=model.num_experts)
