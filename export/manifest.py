"""The model-folder manifest: the contract between the exporter and the service.

The pydantic models below are the single definition. `manifest.schema.json`, shipped next to this module, is
generated from them (``python -m export.manifest > export/manifest.schema.json``; a test keeps the two equal) so
that tools outside Python can validate a model folder too. This module must stay importable without torch:
the service imports it.

What loading a folder checks (`load_manifest`): the schema (class names unique and printable, a positive finite
std, ...), that the manifest and every graph are files inside the folder (a symlink may not lead out of it), every
graph's sha256, and, when one is pinned, the folder's digest (`folder_digest`: the sha256 of ``manifest.json``,
which holds every graph's sha256, so one value pins everything the server loads: a graph edited together with its
hash in the manifest changes it). Format 2 added the known answers (`KnownAnswers`, checked by
`export.known_answers`); a format-1 manifest is refused with the advice to re-export: without known answers its
graphs cannot be checked. An int8 folder carries a `Quantization` record as well (optional in the format: float32
and float16 manifests have none). Format 3 adds the validation accuracy/compute curve (`OperatingCurve`), from
which the service picks its operating points; format 2 is still read (its models have no curve: they serve at
their default threshold, and a compute budget is refused for them).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from pathlib import Path
from typing import Annotated, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cascade import DECISION_RULE, CostModel, Threshold

FORMAT_VERSION = 3
# Older formats still read: 2 (no operating curve).
READABLE_FORMATS = (2, 3)
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


# A class name is shown to people (API replies, dashboards, pages): no markup, no control characters, no space at
# either end. `ClassInfo` also requires str.isprintable(), which JSON-schema patterns cannot say.
CLASS_NAME_PATTERN = r'^[^\s<>&"`\\](?:[^<>&"`\\\x00-\x1f\x7f]*[^\s<>&"`\\])?$'
Finite = Annotated[float, Field(allow_inf_nan=False)]
PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False)]


GROUPS = ("many", "medium", "few")
Group = Literal["many", "medium", "few"]


class ClassInfo(_Strict):
    id: int = Field(ge=0)
    name: str = Field(
        min_length=1,
        max_length=200,
        pattern=CLASS_NAME_PATTERN,
        description='Unique and printable, without markup characters (<>&"`\\) or spaces at either end.',
    )
    train_count: int = Field(ge=0)
    group: Group

    @field_validator("name")
    @classmethod
    def _printable(cls, name: str) -> str:
        if not name.isprintable():
            raise ValueError(f"class name {name!r} has characters that are not printable")
        return name


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
    scale: PositiveFinite = Field(1.0 / 255.0, description="Pixel values are multiplied by this before normalisation.")
    mean: tuple[Finite, Finite, Finite]
    std: tuple[PositiveFinite, PositiveFinite, PositiveFinite] = Field(
        description="Positive: inputs are divided by it."
    )


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

    def specs(self) -> list[GraphSpec]:
        """Trunk, experts, routers, in that order."""
        return [self.trunk, *self.experts, *self.routers]

    def cost_model(self) -> CostModel:
        """The cascade's compute model from the MACs per image of each graph."""
        return CostModel(
            trunk_macs=self.trunk.macs_per_image,
            expert_macs=tuple(g.macs_per_image for g in self.experts),
            router_macs=tuple(g.macs_per_image for g in self.routers),
        )


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


Precision = Literal["float32", "float16", "int8"]
GraphPrecision = Literal["float32", "int8"]


class Calibration(_Strict):
    """Where the int8 activation ranges came from: training images only, never validation or test images."""

    split: Literal["train"] = "train"
    num_images: int = Field(ge=1)
    selection: str = Field(description="How the images were picked from the split.")
    method: Literal["minmax"] = Field("minmax", description="Activation range: min and max seen in calibration.")


class ParityGate(_Strict):
    """The int8 cascade against the float32 one on held-out validation images, at the default threshold."""

    split: Literal["validation"] = "validation"
    num_images: int = Field(ge=1)
    threshold: float
    top1_agreement: float = Field(ge=0, le=1, description="Fraction of images with the same top-1 class.")
    float32_accuracy: float = Field(ge=0, le=1)
    int8_accuracy: float = Field(ge=0, le=1)
    accuracy_change_points: float = Field(description="int8 minus float32 accuracy, in percentage points.")
    float32_mean_experts: float
    int8_mean_experts: float
    max_accuracy_drop_points: float = Field(ge=0, description="The export refuses a larger drop.")


