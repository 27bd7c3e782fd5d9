"""Torch module -> one self-contained ONNX graph, and the checks every exported graph must pass.

The dynamo exporter (torch 2.13) is used with ``optimize=True``: its optimizer folds every eval-mode
BatchNorm into the preceding convolution, which :func:`check_graph` then confirms (no ``BatchNormalization``
node may remain). Each graph gets one batch ``Dim`` shared by all its inputs (../shared/SERVING-NOTES.md "ONNX export"),
so the batch axis stays dynamic; without it the example batch size would be baked in.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from onnx import TensorProto
from torch import Tensor, nn

from export.manifest import (
    EXPERT_FEATURE,
    EXPERT_INPUT,
    EXPERT_LOGITS,
    ROUTER_FEATURE,
    ROUTER_MEAN_LOGITS,
    ROUTER_OUTPUT,
    TRUNK_FILE,
    TRUNK_INPUT,
    TRUNK_OUTPUT,
    TensorSpec,
    expert_file,
    router_file,
)
from training.checkpoint import (
    META_FILE,
    ROUTERS_PREFIX,
    CheckpointError,
    CheckpointMeta,
    model_from_checkpoint,
    routers_from_checkpoint,
    split_state,
    weights_sha256,
)
from training.macs import count_macs
from training.models import RIDEModel
from training.models.router import Routers

MIN_OPSET = 18
DEFAULT_OPSET = 18
BATCH_AXIS = "N"  # the name of the dynamic batch axis, in the graphs and in the manifest
MAX_BATCH = 65536

_DTYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.INT64: "int64"}


class ExportError(RuntimeError):
    """The model could not be exported, or an exported graph breaks a rule of the model-folder format."""


def check_opset(opset: int) -> int:
    """``opset`` if the exporter and onnx can both honour it; torch silently turns an opset < 18 into 18."""
    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET:
        raise ExportError(
            f"--opset {opset} is not supported: the model folder format needs opset {MIN_OPSET} or newer "
            f"(torch's exporter would silently write opset {MIN_OPSET} instead)"
        )
    if opset > newest:
        raise ExportError(f"--opset {opset} is newer than this onnx {onnx.__version__} knows (at most {newest})")
    return opset


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    # The exporter logs one warning per missing torchvision op and torch.export emits FutureWarnings from its
    # internals; neither concerns these models and they would bury the exporter's own output.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            # Both router inputs share the one batch Dim on purpose; the exporter says so once per graph.
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used", category=UserWarning)
            yield
    finally:
        registration.setLevel(level)


def export_graph(
    module: nn.Module,
    example_inputs: tuple[Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    path: Path,
    *,
    opset: int,
) -> None:
    """Export ``module`` (in eval mode) to a single ONNX file with a dynamic batch axis and check it."""
    module.eval()
    batch = torch.export.Dim(BATCH_AXIS, min=1, max=MAX_BATCH)
    try:
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(
                module,
                example_inputs,
                str(path),
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=tuple({0: batch} for _ in example_inputs),
                opset_version=opset,
                dynamo=True,
                external_data=False,
                optimize=True,
                verbose=False,
            )
    except Exception as error:  # the exporter raises many unrelated types; all mean "this module did not export"
        raise ExportError(f"torch.onnx.export failed for {path.name}: {type(error).__name__}: {error}") from error
    check_graph(path, input_names, output_names, opset=opset)


def check_graph(path: Path, input_names: list[str], output_names: list[str], *, opset: int | None = None) -> None:
    """The rules of the model-folder format: one file, onnx.checker clean (full check), opset >= 18 (exactly
    ``opset`` when given), batch-norm folded, the expected tensor names, and a dynamic batch axis everywhere."""
    path = Path(path)
    if path.with_name(path.name + ".data").exists():
        raise ExportError(f"{path.name} has an external data file: graphs must be single files")
    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model, full_check=True)
    except Exception as error:  # onnx raises DecodeError, ValidationError, InferenceError, ...
        raise ExportError(f"{path.name} is not a valid ONNX model: {type(error).__name__}: {error}") from None
    version = graph_opset(model)
    if version < MIN_OPSET or (opset is not None and version != opset):
        raise ExportError(f"{path.name} has opset {version}, expected {opset or f'>= {MIN_OPSET}'}")
    folded = [n.name for n in model.graph.node if n.op_type == "BatchNormalization"]
    if folded:
        raise ExportError(f"{path.name} still has {len(folded)} BatchNormalization nodes (e.g. {folded[0]})")
    if any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer):
        raise ExportError(f"{path.name} refers to external weight data: graphs must be single files")
    actual_in = [v.name for v in model.graph.input]
    actual_out = [v.name for v in model.graph.output]
    if actual_in != input_names or actual_out != output_names:
        raise ExportError(
            f"{path.name} has inputs {actual_in} and outputs {actual_out}, expected {input_names} and {output_names}"
        )
    for spec in tensor_specs(model.graph.input) + tensor_specs(model.graph.output):
        if spec.shape[:1] != [BATCH_AXIS]:
            raise ExportError(f"{path.name}: tensor {spec.name} has shape {spec.shape}; its batch axis is not dynamic")


def graph_opset(model: onnx.ModelProto) -> int:
    """The default-domain opset of ``model``."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def tensor_specs(values: list[onnx.ValueInfoProto]) -> list[TensorSpec]:
    """Manifest tensor specs of graph inputs or outputs; a symbolic axis is written as ``"N"``."""
    specs = []
    for value in values:
        tensor_type = value.type.tensor_type
        dtype = _DTYPES.get(tensor_type.elem_type)
        if dtype is None:
            raise ExportError(f"tensor {value.name} has unsupported element type {tensor_type.elem_type}")
        shape: list[int | str] = [
            dim.dim_value if dim.HasField("dim_value") else BATCH_AXIS for dim in tensor_type.shape.dim
        ]
        specs.append(TensorSpec(name=value.name, shape=shape, dtype=dtype))
    return specs


