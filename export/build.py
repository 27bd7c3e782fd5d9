"""The whole export: checkpoint -> graphs -> manifest -> verification -> model folder, all or nothing.

Everything is written into a temporary folder next to ``out`` and renamed into place only after the folder has
passed the same checks the service and ``python -m export verify`` apply (schema, hashes, graph rules) and the
parity check with PyTorch. Any failure, interruption included, removes the temporary folder: a model folder is
either complete and verified or absent. ``force`` replaces an existing model folder the same way (the old one is
renamed away, the new one renamed in, then the old one deleted).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from pydantic import ValidationError

from export.graphs import (
    DEFAULT_OPSET,
    ExportError,
    GraphJob,
    SourceModel,
    check_graph,
    check_opset,
    convert_to_float16,
    export_graph,
    load_source,
    macs_per_image,
    plan_graphs,
    read_graph_io,
)
from export.int8 import build_int8_folder
from export.int8_data import int8_images, load_splits
from export.known_answers import pick_images, record_known_answers
from export.manifest import (
    MANIFEST_NAME,
    Cascade,
    ClassInfo,
    EvalMetrics,
    Graphs,
    GraphSpec,
    InputSpec,
    KnownAnswers,
    Manifest,
    ModelId,
    SourceCheckpoint,
    ToolVersions,
    folder_digest,
    load_manifest,
    sha256_file,
    write_manifest,
)
from export.operating_curve import measure_curve, with_curve
from export.ort_model import GraphRuntimeError, OrtModel
from export.parity_gate import DEFAULT_MAX_ACCURACY_DROP, GateReport
from export.quantize import DEFAULT_CALIBRATION_IMAGES
from export.verify import (
    DEFAULT_NUM_IMAGES,
    VERIFICATION_FILE,
    ParityReport,
    VerificationError,
    check_graph_files,
    load_verification_images,
    verify_parity,
)
from training.config import DataConfig
from training.data import DataError, normalize, preprocess
from training.metrics import CheckpointMetrics

Log = Callable[[str], None]
FOLDER_MODE = 0o755


@dataclass
class ExportResult:
    """A finished export: where it is, its manifest, the parity report its float32 graphs passed against PyTorch
    (None when quantized from a model folder) and, for int8, the parity gate it passed."""

    folder: Path
    manifest: Manifest
    report: ParityReport | None
    gate: GateReport | None = None


def _quiet(_: str) -> None:
    pass


def export_checkpoint(
    checkpoint: Path,
    out: Path,
    *,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    int8: bool = False,
    force: bool = False,
    data_dir: Path | None = None,
    name: str | None = None,
    version: str | None = None,
    num_images: int = DEFAULT_NUM_IMAGES,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    max_accuracy_drop_points: float = DEFAULT_MAX_ACCURACY_DROP,
    log: Log = _quiet,
) -> ExportResult:
    """Export ``checkpoint`` into the model folder ``out`` and verify it; see the module docstring.

    With ``int8`` the float32 graphs are exported and verified first, then quantized, calibrated on
    ``calibration_images`` training images, and gated on the validation split (`export.int8`).

    Raises ExportError (bad request, exporter failure, existing ``out`` without ``force``), CheckpointError,
    DataError, ManifestError or VerificationError; in every case nothing is left behind.
    """
    opset = check_opset(opset)
    if fp16 and int8:
        raise ExportError("--fp16 and --int8 exclude each other: choose one precision")
    out = Path(out)
    _check_target(out, force)
    model_id = _model_id(name or out.name, version)
    source = load_source(Path(checkpoint))
    if not version:
        model_id = model_id.model_copy(update={"version": _default_version(source)})
    int8_inputs = None
    if int8:  # read and checked before minutes of export, so that a data problem fails fast
        meta = source.meta
        splits = load_splits(meta.config.data, data_dir, class_names=meta.class_names, class_counts=meta.class_counts)
        int8_inputs = int8_images(
            splits, calibration_images=calibration_images, mean=meta.input.mean, std=meta.input.std
        )
    images = load_verification_images(source.meta, data_dir, num_images)
    validation = _validation_split(source, data_dir, log) if int8_inputs is None else int8_inputs.validation_split
    with _staging(out) as tmp:
        manifest = _write_folder(source, tmp, images, model_id=model_id, opset=opset, fp16=fp16, log=log)
        log(f"verifying against PyTorch on {len(images)} test images")
        report = verify_parity(tmp, manifest, source, images)
        log(report.summary())
        if not report.passed:
            raise VerificationError(f"the exported graphs do not match the checkpoint:\n{report.summary()}", report)
        record = _write_verification(tmp, report, data_dir)
        manifest = add_operating_curve(tmp, manifest, validation, log)
        if int8_inputs is None:
            _install(tmp, out, force)
            log(f"wrote {out} (folder digest, for RIDE_MODEL_SHA256: {folder_digest(out)})")
            return ExportResult(out, manifest, report)
        with _staging(out) as tmp8:
            # The float32 stage keeps the plain version: it is what `quantization.quantized_from` names.
            int8_id = model_id if version else model_id.model_copy(update={"version": f"{model_id.version}-int8"})
            manifest, gate = build_int8_folder(
                tmp,
                manifest,
                tmp8,
                int8_inputs,
                model_id=int8_id,
                max_accuracy_drop_points=max_accuracy_drop_points,
                float32_record=record,
                log=log,
            )
            _install(tmp8, out, force)
    log(f"wrote {out} (folder digest, for RIDE_MODEL_SHA256: {folder_digest(out)})")
    return ExportResult(out, manifest, report, gate)


def quantize_model(
    folder: Path,
    out: Path,
    data_cfg: DataConfig,
    *,
    data_dir: Path | None = None,
    force: bool = False,
    name: str | None = None,
    version: str | None = None,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    max_accuracy_drop_points: float = DEFAULT_MAX_ACCURACY_DROP,
    log: Log = _quiet,
) -> ExportResult:
    """Quantize the verified float32 model folder ``folder`` into the int8 model folder ``out``.

    For a model whose checkpoint is no longer at hand: ``data_cfg`` is the training run's data config, from which
    the training split (calibration) and the validation split (the gate) are rebuilt and checked against the
    manifest's classes and training counts. Raises as :func:`export_checkpoint`; nothing is left behind.
    """
    folder, out = Path(folder), Path(out)
    _check_target(out, force)
    manifest = load_manifest(folder, check_hashes=True)
    if manifest.precision != "float32":
        raise ExportError(f"only float32 models can be quantized; {folder} is {manifest.precision}")
    check_graph_files(folder, manifest)
    model_id = _model_id(name or out.name, version or f"{manifest.model.version}-int8")
    classes = manifest.classes
    splits = load_splits(
        data_cfg, data_dir, class_names=[c.name for c in classes], class_counts=[c.train_count for c in classes]
    )
    spec = manifest.input
    images = int8_images(splits, calibration_images=calibration_images, mean=spec.mean, std=spec.std)
    record_path = folder / VERIFICATION_FILE
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    with _staging(out) as tmp:
        manifest, gate = build_int8_folder(
            folder,
            manifest,
            tmp,
            images,
            model_id=model_id,
            max_accuracy_drop_points=max_accuracy_drop_points,
            float32_record=record,
            log=log,
        )
        _install(tmp, out, force)
    log(f"wrote {out} (folder digest, for RIDE_MODEL_SHA256: {folder_digest(out)})")
    return ExportResult(out, manifest, None, gate)


def add_curve_to_folder(folder: Path, data_cfg: DataConfig, *, data_dir: Path | None = None, log: Log = _quiet) -> Path:
    """Measure the validation curve of the model folder ``folder`` and rewrite its manifest in the current format
    with it; graphs, known answers and everything else stay as they are (so do the answers it serves).

    For a folder exported before manifest format 3 whose checkpoint is not at hand: ``data_cfg`` is the training
    run's data config, from which the validation split is rebuilt and checked against the manifest's classes and
    training counts. The new manifest is checked as the service loads it before it replaces the old one.
    """
    folder = Path(folder)
    manifest = load_manifest(folder, check_hashes=True)
    if not manifest.cascade.has_routers:
        raise ExportError(f"{folder} has no routers: a single operating point (every expert), no curve to measure")
    classes = manifest.classes
    data = load_splits(
        data_cfg, data_dir, class_names=[c.name for c in classes], class_counts=[c.train_count for c in classes]
    )
    assert data.val is not None  # load_splits refuses data without a validation split
    images = normalize(data.val.images, manifest.input.mean, manifest.input.std).numpy()
    curve = measure_curve(folder, manifest, images, data.val.labels.numpy())
    with _staging(folder / "curve") as tmp:
        write_manifest(with_curve(manifest, curve), tmp)
        for spec in manifest.graph_specs():  # hard links: the graphs checked with the new manifest are these files
            os.link(folder / spec.file, tmp / spec.file)
        load_manifest(tmp, check_hashes=True)
        os.replace(tmp / MANIFEST_NAME, folder / MANIFEST_NAME)
    log(f"operating curve: {len(curve.points)} thresholds on {len(data.val)} validation images")
    log(f"wrote {folder / MANIFEST_NAME} (format 3; folder digest, for RIDE_MODEL_SHA256: {folder_digest(folder)})")
    return folder


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A fresh private folder next to ``out``, removed on the way out unless it was renamed into place (and the
    parent of ``out`` too, if this created it and it is still empty after a failure)."""
    new_parent = not out.parent.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        os.chmod(tmp, FOLDER_MODE)  # mkdtemp makes it private; the service may run as another user
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if new_parent:
            with contextlib.suppress(OSError):  # only if still empty
                out.parent.rmdir()
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # still there only when it was a float32 stage of an int8 export