class Quantization(_Strict):
    """How an int8 model folder was made (onnxruntime static quantization) and what its parity gate measured."""

    quantized_from: ModelId = Field(description="The float32 model whose graphs were quantized.")
    format: Literal["QDQ"] = "QDQ"
    weights: Literal["int8 per-channel symmetric"] = "int8 per-channel symmetric"
    reduce_range: bool = Field(
        description="Weights in [-64, 63] (7 bits): no int16 saturation on x86 CPUs without VNNI."
    )
    activations: Literal["uint8 per-tensor asymmetric"] = "uint8 per-tensor asymmetric"
    op_types: list[str] = Field(min_length=1, description="Operator types quantized; the rest stays float32.")
    graphs: dict[str, GraphPrecision] = Field(description="Precision of each graph file.")
    router_decisions_moved: list[int] = Field(
        description="Per router: calibration rows whose exit decision an int8 router changed (any: kept float32)."
    )
    calibration: Calibration
    parity_gate: ParityGate
    onnxruntime: str


class ToolVersions(_Strict):
    ride_serve: str
    python: str
    torch: str
    onnx: str
    onnxruntime: str
    opset: int = Field(ge=18)


class KnownAnswers(_Strict):
    """A few real images and what the exported graphs answered for them (every expert run, every router
    evaluated), so that the server can refuse graphs that answer otherwise (`export.known_answers`)."""

    images: list[str] = Field(
        min_length=1, description="Base64 PNG files: 8-bit RGB at the input's height and width, before normalisation."
    )
    logits: list[list[Finite]] = Field(description="Per image: the mean of every expert's class logits.")
    router_logits: list[list[Finite]] = Field(description="Per image: each router's logit (none without routers).")


Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class OperatingPoint(_Strict):
    """The cascade at one threshold (every expert allowed) on the curve's split."""

    threshold: Threshold
    relative_compute: float = Field(
        gt=0, le=1, allow_inf_nan=False, description="Mean MACs per image / MACs of every expert and router."
    )
    mean_experts_used: float = Field(ge=1, allow_inf_nan=False)
    accuracy: Fraction = Field(description="Top-1 accuracy over the split's images.")
    many: Fraction | None = Field(description="Mean per-class accuracy of the many-shot classes (None: no such class).")
    medium: Fraction | None = Field(description="The same for the medium-shot classes.")
    few: Fraction | None = Field(description="The same for the few-shot classes.")


class OperatingCurve(_Strict):
    """Accuracy against relative compute when sweeping the threshold, measured by the exporter on the exported
    graphs over the training run's validation split (never the test split)."""

    split: Literal["validation"] = "validation"
    num_images: int = Field(ge=1)
    points: list[OperatingPoint] = Field(
        min_length=1, description="By increasing threshold (so by non-increasing relative compute); unique thresholds."
    )


class Manifest(_Strict):
    format_version: Literal[2, 3] = FORMAT_VERSION
    model: ModelId
    source_checkpoint: SourceCheckpoint
    precision: Precision = "float32"
    classes: list[ClassInfo] = Field(min_length=2)
    input: InputSpec
    graphs: Graphs
    cascade: Cascade
    metrics: EvalMetrics
    exported_with: ToolVersions
    known_answers: KnownAnswers
    quantization: Quantization | None = Field(None, description="Present exactly when precision is int8.")
    operating_curve: OperatingCurve | None = Field(
        None, description="Format 3: the validation curve (absent for a model without routers or validation split)."
    )

    def graph_specs(self) -> list[GraphSpec]:
        return self.graphs.specs()

    def cost_model(self) -> CostModel:
        """The cascade's compute model from the MACs per image of each graph."""
        return self.graphs.cost_model()


def json_schema() -> dict:
    """The JSON schema of the manifest, generated from the pydantic models."""
    schema = Manifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://ride-serve.dev/schemas/manifest-v{FORMAT_VERSION}.json"
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
    names = [c.name for c in manifest.classes]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ManifestError(f"class names must be unique: {repeated} appear more than once")
    known = manifest.known_answers
    rows = {len(known.images), len(known.logits), len(known.router_logits)}
    if len(rows) != 1:
        raise ManifestError("known_answers: images, logits and router_logits must have one entry per image")
    if any(len(row) != len(manifest.classes) for row in known.logits):
        raise ManifestError(f"known_answers: every logits row must have {len(manifest.classes)} values (one per class)")
    if any(len(row) != len(graphs.routers) for row in known.router_logits):
        raise ManifestError(f"known_answers: every router_logits row must have {len(graphs.routers)} values")
    if (manifest.precision == "int8") != (manifest.quantization is not None):
        raise ManifestError("a quantization record is required with precision int8, and allowed only then")
    if manifest.quantization is not None:
        files = sorted(spec.file for spec in manifest.graph_specs())
        if sorted(manifest.quantization.graphs) != files:
            raise ManifestError(f"quantization.graphs must name every graph file exactly once: {files}")
    _check_curve(manifest)


