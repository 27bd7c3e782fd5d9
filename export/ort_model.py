"""The graphs of a model folder on onnxruntime (the CPU provider, or CUDA where it runs), for the exporter's
verification.

`OrtModel` is a `cascade.CascadeGraphs`: verification runs the service's own cascade (`cascade.run_cascade`) on
it, which feeds each expert only the rows that are still running, so the graphs are also exercised at several
batch sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime

from cascade import CostModel
from export.manifest import (
    EXPERT_INPUT,
    ROUTER_FEATURE,
    ROUTER_MEAN_LOGITS,
    TRUNK_INPUT,
    Graphs,
    GraphSpec,
)
from export.providers import CPU, CUDA, CudaOptions, provider_entries

_NUMPY = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


class GraphRuntimeError(RuntimeError):
    """onnxruntime could not load or run a graph."""


class OrtGraph:
    """One graph in an onnxruntime session on ``provider`` (``"cpu"`` or ``"cuda"``, with the service's CUDA
    options); inputs are cast to the graph's dtypes, outputs to float32."""

    def __init__(self, path: Path, spec: GraphSpec, provider: str = "cpu") -> None:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only
        # Threads that spin while waiting cost more than they gain on a shared machine (verification is short).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.name = Path(path).name
        providers = provider_entries([CUDA, CPU] if provider == "cuda" else [CPU], CudaOptions())
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        except Exception as error:  # onnxruntime raises its own pybind exception types
            raise GraphRuntimeError(f"onnxruntime {onnxruntime.__version__} cannot load {self.name}: {error}") from None
        if provider == "cuda" and self.session.get_providers()[0] != CUDA:
            raise GraphRuntimeError(
                f"CUDA cannot run {self.name} here: onnxruntime {onnxruntime.__version__} offers "
                f"{', '.join(onnxruntime.get_available_providers())} (the CUDA provider needs onnxruntime-gpu, an "
                "NVIDIA driver and a GPU); verify with --provider cpu"
            )
        self.dtypes = {t.name: _NUMPY[t.dtype] for t in spec.inputs}
        self.output_names = [t.name for t in spec.outputs]

    def __call__(self, **inputs: np.ndarray) -> list[np.ndarray]:
        feed = {name: np.ascontiguousarray(value, dtype=self.dtypes[name]) for name, value in inputs.items()}
        try:
            outputs = self.session.run(self.output_names, feed)
        except Exception as error:
            raise GraphRuntimeError(f"onnxruntime failed to run {self.name}: {error}") from None
        return [np.asarray(out, dtype=np.float32) for out in outputs]


@dataclass
class ExpertRun:
    """Every expert on every row: logits ``[B, E, C]`` and pooled features ``[B, E, d]``."""

    shared: np.ndarray
    logits: np.ndarray
    features: np.ndarray


class OrtModel:
    """The graphs of a model folder (``manifest.graphs``), ready to run on ``provider`` ("cpu" or "cuda")."""

    def __init__(self, folder: Path, graphs: Graphs, provider: str = "cpu") -> None:
        folder = Path(folder)
        if provider == "cuda" and hasattr(onnxruntime, "preload_dlls"):
            onnxruntime.preload_dlls()  # the CUDA and cuDNN libraries of onnxruntime-gpu's pip extras
        self._trunk = OrtGraph(folder / graphs.trunk.file, graphs.trunk, provider)
        self._experts = [OrtGraph(folder / g.file, g, provider) for g in graphs.experts]
        self._routers = [OrtGraph(folder / g.file, g, provider) for g in graphs.routers]
        self._cost = graphs.cost_model()

    @property
    def num_experts(self) -> int:
        return len(self._experts)

    @property
    def has_routers(self) -> bool:
        return bool(self._routers)

    @property
    def cost(self) -> CostModel:
        return self._cost

    def trunk(self, images: np.ndarray) -> np.ndarray:
        (shared,) = self._trunk(**{TRUNK_INPUT: images})
        return shared

    def expert(self, k: int, shared: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Expert ``k`` (1-based): logits ``[B, C]`` and pooled feature ``[B, d]``."""
        logits, feature = self._experts[k - 1](**{EXPERT_INPUT: shared})
        return logits, feature

    def router(self, k: int, mean_logits: np.ndarray, feature: np.ndarray) -> np.ndarray:
        """Router ``k`` (1-based) logits ``[B]``."""
        (logit,) = self._routers[k - 1](**{ROUTER_MEAN_LOGITS: mean_logits, ROUTER_FEATURE: feature})
        return logit[:, 0]

    def all_experts(self, images: np.ndarray) -> ExpertRun:
        """Trunk once, then every expert on every row."""
        shared = self.trunk(images)
        outputs = [self.expert(k, shared) for k in range(1, self.num_experts + 1)]
        return ExpertRun(shared, np.stack([o[0] for o in outputs], 1), np.stack([o[1] for o in outputs], 1))