def _validation_split(source: SourceModel, data_dir: Path | None, log: Log) -> tuple[np.ndarray, np.ndarray] | None:
    """The training run's validation split (normalised images, labels), rebuilt from its data config with
    ``data_dir`` as the root, else with the config's own root; None (logged) when the run has no validation split
    or neither root holds the run's data, or the model has no routers (no curve to measure)."""
    if source.routers is None:
        return None
    meta = source.meta
    problems = []
    for root in dict.fromkeys([data_dir, None]):
        try:
            data = load_splits(meta.config.data, root, class_names=meta.class_names, class_counts=meta.class_counts)
        except (DataError, OSError) as error:
            problems.append(f"{root or 'data.root'}: {error}")
            continue
        assert data.val is not None
        return normalize(data.val.images, meta.input.mean, meta.input.std).numpy(), data.val.labels.numpy()
    log(f"no operating curve in the manifest: the run's validation split cannot be rebuilt ({'; '.join(problems)})")
    return None


def add_operating_curve(
    folder: Path, manifest: Manifest, validation: tuple[np.ndarray, np.ndarray] | None, log: Log
) -> Manifest:
    """Measure the graphs' validation curve (`export.operating_curve`) and rewrite ``folder``'s manifest with it."""
    if validation is None or not manifest.cascade.has_routers:
        return manifest
    images, labels = validation
    curve = measure_curve(folder, manifest, images, labels)
    log(f"operating curve: {len(curve.points)} thresholds on {len(labels)} validation images")
    write_manifest(with_curve(manifest, curve), folder)
    return load_manifest(folder, check_hashes=True)


