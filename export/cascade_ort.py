"""A minimal numpy + onnxruntime runner for a model folder, used by the exporter's verification.

It is deliberately independent of the service's cascade (``service/cascade.py``): verification compares the
graphs against PyTorch, not the service against itself. Like the service, it feeds each expert only the rows
that are still running, so the verification also exercises the graphs at several batch sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime

from export.manifest import (
    EXPERT_INPUT,
    ROUTER_FEATURE,
    ROUTER_MEAN_LOGITS,
    TRUNK_INPUT,
    GraphSpec,
    Manifest,
)

_NUMPY = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


class GraphRuntimeError(RuntimeError):
    """onnxruntime could not load or run a graph."""


class OrtGraph:
    """One graph in an onnxruntime CPU session; inputs are cast to the graph's dtypes, outputs to float32."""

    def __init__(self, path: Path, spec: GraphSpec) -> None:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only
        # Threads that spin while waiting cost more than they gain on a shared machine (verification is short).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.name = Path(path).name
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own pybind exception types
            raise GraphRuntimeError(f"onnxruntime {onnxruntime.__version__} cannot load {self.name}: {error}") from None
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


@dataclass
class CascadeRun:
    """The early-exit cascade: final mean logits ``[B, C]``, experts used ``[B]``, router logits ``[B, E-1]``
    (NaN where a row did not reach that router)."""

    mean_logits: np.ndarray
    experts_used: np.ndarray
    router_logits: np.ndarray


class OrtModel:
    """The graphs of a model folder, ready to run on the CPU."""

    def __init__(self, folder: Path, manifest: Manifest) -> None:
        folder = Path(folder)
        graphs = manifest.graphs
        self.trunk = OrtGraph(folder / graphs.trunk.file, graphs.trunk)
        self.experts = [OrtGraph(folder / g.file, g) for g in graphs.experts]
        self.routers = [OrtGraph(folder / g.file, g) for g in graphs.routers]

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def all_experts(self, images: np.ndarray) -> ExpertRun:
        """Trunk once, then every expert on every row."""
        (shared,) = self.trunk(**{TRUNK_INPUT: images})
        outputs = [expert(**{EXPERT_INPUT: shared}) for expert in self.experts]
        return ExpertRun(shared, np.stack([o[0] for o in outputs], 1), np.stack([o[1] for o in outputs], 1))

    def router(self, k: int, mean_logits: np.ndarray, feature: np.ndarray) -> np.ndarray:
        """Router ``k`` (1-based) logits ``[B]``."""
        (logit,) = self.routers[k - 1](**{ROUTER_MEAN_LOGITS: mean_logits, ROUTER_FEATURE: feature})
        return logit[:, 0]

    def cascade(self, images: np.ndarray, threshold: float) -> CascadeRun:
        """Run the cascade, continuing a row to expert k + 1 iff ``sigmoid(router_logit) >= threshold``."""
        n = images.shape[0]
        (shared,) = self.trunk(**{TRUNK_INPUT: images})
        logits, feature = self.experts[0](**{EXPERT_INPUT: shared})
        running = logits.astype(np.float64)
        used = np.ones(n, dtype=np.int64)
        router_logits = np.full((n, self.num_experts - 1), np.nan, dtype=np.float32)
        active = np.arange(n)  # rows still running, and their outputs of the last expert they ran
        for k in range(1, self.num_experts):
            if self.routers:
                mean = (running[active] / k).astype(np.float32)
                logit = self.router(k, mean, feature)
                router_logits[active, k - 1] = logit
                keep = _sigmoid(logit) >= threshold
                active, feature = active[keep], feature[keep]
            if active.size == 0:
                break
            logits, feature = self.experts[k](**{EXPERT_INPUT: shared[active]})
            running[active] += logits
            used[active] += 1
        return CascadeRun((running / used[:, None]).astype(np.float32), used, router_logits)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))
