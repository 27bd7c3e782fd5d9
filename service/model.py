"""Loading a model folder into onnxruntime sessions: provider choice, one thread pool, sanity run, warm-up.

With I/O binding (``io_binding``; on by default with CUDA), the trunk's output stays where onnxruntime computed
it, as an `onnxruntime.OrtValue`, and the experts read it there: a contiguous run of rows (every row, one row,
or rows that all continue) is bound as a view of that memory, so nothing goes to the host and back between the
trunk and the experts. Only a scattered selection of rows (some exited in between) is gathered through the host,
once per batch. Expert and router outputs, which the decision rule reads, come back to the host.

Only onnxruntime and numpy here (no torch): this is what the serving environment installs.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cascade import CostModel, run_cascade
from export.known_answers import check_known_answers
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
from export.providers import CPU, CUDA, CudaOptions, ProviderEntry, provider_entries
from service.errors import ModelLoadError, first_line
from service.placement import NodeRun, compute_nodes_off, describe_nodes, read_profile

logger = logging.getLogger(__name__)

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


def cuda_build_version() -> str:
    """The CUDA version this onnxruntime was built for ('13.0'), or '' for a build without CUDA."""
    return getattr(ort, "cuda_version", "") or ""


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


def _session_options(
    shared_thread_pool: bool, intra_op_threads: int, profile_prefix: Path | None
) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if shared_thread_pool:
        options.use_per_session_threads = False
    else:
        options.intra_op_num_threads = intra_op_threads
    # ENABLE_ALL is the default; EXTENDED was measured 2x slower on these graphs.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:
        # Profiles the runs until `end_profiling`: the start-up check reads where each node ran from the first one.
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    return options


def _create_session(
    folder: Path, spec: GraphSpec, providers: list[ProviderEntry], options: ort.SessionOptions
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


class _TrunkOutput:
    """The trunk's output in onnxruntime's memory, and its host copy once one is needed."""

    def __init__(self, value: ort.OrtValue, dtype: type) -> None:
        self.value = value
        self.dtype = dtype
        self.shape = tuple(value.shape())
        self.row_bytes = int(np.prod(self.shape[1:])) * np.dtype(dtype).itemsize
        self._host: np.ndarray | None = None

    def host(self) -> np.ndarray:
        if self._host is None:
            self._host = self.value.numpy()
        return self._host


@dataclass(frozen=True)
class DeviceRows:
    """Rows ``start:stop`` of a trunk output left on the device: what `OnnxModel.trunk` returns with I/O binding.

    Selecting rows, as the cascade does, gives a view when they are consecutive and host rows otherwise.
    """

    output: _TrunkOutput
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, rows: np.ndarray) -> DeviceRows | np.ndarray:
        rows = np.asarray(rows) + self.start
        if rows.size and rows[-1] - rows[0] + 1 == rows.size and np.all(np.diff(rows) == 1):
            return DeviceRows(self.output, int(rows[0]), int(rows[-1]) + 1)
        return self.output.host()[rows]

    def to_host(self) -> np.ndarray:
        return self.output.host()[self.start : self.stop]


@dataclass(frozen=True)
class _Graph:
    session: ort.InferenceSession
    input_dtypes: dict[str, type]  # from the manifest: float16 graphs take float16 inputs
    output_names: list[str]
    output_dtypes: dict[str, type]
    device: tuple[str, int] | None = None  # (onnxruntime device type, id) when I/O binding is on

    def run(self, **inputs: np.ndarray | DeviceRows) -> list[np.ndarray]:
        if self.device is None:
            feed = {name: np.ascontiguousarray(value, dtype=self.input_dtypes[name]) for name, value in inputs.items()}
            outputs = self.session.run(self.output_names, feed)
            return [np.asarray(o, dtype=np.float32) for o in outputs]
        binding = self._bind_inputs(inputs)
        for name in self.output_names:
            binding.bind_output(name)  # to the host: the decision rule reads these
        self.session.run_with_iobinding(binding)
        return [np.asarray(o, dtype=np.float32) for o in binding.copy_outputs_to_cpu()]

    def run_on_device(self, **inputs: np.ndarray) -> DeviceRows:
        """Run a one-output graph and leave its output on the device (I/O binding only)."""
        assert self.device is not None and len(self.output_names) == 1
        binding = self._bind_inputs(inputs)
        device_type, device_id = self.device
        binding.bind_output(self.output_names[0], device_type, device_id)
        self.session.run_with_iobinding(binding)
        (value,) = binding.get_outputs()
        output = _TrunkOutput(value, self.output_dtypes[self.output_names[0]])
        return DeviceRows(output, 0, output.shape[0])

    def _bind_inputs(self, inputs: dict[str, np.ndarray | DeviceRows]) -> ort.IOBinding:
        assert self.device is not None
        binding = self.session.io_binding()
        for name, value in inputs.items():
            if isinstance(value, DeviceRows):
                output = value.output
                device_type, device_id = self.device
                binding.bind_input(
                    name,
                    device_type,
                    device_id,
                    output.dtype,
                    [len(value), *output.shape[1:]],
                    output.value.data_ptr() + value.start * output.row_bytes,
                )
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value, dtype=self.input_dtypes[name]))
        return binding

    @classmethod
    def create(
        cls,
        folder: Path,
        spec: GraphSpec,
        providers: list[ProviderEntry],
        options: ort.SessionOptions,
        output_names: list[str],
        io_binding: str = "off",
    ) -> _Graph:
        session = _create_session(folder, spec, providers, options)
        in_use = session.get_providers()[0]
        bound = io_binding == "on" or (io_binding == "auto" and in_use == CUDA)
        device = ("cuda", 0) if in_use == CUDA else ("cpu", 0)
        return cls(
            session=session,
            input_dtypes={t.name: _NUMPY_DTYPES[t.dtype] for t in spec.inputs},
            output_names=output_names,
            output_dtypes={t.name: _NUMPY_DTYPES[t.dtype] for t in spec.outputs},
            device=device if bound else None,
        )


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
        self._sessions = {spec.file: g.session for spec, g in zip(manifest.graph_specs(), graphs, strict=True)}
        # Where the nodes of the first run ran (only read when CUDA was asked for): see `check_placement`.
        self.node_runs: list[NodeRun] = []

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

    @property
    def io_binding(self) -> bool:
        """True when the trunk's output stays on the device between graph calls."""
        return self._trunk.device is not None

    def trunk(self, images: np.ndarray) -> np.ndarray | DeviceRows:
        if self.io_binding:
            return self._trunk.run_on_device(**{TRUNK_INPUT: images})
        return self._trunk.run(**{TRUNK_INPUT: images})[0]

    def expert(self, k: int, shared: np.ndarray | DeviceRows) -> tuple[np.ndarray, np.ndarray]:
        logits, feature = self._experts[k - 1].run(**{EXPERT_INPUT: shared})
        return logits, feature

    def router(self, k: int, mean_logits: np.ndarray, feature: np.ndarray) -> np.ndarray:
        return self._routers[k - 1].run(**{ROUTER_MEAN_LOGITS: mean_logits, ROUTER_FEATURE: feature})[0]

    def read_placement(self) -> list[NodeRun]:
        """End the profiling of every session and read where each node of its runs so far ran."""
        runs = []
        for graph, session in self._sessions.items():
            path = session.end_profiling()
            if path:
                runs += read_profile(Path(path), graph)
                Path(path).unlink(missing_ok=True)
        return runs

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
    cuda: CudaOptions | None = None,
    expected_digest: str | None = None,
    io_binding: str = "auto",
) -> OnnxModel:
    """Load and check a model folder, and create its sessions.

    The manifest is validated against its schema, its files must lie inside the folder, every graph's sha256 is
    verified, and so is the folder's digest when ``expected_digest`` pins one (``RIDE_MODEL_SHA256``); then each
    graph gets an onnxruntime session, and the manifest's known answers run through every graph and must come
    back finite and as the exporter recorded them (`export.known_answers`), so that a folder that loads is the
    folder that was exported and verified, and it runs. When CUDA is asked for, that run is profiled and every
    node that computed on the CPU is named: with ``provider='cuda'`` any such node refuses the start
    (`check_placement`). Any problem raises `ModelLoadError` with a one-line message.

    With ``shared_thread_pool`` (the server's choice) all sessions share onnxruntime's process-wide CPU pool:
    per-session pools fight over the cores and made the split cascade up to 5x slower. That pool is process
    state: once it exists, every later session in the process must set ``use_per_session_threads = False``
    (an onnxruntime rule), so code that shares a process with other onnxruntime users (tests) passes False.

    ``io_binding`` (``auto``: with CUDA only; ``on``; ``off``) keeps the trunk's output on the device between
    graph calls (see the module docstring).
    """
    if io_binding not in ("auto", "on", "off"):
        raise ValueError(f"unknown io_binding choice {io_binding!r}: expected auto, on or off")
    folder = Path(folder)
    try:
        manifest = load_manifest(folder, check_hashes=True, expected_digest=expected_digest)
    except ManifestError as error:
        raise ModelLoadError(str(error)) from None
    if shared_thread_pool:
        configure_global_thread_pool(intra_op_threads, inter_op_threads)
    providers = requested_providers(provider)
    if CUDA in providers and hasattr(ort, "preload_dlls"):
        # onnxruntime-gpu finds the CUDA / cuDNN libraries installed by its pip extras only after this call.
        ort.preload_dlls()
    profiles = _profile_folder(provider) if CUDA in providers else None
    try:
        model = _load_sessions(
            folder,
            manifest,
            provider_entries(providers, cuda or CudaOptions()),
            shared_thread_pool,
            intra_op_threads,
            profiles,
            io_binding,
        )
        if provider == "cuda" and model.provider != CUDA:
            raise ModelLoadError(cuda_unavailable_message(model.provider))
        try:
            check_known_answers(model, manifest)
        except ManifestError as error:
            raise ModelLoadError(str(error)) from None
        except Exception as error:
            raise ModelLoadError(f"the graphs of {folder} do not run together: {first_line(error)}") from None
        if profiles is not None:
            model.node_runs = model.read_placement()
    finally:
        if profiles is not None:
            shutil.rmtree(profiles, ignore_errors=True)
    if model.provider == CUDA:
        check_placement(model.node_runs, required=provider == "cuda")
    return model


