"""Where onnxruntime really ran each node of a graph, read from the session's profile of one run.

``InferenceSession.get_providers()`` lists the providers a session registered, not where its nodes run: with CUDA
registered, a node that has no CUDA kernel for its type or shape runs on the CPU without a word, and the data goes
to the host and back around it. The profile of a run records the provider of every node that ran.

Nodes whose outputs are all integers only compute shapes (``Shape``, the index arithmetic of a reshape);
onnxruntime keeps those on the CPU on purpose, where the shapes are needed. A node that produces floating-point
data on the CPU is compute that left the GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

FLOATING = frozenset({"float", "float16", "bfloat16", "double"})
_KERNEL_SUFFIX = "_kernel_time"


@dataclass(frozen=True)
class NodeRun:
    """One node's run in a profile: which graph, node and operator, on which provider, producing which types."""

    graph: str
    node: str
    op_type: str
    provider: str
    output_types: tuple[str, ...]

    @property
    def computes(self) -> bool:
        """Produces floating-point data (or does not say what it produces): more than shape arithmetic."""
        return not self.output_types or any(t in FLOATING for t in self.output_types)


def read_profile(path: Path, graph: str) -> list[NodeRun]:
    """The node runs of an onnxruntime profile file (Chrome trace JSON), in the order they ran."""
    events = json.loads(Path(path).read_text())
    runs = []
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith(_KERNEL_SUFFIX):
            continue
        args = event.get("args", {})
        outputs = tuple(kind for output in args.get("output_type_shape", []) for kind in output)
        runs.append(
            NodeRun(graph, name[: -len(_KERNEL_SUFFIX)], args.get("op_name", "?"), args.get("provider", "?"), outputs)
        )
    return runs


def compute_nodes_off(runs: list[NodeRun], provider: str) -> list[NodeRun]:
    """The runs that computed (more than shapes) on another provider than ``provider``, one per graph and node."""
    seen: dict[tuple[str, str], NodeRun] = {}
    for run in runs:
        if run.computes and run.provider != provider:
            seen.setdefault((run.graph, run.node), run)
    return list(seen.values())


def describe_nodes(runs: list[NodeRun], limit: int = 8) -> str:
    """``graph: node (Op) on Provider`` for the first ``limit`` runs, and how many more."""
    shown = [f"{r.graph}: {r.node} ({r.op_type}) on {r.provider}" for r in runs[:limit]]
    more = f" and {len(runs) - limit} more" if len(runs) > limit else ""
    return "; ".join(shown) + more
