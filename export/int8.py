"""A float32 model folder -> its int8 model folder: quantize (`export.quantize`), gate (`export.parity_gate`),
then the manifest and verification record. Used by ``python -m export --int8`` (after the float32 graphs have
passed parity with PyTorch) and by ``python -m export quantize`` (from a verified float32 folder).

The caller owns the staging folder: nothing here renames into place, and on a refused gate the caller removes
what was written.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime

from export.int8_data import CALIBRATION_SELECTION, Int8Images
from export.known_answers import decode_png, record_known_answers
from export.manifest import (
    Calibration,
    Manifest,
    ModelId,
    Quantization,
    load_manifest,
    sha256_file,
    write_manifest,
)
from export.operating_curve import measure_curve, with_curve
from export.ort_model import OrtModel
from export.parity_gate import GateReport, run_gate
from export.quantize import BODY_OP_TYPES, REDUCE_RANGE, quantize_folder
from export.verify import VERIFICATION_FILE, VerificationError, check_graph_files

Log = Callable[[str], None]


def _with_graph_hashes(manifest: Manifest, folder: Path) -> Manifest:
    """``manifest`` describing the graph files now in ``folder`` (same names and tensors, new hashes)."""
    graphs = manifest.graphs

    def rehash(spec):
        return spec.model_copy(update={"sha256": sha256_file(folder / spec.file)})

    return manifest.model_copy(
        update={
            "graphs": graphs.model_copy(
                update={
                    "trunk": rehash(graphs.trunk),
                    "experts": [rehash(g) for g in graphs.experts],
                    "routers": [rehash(g) for g in graphs.routers],
                }
            )
        }
    )


def build_int8_folder(
    source: Path,
    manifest: Manifest,
    target: Path,
    images: Int8Images,
    *,
    model_id: ModelId,
    max_accuracy_drop_points: float,
    float32_record: dict | None,
    log: Log,
) -> tuple[Manifest, GateReport]:
    """Write the int8 version of the float32 folder ``source`` (described by ``manifest``) into ``target``.

    Raises:
        VerificationError: the parity gate refused it (``target`` then holds graphs but no manifest).
        ManifestError: a quantized graph breaks a rule of the model-folder format.
    """
    threshold = manifest.cascade.default_threshold
    log(f"quantizing with {len(images.calibration)} training images for calibration")
    quantized = quantize_folder(source, manifest, target, images.calibration, threshold=threshold)
    kept = [spec.file for spec in manifest.graphs.routers if quantized.precision[spec.file] == "float32"]
    if kept:
        log(f"routers kept in float32 (int8 moved exit decisions on calibration rows): {', '.join(kept)}")
    candidate = _with_graph_hashes(manifest, target)
    check_graph_files(target, candidate)
    int8_graphs = OrtModel(target, candidate.graphs)
    gate = run_gate(
        OrtModel(source, manifest.graphs),
        int8_graphs,
        images.validation,
        images.validation,
        images.validation_labels,
        threshold=threshold,
        max_accuracy_drop_points=max_accuracy_drop_points,
    )
    log(gate.summary())
    if not gate.passed:
        raise VerificationError(f"the int8 model was refused by its parity gate:\n{gate.summary()}", gate)
    quantization = Quantization(
        quantized_from=manifest.model,
        op_types=list(BODY_OP_TYPES),
        reduce_range=REDUCE_RANGE,
        graphs=quantized.precision,
        router_decisions_moved=quantized.router_decisions_moved,
        calibration=Calibration(num_images=len(images.calibration), selection=CALIBRATION_SELECTION),
        parity_gate=gate.to_manifest(),
        onnxruntime=onnxruntime.__version__,
    )
    # The float32 model's known-answer images, answered by the int8 graphs: what the server checks at start-up.
    pixels = np.stack([decode_png(text, manifest.input) for text in manifest.known_answers.images])
    known = record_known_answers(int8_graphs, pixels, manifest.input)
    # The int8 graphs' own curve: their exits and accuracy differ a little from the float32 ones.
    curve = measure_curve(target, candidate, images.validation, images.validation_labels)
    points = len(curve.points) if curve is not None else 0
    log(f"operating curve: {points} thresholds on {len(images.validation)} validation images")
    final = with_curve(candidate, curve).model_copy(
        update={"model": model_id, "precision": "int8", "quantization": quantization, "known_answers": known}
    )
    write_manifest(final, target)
    record = {
        "verified_at": datetime.now(UTC).isoformat(),
        "precision": "int8",
        "int8_parity_gate": gate.to_dict(),
        "float32": float32_record,
    }
    (target / VERIFICATION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return load_manifest(target, check_hashes=True), gate