def _profile_folder(provider: str) -> Path | None:
    """A private folder for the start-up run's profiles, or None (with a warning) where none can be made."""
    try:
        return Path(tempfile.mkdtemp(prefix="ride-placement-"))
    except OSError as error:
        if provider == "cuda":
            raise ModelLoadError(
                f"cannot check where the graphs' nodes run: no temporary folder for onnxruntime's profile ({error}); "
                "make TMPDIR (or /tmp) writable"
            ) from None
        logger.warning("not checking where the graphs' nodes run: no temporary folder (%s)", error)
        return None


def _load_sessions(
    folder: Path,
    manifest: Manifest,
    providers: list[ProviderEntry],
    shared_thread_pool: bool,
    intra_op_threads: int,
    profiles: Path | None,
    io_binding: str,
) -> OnnxModel:
    def options(spec: GraphSpec) -> ort.SessionOptions:
        prefix = profiles / Path(spec.file).stem if profiles is not None else None
        return _session_options(shared_thread_pool, intra_op_threads, prefix)

    trunk = manifest.graphs.trunk
    graphs = [_Graph.create(folder, trunk, providers, options(trunk), [TRUNK_OUTPUT], io_binding)]
    for spec in manifest.graphs.experts:
        outputs = [EXPERT_LOGITS, EXPERT_FEATURE]
        graphs.append(_Graph.create(folder, spec, providers, options(spec), outputs, io_binding))
    for spec in manifest.graphs.routers:  # small inputs from the host and outputs to it: nothing to keep
        graphs.append(_Graph.create(folder, spec, providers, options(spec), [ROUTER_OUTPUT]))
    return OnnxModel(manifest, folder, graphs)


