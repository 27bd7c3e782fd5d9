"""Verification of a model folder: schema, hashes, graph rules, and parity with the PyTorch checkpoint.

Parity runs real images through the service's cascade (`cascade.run_cascade`) twice, at the manifest's default
threshold: on the exported graphs (onnxruntime, CPU) and on the PyTorch checkpoint's trunk, experts and routers
(`training.replay`). Both decide with the one rule, so what differs is the graphs alone. It requires, for
float32 graphs:

- every logit (each expert's, each router's alone, the cascade's router logits and its final mean logits) within
  ``atol`` = 1e-4 of PyTorch; feature maps and pooled features, which are unbounded (a few hundred), within 1e-4
  of their largest magnitude;
- identical predictions and identical numbers of experts used, except for rows where a router logit lies within
  ``threshold_band`` = 1e-5 of logit(threshold): there the two runtimes may legitimately decide
  differently (../shared/REFERENCE-RIDE.md trap 13). Those rows are counted and reported, and excluded from the
  logit comparison only when their decisions actually differ. (The band widens to the rule's float64
  resolution of sigmoid at thresholds so close to 0 or 1 that it cannot resolve 1e-5 in logit.)

Float16 graphs are compared with the float32 PyTorch model at looser, measured tolerances (:data:`FP16`): their
weights and arithmetic are rounded to float16, so logits differ by up to a few hundredths and a prediction may
flip where PyTorch's two best classes are nearly tied; those rows are counted too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cascade import CascadeResult, run_cascade
from export.graphs import ExportError, SourceModel, check_graph, load_source, read_graph_io
from export.int8_data import load_splits
from export.known_answers import check_known_answers
from export.manifest import Manifest, ManifestError, load_manifest
from export.ort_model import GraphRuntimeError, OrtModel
from export.parity_gate import GateReport, run_gate
from training.checkpoint import CheckpointMeta, check_same_classes
from training.data import DataError, load_data, normalize
from training.data.cifar import find_cifar_dir
from training.data.folder import decode_images, image_extensions
from training.models import ExpertOutputs
from training.replay import ReplayGraphs

DEFAULT_NUM_IMAGES = 256
VERIFICATION_FILE = "verification.json"


class VerificationError(RuntimeError):
    """The model folder does not match its checkpoint (parity), or cannot be verified against it."""

    def __init__(self, message: str, report: ParityReport | GateReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Tolerances:
    """How close the ONNX graphs must be to PyTorch."""

    atol: float  # max |difference| of logits: experts', routers' and the cascade's final ones
    rtol: float  # max |difference| of feature maps and pooled features, relative to their largest magnitude
    router_rtol: float  # router logits (unbounded) may also differ by this fraction of their largest magnitude
    threshold_band: float  # router logits this close to logit(threshold) may decide differently
    tie_margin: float  # predictions may differ where PyTorch's top-2 logit gap is at most this (0: never)


# Features are unbounded (pooled ReLU maps reach a few hundred), so float32 rounding alone moves them by more than
# 1e-4: they are judged relative to their magnitude. Logits are bounded (cosine scale 30) and judged absolutely.
FP32 = Tolerances(atol=1e-4, rtol=1e-4, router_rtol=0.0, threshold_band=1e-5, tie_margin=0.0)
# Measured on the tiny 3-expert ride_resnet32 checkpoints of the tests (256 CIFAR-10 test images): float16 class
# logits differ by up to ~1e-2, router logits (about 10 to 20 there) by up to ~1.4e-2, features by ~7e-4 of their
# magnitude. The limits leave about 4x headroom; router logits also get a relative allowance (float16 keeps about
# three significant digits), and rows within 2.5e-2 of the threshold's logit may decide differently.
FP16 = Tolerances(atol=5e-2, rtol=5e-3, router_rtol=5e-3, threshold_band=2.5e-2, tie_margin=1e-1)


def tolerances_for(precision: str) -> Tolerances:
    """The parity tolerances for graphs of ``precision`` ("float32" or "float16")."""
    return FP16 if precision == "float16" else FP32


@dataclass
class ParityReport:
    """The outcome of one parity check; ``problems`` is empty when it passed."""

    num_images: int
    precision: str
    threshold: float
    tolerances: Tolerances
    max_abs_diff: dict[str, float]  # per graph output, plus the cascade's final logits and router logits
    limits: dict[str, float]  # the largest difference allowed for each entry of max_abs_diff
    experts_used_histogram: list[int]  # ONNX cascade: rows that used 1, 2, ..., E experts
    near_threshold_rows: int  # rows with a router logit within threshold_band of logit(threshold)
    decision_flips: int  # near-threshold rows whose experts used differ between the runtimes
    near_tie_rows: int  # rows whose prediction differs only because PyTorch's top-2 logits nearly tie (fp16)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        return data

    def summary(self) -> str:
        """A few readable lines: worst differences, exempt rows and any problems."""
        worst = max(self.max_abs_diff.items(), key=lambda item: _ratio(item[1], self.limits[item[0]]))
        lines = [
            f"parity on {self.num_images} images ({self.precision}, threshold {self.threshold:g}): "
            f"{'passed' if self.passed else 'FAILED'}",
            f"  max |logit diff| of the cascade {self.max_abs_diff['cascade.logits']:.3g}; worst graph output "
            f"{worst[0]} {worst[1]:.3g} (limit {self.limits[worst[0]]:.3g})",
            f"  experts used (ONNX cascade): {self.experts_used_histogram}; rows within "
            f"{self.tolerances.threshold_band:g} of the threshold: {self.near_threshold_rows} "
            f"(decisions differing there: {self.decision_flips})",
        ]
        if self.tolerances.tie_margin > 0:
            lines.append(
                f"  predictions differing at a near tie (gap <= {self.tolerances.tie_margin:g}): {self.near_tie_rows}"
            )
        lines += [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines)


def _ratio(diff: float, limit: float) -> float:
    return diff / limit if limit > 0 else (math.inf if diff > 0 else 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------


def _evenly_spaced(total: int, count: int) -> np.ndarray:
    return np.unique(np.linspace(0, total - 1, num=min(count, total)).round().astype(np.int64))


def _image_files(folder: Path, meta: CheckpointMeta) -> list[str]:
    extensions = image_extensions()
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    check_same_classes(meta, found, str(folder))
    files = []
    for name in meta.class_names:
        files += sorted(
            f"{name}/{p.name}" for p in (folder / name).iterdir() if p.is_file() and p.suffix.lower() in extensions
        )
    if not files:
        raise DataError(f"{folder} holds no images")
    return files


def load_verification_images(meta: CheckpointMeta, data_dir: Path | None, count: int) -> np.ndarray:
    """``uint8 [n, 3, S, S]``: ``count`` test images spread evenly over the classes.

    ``data_dir`` (default: the checkpoint's ``data.root``) is a dataset folder with ``test/<class>/*``, a bare
    ``<class>/*`` folder of test images, or a folder with the official CIFAR python batches.
    """
    data_cfg = meta.config.data
    root = data_dir if data_dir is not None else data_cfg.root
    if root is None:
        raise DataError("the checkpoint's config names no dataset folder (data.root): pass --data-dir")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    if data_cfg.dataset != "folder" and find_cifar_dir(root, data_cfg.dataset) is not None:
        data = load_data(data_cfg, root, progress=False)
        check_same_classes(meta, data.class_names, str(root))
        images = data.test.images.numpy()
        return images[_evenly_spaced(len(images), count)]
    folder = root / "test" if (root / "test").is_dir() else root
    files = _image_files(folder, meta)
    picked = [files[i] for i in _evenly_spaced(len(files), count)]
    cache = Path(data_cfg.cache_dir).expanduser() if data_cfg.cache_dir else None
    return decode_images(folder, picked, meta.input.image_size, split="verify", cache_dir=cache)


def normalized(images: np.ndarray, meta: CheckpointMeta) -> torch.Tensor:
    """float32 ``(x / 255 - mean) / std``, the input the trunk graph expects."""
    return normalize(torch.from_numpy(images), meta.input.mean, meta.input.std)


# ----------------------------------------------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------------------------------------------


def _max_abs_diff(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected|; infinity when the shapes or the positions of NaN/inf values differ."""
    if actual.shape != expected.shape:
        return math.inf
    finite_a, finite_e = np.isfinite(actual), np.isfinite(expected)
    if not np.array_equal(finite_a, finite_e):
        return math.inf
    if not finite_a.any():
        return 0.0
    return float(np.abs(actual[finite_a].astype(np.float64) - expected[finite_a].astype(np.float64)).max())


def _magnitude(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size else 0.0


def threshold_logit(threshold: float) -> float:
    """logit(threshold): the router logit at which the decision changes (+-inf at 1 and 0)."""
    if threshold <= 0.0:
        return -math.inf
    if threshold >= 1.0:
        return math.inf
    return math.log(threshold / (1.0 - threshold))


def decision_band(threshold: float, band: float) -> float:
    """``band``, or the logit step that one float64 rounding of sigmoid(logit) makes near ``threshold`` if that is
    wider: the rule decides on float64 probabilities, which very near 0 and 1 cannot resolve a 1e-5 change of
    logit."""
    if not 0.0 < threshold < 1.0:
        return band
    return max(band, 2.0 * float(np.finfo(np.float64).eps) / (threshold * (1.0 - threshold)))


def _near_threshold(router_logits: np.ndarray, threshold: float, band: float) -> np.ndarray:
    """Rows with a (reached, i.e. not NaN) router logit within ``decision_band`` of logit(threshold)."""
    if router_logits.shape[1] == 0:
        return np.zeros(router_logits.shape[0], dtype=bool)
    distance = np.abs(router_logits.astype(np.float64) - threshold_logit(threshold))
    return np.nan_to_num(distance, nan=math.inf).min(axis=1) <= decision_band(threshold, band)


@dataclass
class _Comparison:
    """Differences between the runtimes, each with the largest one allowed."""

    tolerances: Tolerances
    diffs: dict[str, float] = field(default_factory=dict)
    limits: dict[str, float] = field(default_factory=dict)

    def logits(self, name: str, actual: np.ndarray, expected: np.ndarray) -> None:
        self.diffs[name] = _max_abs_diff(actual, expected)
        self.limits[name] = self.tolerances.atol

    def router_logits(self, name: str, actual: np.ndarray, expected: np.ndarray) -> None:
        self.diffs[name] = _max_abs_diff(actual, expected)
        self.limits[name] = max(self.tolerances.atol, self.tolerances.router_rtol * _magnitude(expected))

    def features(self, name: str, actual: np.ndarray, expected: np.ndarray) -> None:
        self.diffs[name] = _max_abs_diff(actual, expected)
        self.limits[name] = max(self.tolerances.atol, self.tolerances.rtol * _magnitude(expected))

    def problems(self) -> list[str]:
        return [
            f"{name} differs from PyTorch by {value:.3g} (limit {self.limits[name]:.3g})"
            for name, value in self.diffs.items()
            if not value <= self.limits[name]  # also catches NaN and inf
        ]


@torch.no_grad()
def check_parity(
    onnx_model: OrtModel,
    source: SourceModel,
    images: torch.Tensor,
    *,
    threshold: float,
    tolerances: Tolerances,
    precision: str = "float32",
) -> ParityReport:
    """Compare every graph and the whole cascade with PyTorch on normalised ``images`` ``[n, 3, S, S]``."""
    model, routers = source.model, source.routers
    compare = _Comparison(tolerances)
    shared = model.trunk(images)
    outputs = [expert(shared) for expert in model.experts]
    expected = ExpertOutputs(torch.stack([o[0] for o in outputs], 1), torch.stack([o[1] for o in outputs], 1))
    got = onnx_model.all_experts(images.numpy())
    compare.features("trunk", got.shared, shared.numpy())
    for k in range(model.num_experts):
        compare.logits(f"expert_{k + 1}.logits", got.logits[:, k], expected.logits[:, k].numpy())
        compare.features(f"expert_{k + 1}.feature", got.features[:, k], expected.features[:, k].numpy())
    used_routers = routers if onnx_model.has_routers else None
    if used_routers is not None:
        # Each router on PyTorch's own inputs (all rows), so that its error is measured alone.
        running = torch.zeros_like(expected.logits[:, 0])
        for k in range(1, model.num_experts):
            running = running + expected.logits[:, k - 1]
            mean, feature = running / k, expected.features[:, k - 1]
            want = used_routers(k, mean, feature).numpy()
            compare.router_logits(f"router_{k}", onnx_model.router(k, mean.numpy(), feature.numpy()), want)
    reference = ReplayGraphs(expected, used_routers, onnx_model.cost).replay(threshold=threshold)
    run = run_cascade(onnx_model, images.numpy(), thresholds=threshold, max_experts=onnx_model.num_experts)
    return judge_cascade(
        run, reference, threshold=threshold, tolerances=tolerances, precision=precision, graphs=compare
    )


def judge_cascade(
    run: CascadeResult,
    reference: CascadeResult,
    *,
    threshold: float,
    tolerances: Tolerances,
    precision: str = "float32",
    graphs: _Comparison | None = None,
) -> ParityReport:
    """Judge the cascade on the ONNX graphs (``run``) against the cascade on PyTorch (``reference``): final logits,
    experts used and router logits, adding the per-graph differences already measured in ``graphs``."""
    compare = graphs if graphs is not None else _Comparison(tolerances)
    tol = tolerances
    ref_logits, ref_used, ref_router = reference.logits, reference.experts_used, reference.router_logits
    near = _near_threshold(ref_router, threshold, tol.threshold_band) | _near_threshold(
        run.router_logits, threshold, tol.threshold_band
    )
    same = run.experts_used == ref_used
    # Router logits where both runtimes reached the router; final logits where both used the same experts.
    both = ~np.isnan(run.router_logits) & ~np.isnan(ref_router)
    compare.router_logits("cascade.router_logits", run.router_logits[both], ref_router[both])
    compare.logits("cascade.logits", run.logits[same], ref_logits[same])
    problems = compare.problems()
    stray = np.flatnonzero(~same & ~near)
    if stray.size:
        problems.append(
            f"{stray.size} rows used a different number of experts with every router logit away from the "
            f"threshold (rows {stray[:5].tolist()}: ONNX {run.experts_used[stray[:5]].tolist()}, "
            f"PyTorch {ref_used[stray[:5]].tolist()})"
        )
    top2 = np.sort(ref_logits, axis=1)[:, -2:]
    near_tie = (top2[:, -1] - top2[:, 0] <= tol.tie_margin) if tol.tie_margin > 0 else np.zeros_like(same)
    differ = same & (run.logits.argmax(axis=1) != ref_logits.argmax(axis=1))
    if (differ & ~near_tie).any():
        problems.append(f"{int((differ & ~near_tie).sum())} rows predict a different class than PyTorch")
    num_experts = run.router_logits.shape[1] + 1
    return ParityReport(
        num_images=len(ref_used),
        precision=precision,
        threshold=threshold,
        tolerances=tol,
        max_abs_diff=compare.diffs,
        limits=compare.limits,
        experts_used_histogram=np.bincount(run.experts_used, minlength=num_experts + 1)[1:].tolist(),
        near_threshold_rows=int(near.sum()),
        decision_flips=int((~same & near).sum()),
        near_tie_rows=int((differ & near_tie).sum()),
        problems=problems,
    )


# ----------------------------------------------------------------------------------------------------------------
# The model folder against its checkpoint
# ----------------------------------------------------------------------------------------------------------------


def check_graph_files(folder: Path, manifest: Manifest) -> None:
    """Every graph obeys the format rules and has exactly the inputs and outputs the manifest lists."""
    for spec in manifest.graph_specs():
        path = Path(folder) / spec.file
        try:
            check_graph(
                path, [t.name for t in spec.inputs], [t.name for t in spec.outputs], opset=manifest.exported_with.opset
            )
        except ExportError as error:
            raise ManifestError(str(error)) from None
        io = read_graph_io(path)
        if io.inputs != spec.inputs or io.outputs != spec.outputs:
            raise ManifestError(f"{spec.file}: its inputs/outputs differ from the manifest's description")


def check_source_matches(manifest: Manifest, source: SourceModel) -> None:
    """The checkpoint is the one the folder was exported from (same weights, classes and experts)."""
    if source.weights_sha256 != manifest.source_checkpoint.sha256:
        raise VerificationError(
            f"checkpoint {source.folder} has weights sha256 {source.weights_sha256[:12]}..., but the model folder "
            f"was exported from {manifest.source_checkpoint.sha256[:12]}... ({manifest.source_checkpoint.path})"
        )
    if [c.name for c in manifest.classes] != source.meta.class_names:
        raise VerificationError("the manifest's classes differ from the checkpoint's")
    if manifest.cascade.num_experts != source.model.num_experts:
        raise VerificationError("the manifest's number of experts differs from the checkpoint's")
    if manifest.cascade.has_routers and source.routers is None:
        raise VerificationError(f"the model folder has routers but checkpoint {source.folder} has none")


def verify_parity(
    folder: Path, manifest: Manifest, source: SourceModel, images: np.ndarray, *, provider: str = "cpu"
) -> ParityReport:
    """Parity of the graphs in ``folder`` (run on ``provider``) with ``source`` on real test images
    (``uint8 [n, 3, S, S]``, from `load_verification_images`)."""
    try:
        return check_parity(
            OrtModel(folder, manifest.graphs, provider),
            source,
            normalized(images, source.meta),
            threshold=manifest.cascade.default_threshold,
            tolerances=tolerances_for(manifest.precision),
            precision=manifest.precision,
        )
    except GraphRuntimeError as error:
        raise VerificationError(str(error)) from None


def verify_model_folder(
    folder: Path,
    *,
    checkpoint: Path | None = None,
    data_dir: Path | None = None,
    num_images: int = DEFAULT_NUM_IMAGES,
    provider: str = "cpu",
) -> ParityReport | GateReport:
    """Re-check a model folder: schema, graph hashes, graph rules, known answers, then parity with its checkpoint.

    ``checkpoint`` defaults to the path recorded in the manifest; ``provider`` "cuda" runs the graphs on the CUDA
    provider with the service's options (TF32 off), at the same tolerances. An int8 folder is judged by its parity
    gate instead, against the checkpoint's float32 cascade on the validation split, with the bound its manifest
    records. Raises ManifestError (schema, hash, graph rules, known answers), CheckpointError / DataError (inputs)
    or VerificationError (parity or gate, wrong checkpoint, a provider that cannot run here).
    """
    folder = Path(folder)
    manifest = load_manifest(folder, check_hashes=True)
    check_graph_files(folder, manifest)
    try:
        check_known_answers(OrtModel(folder, manifest.graphs, provider), manifest)
    except GraphRuntimeError as error:
        raise VerificationError(str(error)) from None
    source = load_source(Path(checkpoint) if checkpoint is not None else Path(manifest.source_checkpoint.path))
    check_source_matches(manifest, source)
    if manifest.quantization is not None:
        gate = verify_int8_gate(folder, manifest, source, data_dir=data_dir, provider=provider)
        if not gate.passed:
            raise VerificationError(f"{folder} fails its int8 parity gate:\n{gate.summary()}", gate)
        return gate
    images = load_verification_images(source.meta, data_dir, num_images)
    report = verify_parity(folder, manifest, source, images, provider=provider)
    if not report.passed:
        raise VerificationError(f"{folder} does not match its checkpoint:\n{report.summary()}", report)
    return report


@torch.no_grad()
def verify_int8_gate(
    folder: Path, manifest: Manifest, source: SourceModel, *, data_dir: Path | None, provider: str = "cpu"
) -> GateReport:
    """The int8 graphs in ``folder`` against the PyTorch checkpoint's cascade on the run's validation split."""
    assert manifest.quantization is not None
    meta = source.meta
    splits = load_splits(meta.config.data, data_dir, class_names=meta.class_names, class_counts=meta.class_counts)
    assert splits.val is not None  # load_splits refuses a run without one
    images = normalized(splits.val.images.numpy(), meta)
    reference = ReplayGraphs(source.model(images), source.routers, manifest.cost_model())
    try:
        return run_gate(
            reference,
            OrtModel(folder, manifest.graphs, provider),
            np.arange(len(images)),
            images.numpy(),
            splits.val.labels.numpy(),
            threshold=manifest.cascade.default_threshold,
            max_accuracy_drop_points=manifest.quantization.parity_gate.max_accuracy_drop_points,
        )
    except GraphRuntimeError as error:
        raise VerificationError(str(error)) from None
