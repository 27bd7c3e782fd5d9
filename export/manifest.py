"""The model-folder manifest: the contract between the exporter and the service.

The pydantic models below are the single definition. `manifest.schema.json`, shipped next to this module, is
generated from them (``python -m export.manifest > export/manifest.schema.json``; a test keeps the two equal) so
that tools outside Python can validate a model folder too. This module must stay importable without torch:
the service imports it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cascade import DECISION_RULE, CostModel, Threshold

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")

# Graph files and tensor names, fixed so that the service can rely on them.
TRUNK_FILE = "trunk.onnx"
TRUNK_INPUT, TRUNK_OUTPUT = "image", "shared"
EXPERT_INPUT, EXPERT_LOGITS, EXPERT_FEATURE = "shared", "logits", "feature"
ROUTER_MEAN_LOGITS, ROUTER_FEATURE, ROUTER_OUTPUT = "mean_logits", "feature", "router_logit"


def expert_file(k: int) -> str:
    """File of expert k (1-based)."""
    return f"expert_{k}.onnx"


def router_file(k: int) -> str:
    """File of router k (1-based): it decides whether expert k + 1 runs."""
    return f"router_{k}.onnx"


class ManifestError(ValueError):
    """A model folder that cannot be trusted: schema violation, missing file or hash mismatch."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelId(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(min_length=1)


class SourceCheckpoint(_Strict):
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the checkpoint's weights file.")


class ClassInfo(_Strict):
    id: int = Field(ge=0)
    name: str
    train_count: int = Field(ge=0)
    group: Literal["many", "medium", "few"]


class InputSpec(_Strict):
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    channels: Literal[3] = 3
    channel_order: Literal["RGB"] = "RGB"
    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["float32", "float16"] = "float32"
    resize: Literal["bilinear", "bicubic", "nearest"] = Field(
        "bilinear", description="How an image of another size is brought to height x width (aspect ratio ignored)."
    )
    crop: Literal["none"] = Field("none", description="No crop: the whole image is resized.")
    scale: float = Field(1.0 / 255.0, description="Pixel values are multiplied by this before normalisation.")
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class TensorSpec(_Strict):
    name: str
    shape: list[int | str] = Field(description="'N' marks the dynamic batch axis.")
    dtype: Literal["float32", "float16", "int64"]


class GraphSpec(_Strict):
    file: str = Field(pattern=r"^[A-Za-z0-9_.-]+\.onnx$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    macs_per_image: int = Field(ge=0)


class Graphs(_Strict):
    trunk: GraphSpec
    experts: list[GraphSpec] = Field(min_length=1, max_length=8)
    routers: list[GraphSpec] = Field(max_length=7, description="One per expert except the last; empty: no routing.")


class Cascade(_Strict):
    num_experts: int = Field(ge=1, le=8)
    has_routers: bool
    default_threshold: Threshold
    top_z: int | None = Field(None, ge=1)
    decision_rule: Literal[DECISION_RULE] = DECISION_RULE
    all_experts_without_routers: bool = Field(
        description="True when there are no routers: every request runs all experts."
    )


class EvalMetrics(_Strict):
    """Numbers from the checkpoint's own evaluation (None when it was not evaluated)."""

    dataset: str | None = None
    all_experts_accuracy: float | None = None
    routed_accuracy: float | None = None
    mean_experts_used: float | None = None
    relative_compute: float | None = None


class ToolVersions(_Strict):
    ride_serve: str
    python: str
    torch: str
    onnx: str
    onnxruntime: str
    opset: int = Field(ge=18)


class Manifest(_Strict):
    format_version: Literal[1] = FORMAT_VERSION
    model: ModelId
    source_checkpoint: SourceCheckpoint
    precision: Literal["float32", "float16"] = "float32"
    classes: list[ClassInfo] = Field(min_length=2)
    input: InputSpec
    graphs: Graphs
    cascade: Cascade
    metrics: EvalMetrics
    exported_with: ToolVersions

    def graph_specs(self) -> list[GraphSpec]:
        return [self.graphs.trunk, *self.graphs.experts, *self.graphs.routers]

    def cost_model(self) -> CostModel:
        """The cascade's compute model from the MACs per image of each graph."""
        return CostModel(
            trunk_macs=self.graphs.trunk.macs_per_image,
            expert_macs=tuple(g.macs_per_image for g in self.graphs.experts),
            router_macs=tuple(g.macs_per_image for g in self.graphs.routers),
        )


def json_schema() -> dict:
    """The JSON schema of the manifest, generated from the pydantic models."""
    schema = Manifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://ride-serve.dev/schemas/manifest-v1.json"
    return schema


def shipped_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (graphs and checkpoint weights alike)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_consistency(manifest: Manifest) -> None:
    cascade, graphs = manifest.cascade, manifest.graphs
    if len(graphs.experts) != cascade.num_experts:
        raise ManifestError(f"{len(graphs.experts)} expert graphs for num_experts={cascade.num_experts}")
    expected_routers = cascade.num_experts - 1 if cascade.has_routers else 0
    if len(graphs.routers) != expected_routers:
        raise ManifestError(f"{len(graphs.routers)} router graphs, expected {expected_routers}")
    if cascade.all_experts_without_routers == cascade.has_routers:
        raise ManifestError("all_experts_without_routers must be the opposite of has_routers")
    if [c.id for c in manifest.classes] != list(range(len(manifest.classes))):
        raise ManifestError("class ids must be 0..C-1 in order")


def validate_manifest_dict(data: dict, source: str = MANIFEST_NAME) -> Manifest:
    """Validate raw manifest data against the shipped JSON schema and the pydantic model."""
    try:
        jsonschema.validate(data, shipped_schema())
    except jsonschema.ValidationError as error:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ManifestError(f"{source} does not match the manifest schema at {where}: {error.message}") from None
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as error:
        raise ManifestError(f"{source} is invalid: {error}") from None
    _check_consistency(manifest)
    return manifest


def write_manifest(manifest: Manifest, folder: Path) -> Path:
    """Validate (as the loader will) and write ``manifest.json`` into ``folder``."""
    data = json.loads(manifest.model_dump_json())
    validate_manifest_dict(data, "manifest being written")
    path = Path(folder) / MANIFEST_NAME
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def load_manifest(folder: Path, *, check_hashes: bool = True) -> Manifest:
    """Load and validate a model folder's manifest; with ``check_hashes`` every graph's sha256 is verified."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ManifestError(f"model folder not found: {folder}")
    if not path.is_file():
        raise ManifestError(f"{folder} has no {MANIFEST_NAME}: is it a model folder written by `python -m export`?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path} is not valid JSON: {error}") from None
    manifest = validate_manifest_dict(data, str(path))
    if check_hashes:
        verify_graph_hashes(manifest, folder)
    return manifest


def verify_graph_hashes(manifest: Manifest, folder: Path) -> None:
    for spec in manifest.graph_specs():
        graph_path = Path(folder) / spec.file
        if not graph_path.is_file():
            raise ManifestError(f"graph {spec.file} listed in the manifest is missing from {folder}")
        actual = sha256_file(graph_path)
        if actual != spec.sha256:
            raise ManifestError(
                f"graph {spec.file} has sha256 {actual}, the manifest says {spec.sha256}: "
                "the file was modified or corrupted; re-export the model"
            )


if __name__ == "__main__":
    json.dump(json_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")