def _check_target(out: Path, force: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise ExportError(f"{out} already exists; pass --force to replace it (nothing was changed)")
    if out.is_symlink() or not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder; not replacing it even with --force")
    if any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        # --force replaces a model folder, never an arbitrary folder (think --out models by mistake).
        raise ExportError(f"{out} is not a model folder (no {MANIFEST_NAME}); not replacing it even with --force")


def _model_id(name: str, version: str | None) -> ModelId:
    try:
        return ModelId(name=name, version=version or "unversioned")
    except ValidationError:
        raise ExportError(
            f"model name {name!r} is not allowed: use letters, digits, '.', '_' and '-', starting with a letter "
            "or digit (pass --name)"
        ) from None


def _default_version(source: SourceModel) -> str:
    return f"{source.meta.stage}-e{source.meta.epoch}-{source.weights_sha256[:8]}"


def _write_folder(
    source: SourceModel, folder: Path, images: np.ndarray, *, model_id: ModelId, opset: int, fp16: bool, log: Log
) -> Manifest:
    """Export every graph into ``folder``, record their known answers on a few of ``images`` (the verification
    images, ``uint8``), write the manifest, and re-read it as the service will."""
    specs = [_export_job(job, folder, opset=opset, fp16=fp16, log=log) for job in plan_graphs(source)]
    graphs = _graphs(specs, source.meta.model.num_experts)
    spec = input_spec(source, fp16=fp16)
    try:
        known = record_known_answers(OrtModel(folder, graphs), pick_images(images), spec)
    except GraphRuntimeError as error:
        raise ExportError(str(error)) from None
    try:
        manifest = build_manifest(source, graphs, spec, known, model_id=model_id, opset=opset, fp16=fp16)
    except ValidationError as error:  # e.g. a class name with markup: the manifest refuses it
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise ExportError(f"the checkpoint cannot be exported: {where}: {problem['msg']}") from None
    write_manifest(manifest, folder)
    # Read back exactly as the service will (schema + hashes); each graph was checked as it was written.
    return load_manifest(folder, check_hashes=True)


def _graphs(specs: list[GraphSpec], num_experts: int) -> Graphs:
    """``specs`` (trunk, experts, routers in order) as the manifest's graphs."""
    return Graphs(trunk=specs[0], experts=specs[1 : 1 + num_experts], routers=specs[1 + num_experts :])


def input_spec(source: SourceModel, *, fp16: bool) -> InputSpec:
    """The input recipe of ``source``: the training preprocessing, at the graphs' precision."""
    meta = source.meta
    return InputSpec(
        height=meta.input.image_size,
        width=meta.input.image_size,
        dtype="float16" if fp16 else "float32",
        resize=preprocess.RESIZE,
        crop=preprocess.CROP,
        scale=preprocess.PIXEL_SCALE,
        mean=meta.input.mean,
        std=meta.input.std,
    )


def _export_job(job: GraphJob, folder: Path, *, opset: int, fp16: bool, log: Log) -> GraphSpec:
    started = time.perf_counter()
    path = folder / job.file
    export_graph(job.module, job.example_inputs, job.input_names, job.output_names, path, opset=opset)
    if fp16:
        convert_to_float16(path)
        check_graph(path, job.input_names, job.output_names, opset=opset)
    io = read_graph_io(path)
    macs = macs_per_image(job)
    log(f"exported {job.file} ({macs:,} MACs/image, {time.perf_counter() - started:.1f} s)")
    return GraphSpec(file=job.file, sha256=sha256_file(path), inputs=io.inputs, outputs=io.outputs, macs_per_image=macs)


def build_manifest(
    source: SourceModel,
    graphs: Graphs,
    spec: InputSpec,
    known_answers: KnownAnswers,
    *,
    model_id: ModelId,
    opset: int,
    fp16: bool,
) -> Manifest:
    """The manifest of an export of ``source`` whose graphs are ``graphs``, input recipe ``spec``."""
    meta = source.meta
    num_experts = meta.model.num_experts
    precision = "float16" if fp16 else "float32"
    return Manifest(
        model=model_id,
        source_checkpoint=SourceCheckpoint(path=str(source.folder.resolve()), sha256=source.weights_sha256),
        precision=precision,
        classes=[
            ClassInfo(id=i, name=name, train_count=count, group=group)
            for i, (name, count, group) in enumerate(
                zip(meta.class_names, meta.class_counts, meta.class_groups, strict=True)
            )
        ],
        input=spec,
        graphs=graphs,
        cascade=Cascade(
            num_experts=num_experts,
            has_routers=source.routers is not None,
            default_threshold=source.threshold,
            top_z=meta.routers.top_z if source.routers is not None else None,
            all_experts_without_routers=source.routers is None,
        ),
        metrics=eval_metrics(meta.metrics, meta.config.data.dataset),
        exported_with=ToolVersions(
            ride_serve=ride_serve_version(),
            python=platform.python_version(),
            torch=torch.__version__,
            onnx=onnx.__version__,
            onnxruntime=onnxruntime.__version__,
            opset=opset,
        ),
        known_answers=known_answers,
    )


def eval_metrics(metrics: CheckpointMetrics | None, dataset: str) -> EvalMetrics:
    """The headline numbers of the checkpoint's own evaluation (all None when it was never evaluated)."""
    if metrics is None:
        return EvalMetrics()
    routed = metrics.routed
    return EvalMetrics(
        dataset=dataset,
        all_experts_accuracy=metrics.all_experts.top1,
        routed_accuracy=routed.top1 if routed is not None else None,
        mean_experts_used=routed.mean_experts_used if routed is not None else None,
        relative_compute=routed.relative_compute if routed is not None else None,
    )


def ride_serve_version() -> str:
    """The installed package's version, else the source tree's pyproject version."""
    try:
        return metadata.version("ride-serve")
    except metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"] + "+source"
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def _write_verification(folder: Path, report: ParityReport, data_dir: Path | None) -> dict:
    record = {
        "verified_at": datetime.now(UTC).isoformat(),
        "data_dir": str(data_dir) if data_dir is not None else "checkpoint's data.root",
        **report.to_dict(),
    }
    (folder / VERIFICATION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _install(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished ``tmp`` onto ``out``; with ``force`` swap out an existing model folder."""
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return
    _check_target(out, force)  # it appeared while exporting: apply the same rules again
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / out.name)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old / out.name, out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