def check_placement(runs: list[NodeRun], *, required: bool) -> None:
    """Refuse (``required``: the server was told ``provider=cuda``) or report the nodes that computed on the CPU
    although CUDA runs the graphs. Shape arithmetic (integer outputs) on the CPU is onnxruntime's normal plan."""
    off = compute_nodes_off(runs, CUDA)
    if not off:
        logger.info("all %d compute nodes of the start-up run ran on CUDA", sum(r.computes for r in runs))
        return
    message = f"{len(off)} compute nodes ran outside CUDA: {describe_nodes(off)}"
    if required:
        raise ModelLoadError(
            f"{message}. Each costs copies between the GPU and the host and CPU time per batch; a newer "
            "onnxruntime-gpu may have the kernels, or set RIDE_PROVIDER=auto to serve anyway"
        )
    logger.warning("%s (serving anyway: RIDE_PROVIDER=cuda would refuse)", message)


def warm_up(model: OnnxModel, batch_sizes: Sequence[int], repeats: int = 2) -> None:
    """Run every graph (threshold 0, all experts) at each batch size, so first requests pay no set-up cost."""
    for size in batch_sizes:
        for _ in range(repeats):
            run_cascade(model, model.dummy_batch(size), thresholds=0.0, max_experts=model.num_experts)