@dataclass(frozen=True)
class GraphIO:
    """The inputs and outputs of one graph file, as the manifest lists them."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


def read_graph_io(path: Path) -> GraphIO:
    """Input and output specs straight from a graph file."""
    model = onnx.load(str(path), load_external_data=False)
    return GraphIO(tensor_specs(model.graph.input), tensor_specs(model.graph.output))


def convert_to_float16(path: Path) -> None:
    """Rewrite a float32 graph in place as a float16 one: weights, inputs, outputs and arithmetic.

    Uses the converter that ships with onnxruntime (``onnxruntime.transformers.float16``) with an empty op block
    list, so that no op is left in float32 behind Cast nodes. Every op of these graphs (TopK and ReduceL2
    included) runs in float16 on onnxruntime's CPU provider, which is where the export's verification runs them;
    the CUDA provider has float16 kernels for them too, but no GPU run is part of the export.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(path))
    with warnings.catch_warnings():
        # It warns once per weight it clamps into float16's range; verification judges the effect.
        warnings.simplefilter("ignore", UserWarning)
        half = convert_float_to_float16(model, keep_io_types=False, op_block_list=[])
    onnx.save(half, str(path))


# ----------------------------------------------------------------------------------------------------------------
# The torch side: the checkpoint's modules and which graph each becomes
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SourceModel:
    """A checkpoint loaded for export or verification: the stage-1 model, its routers (or None) and the sidecar."""

    folder: Path
    model: RIDEModel
    routers: Routers | None
    meta: CheckpointMeta
    weights_sha256: str

    @property
    def threshold(self) -> float:
        """The default decision threshold: the routers' chosen one, else the config's (unused without routers)."""
        return self.meta.routers.threshold if self.meta.routers is not None else self.meta.config.router.threshold


def load_source(folder: Path) -> SourceModel:
    """Load a checkpoint folder (model + routers stored under ``routers.``) in eval mode on the CPU.

    Raises CheckpointError for a missing, corrupt or inconsistent checkpoint.
    """
    folder = Path(folder)
    model, meta, extra = model_from_checkpoint(folder)
    router_weights, unknown = split_state(extra, ROUTERS_PREFIX)
    if unknown:
        raise CheckpointError(f"checkpoint {folder} has weights that belong to no module: {sorted(unknown)[:3]}")
    if router_weights and meta.routers is None:
        raise CheckpointError(f"checkpoint {folder} has router weights but its {META_FILE} describes no routers")
    routers = routers_from_checkpoint(meta, extra, model.feature_dim)
    return SourceModel(folder, model, routers, meta, weights_sha256(folder))


@dataclass
class GraphJob:
    """One graph to export: the module, example inputs (batch 2) and the tensor names of the format."""

    file: str
    module: nn.Module
    example_inputs: tuple[Tensor, ...]
    input_names: list[str]
    output_names: list[str]


def plan_graphs(source: SourceModel, *, seed: int = 0) -> list[GraphJob]:
    """Trunk, experts 1..E and (with routers) routers 1..E-1, each with example inputs of the right shapes."""
    model, size = source.model, source.meta.input.image_size
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 3, size, size, generator=generator)
    with torch.no_grad():
        shared = model.trunk(image)
        outputs = [expert(shared) for expert in model.experts]
    jobs = [GraphJob(TRUNK_FILE, model.trunk, (image,), [TRUNK_INPUT], [TRUNK_OUTPUT])]
    for k, expert in enumerate(model.experts, start=1):
        jobs.append(GraphJob(expert_file(k), expert, (shared,), [EXPERT_INPUT], [EXPERT_LOGITS, EXPERT_FEATURE]))
    if source.routers is not None:
        running = torch.zeros_like(outputs[0][0])
        for k in range(1, model.num_experts):
            logits, feature = outputs[k - 1]
            running = running + logits
            jobs.append(
                GraphJob(
                    router_file(k),
                    source.routers.single(k).eval(),
                    (running / k, feature),
                    [ROUTER_MEAN_LOGITS, ROUTER_FEATURE],
                    [ROUTER_OUTPUT],
                )
            )
    return jobs


def macs_per_image(job: GraphJob) -> int:
    """MACs per image of the job's module on its example inputs (training.macs rules, thop-compatible: batch
    norm is counted as the trained model had it, although the graph has it folded)."""
    return count_macs(job.module, *job.example_inputs)