def _check_curve(manifest: Manifest) -> None:
    curve = manifest.operating_curve
    if curve is None:
        return
    if manifest.format_version < 3:
        raise ManifestError("operating_curve needs manifest format 3")
    if not manifest.cascade.has_routers:
        raise ManifestError("operating_curve: a model without routers has one operating point, no curve")
    thresholds = [p.threshold for p in curve.points]
    if any(a >= b for a, b in itertools.pairwise(thresholds)):
        raise ManifestError("operating_curve: points must be ordered by strictly increasing threshold")
    computes = [p.relative_compute for p in curve.points]
    if any(a < b for a, b in itertools.pairwise(computes)):
        raise ManifestError("operating_curve: relative compute cannot grow with the threshold")


def validate_manifest_dict(data: dict, source: str = MANIFEST_NAME) -> Manifest:
    """Validate raw manifest data against the shipped JSON schema and the pydantic model."""
    version = data.get("format_version") if isinstance(data, dict) else None
    if isinstance(version, int) and version < min(READABLE_FORMATS):
        raise ManifestError(
            f"{source} is manifest format {version}; this version reads formats {READABLE_FORMATS}, which add the "
            "known answers that let the server check its graphs: re-export the model with `python -m export`"
        )
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


def digest_of(manifest_bytes: bytes) -> str:
    """The folder digest of a manifest's exact bytes."""
    return hashlib.sha256(manifest_bytes).hexdigest()


def folder_digest(folder: Path) -> str:
    """The model folder's digest: the sha256 of its ``manifest.json`` (``sha256sum manifest.json`` gives the same).

    The manifest holds the sha256 of every graph, which loading checks, and everything else the server uses
    (classes, input recipe, cascade, known answers): pinning it (``RIDE_MODEL_SHA256``) pins the whole model.
    """
    return digest_of(_inside(Path(folder), MANIFEST_NAME).read_bytes())


def _inside(folder: Path, name: str) -> Path:
    """``folder/name``, which must resolve to a file inside ``folder`` (a symlink may not lead out of it)."""
    path = folder / name
    try:
        resolved = path.resolve(strict=True)
    except (FileNotFoundError, RuntimeError):
        raise ManifestError(f"{name} is missing from {folder}") from None
    if not resolved.is_relative_to(folder.resolve()):
        raise ManifestError(f"{name} in {folder} leads outside the model folder (to {resolved}): refused")
    if not resolved.is_file():
        raise ManifestError(f"{name} in {folder} is not a file")
    return resolved


def load_manifest(folder: Path, *, check_hashes: bool = True, expected_digest: str | None = None) -> Manifest:
    """Load and validate a model folder's manifest; with ``check_hashes`` every graph's sha256 is verified, with
    ``expected_digest`` the folder's digest (`folder_digest`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"model folder not found: {folder}")
    if not (folder / MANIFEST_NAME).exists():
        raise ManifestError(f"{folder} has no {MANIFEST_NAME}: is it a model folder written by `python -m export`?")
    path = _inside(folder, MANIFEST_NAME)
    raw = path.read_bytes()  # hashed and parsed from the same bytes
    if expected_digest is not None and digest_of(raw) != expected_digest:
        raise ManifestError(
            f"model folder {folder} has digest {digest_of(raw)}, but {expected_digest} is pinned (RIDE_MODEL_SHA256): "
            "it is not the folder that was verified"
        )
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(f"{folder / MANIFEST_NAME} is not valid JSON: {error}") from None
    manifest = validate_manifest_dict(data, str(folder / MANIFEST_NAME))
    if check_hashes:
        verify_graph_hashes(manifest, folder)
    else:
        for spec in manifest.graph_specs():
            _inside(folder, spec.file)
    return manifest


def verify_graph_hashes(manifest: Manifest, folder: Path) -> None:
    for spec in manifest.graph_specs():
        if not (Path(folder) / spec.file).exists():
            raise ManifestError(f"graph {spec.file} listed in the manifest is missing from {folder}")
        actual = sha256_file(_inside(Path(folder), spec.file))
        if actual != spec.sha256:
            raise ManifestError(
                f"graph {spec.file} has sha256 {actual}, the manifest says {spec.sha256}: "
                "the file was modified or corrupted; re-export the model"
            )


if __name__ == "__main__":
    json.dump(json_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")
