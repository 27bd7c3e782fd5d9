"""Stage 2's settings, resolved once before any weight or image is loaded: the stage-1 sidecar, the config, the
output folder and how the threshold will be chosen.

The threshold is chosen on a validation split carved from the training data (``data.val_per_class``): when the
stage-1 run held none out, ``route`` carves ``DEFAULT_VAL_PER_CLASS`` per class. Those images were in stage 1's
training set (the experts are over-confident on them, so validation under-estimates the compute the test set
needs); the routers never see them. For honest thresholds train stage 1 with ``data.val_per_class`` > 0 and keep
the same value here.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cascade import check_threshold
from training.checkpoint import CheckpointMeta, load_meta
from training.config import ConfigError, TrainConfig, apply_overrides, config_from_dict, load_config
from training.metrics import ValidationRecord
from training.threshold import check_target_compute

DEFAULT_VAL_PER_CLASS = 20


@dataclass(frozen=True)
class RoutePlan:
    """What stage 2 will do; built by :func:`plan_route`."""

    checkpoint: Path
    meta: CheckpointMeta  # the stage-1 sidecar
    cfg: TrainConfig  # the stored (or given) config with the overrides, a validation split and --threshold
    out: Path
    threshold: float | None  # --threshold, when given
    target_compute: float | None  # --target-compute, when given
    validation: ValidationRecord


def plan_route(
    checkpoint: Path,
    *,
    config_path: Path | None = None,
    overrides: Sequence[str] = (),
    out: Path | None = None,
    threshold: float | None = None,
    target_compute: float | None = None,
) -> RoutePlan:
    """Check the request and resolve stage 2's config once (see :func:`resolve_route_config`).

    Raises ConfigError for a bad request or a checkpoint that cannot be routed, CheckpointError for a missing one.
    """
    checkpoint = Path(checkpoint)
    _check_choice(threshold, target_compute)
    meta = load_meta(checkpoint)
    _check_routable(meta, checkpoint)
    cfg = resolve_route_config(meta, config_path, overrides)
    if threshold is not None:
        cfg = cfg.model_copy(update={"router": cfg.router.model_copy(update={"threshold": threshold})})
    out = Path(out) if out is not None else checkpoint.parent / f"{checkpoint.name}-routers"
    if out.resolve() == checkpoint.resolve():
        raise ConfigError("--out must be a new folder: stage 2 never overwrites the stage-1 checkpoint")
    return RoutePlan(checkpoint, meta, cfg, out, threshold, target_compute, _validation_record(meta, cfg))


def resolve_route_config(
    meta: CheckpointMeta, config_path: Path | None = None, overrides: Sequence[str] = ()
) -> TrainConfig:
    """The stage-2 config: the checkpoint's stored config (or ``config_path``) with ``--set`` overrides.

    The model section must describe the checkpoint, and a validation split is always carved: stage 1's
    ``data.val_per_class``, or ``DEFAULT_VAL_PER_CLASS`` when it held none out.
    """
    if config_path is not None:
        cfg = load_config(config_path, overrides)
    else:
        cfg = config_from_dict(apply_overrides(meta.config.model_dump(mode="json"), list(overrides)), "checkpoint")
    if cfg.model != meta.model:
        raise ConfigError(
            "the config's model section differs from the checkpoint's "
            f"(config: {cfg.model.model_dump()}, checkpoint: {meta.model.model_dump()}); stage 2 keeps the stage-1 "
            "architecture, so leave [model] as trained"
        )
    if cfg.data.val_per_class > 0:
        return cfg
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"val_per_class": DEFAULT_VAL_PER_CLASS})})


def _check_choice(threshold: float | None, target_compute: float | None) -> None:
    if threshold is not None and target_compute is not None:
        raise ConfigError("give either --threshold or --target-compute, not both")
    if threshold is not None:
        try:
            check_threshold(threshold, "--threshold")
        except ValueError as error:
            raise ConfigError(str(error)) from None
    if target_compute is not None:
        check_target_compute(target_compute)


def _check_routable(meta: CheckpointMeta, checkpoint: Path) -> None:
    if meta.model.num_experts < 2:
        raise ConfigError(
            f"{checkpoint} has one expert: routers decide whether to run the next expert, so there is nothing to "
            "route; train stage 1 with model.num_experts >= 2"
        )
    if meta.stage == "routers":
        raise ConfigError(
            f"{checkpoint} already has routers; train new ones from its stage-1 checkpoint (sha256 {meta.parent})"
        )
    if not meta.complete:
        raise ConfigError(f"{checkpoint} is an unfinished run (epoch {meta.epoch} of {meta.epochs}); finish it first")


def _validation_record(meta: CheckpointMeta, cfg: TrainConfig) -> ValidationRecord:
    held_out = 0 < cfg.data.val_per_class <= meta.config.data.val_per_class
    if not held_out:
        warnings.warn(
            f"the validation split ({cfg.data.val_per_class} per class) was part of stage 1's training set "
            f"(stage 1 used data.val_per_class = {meta.config.data.val_per_class}): thresholds chosen on it are "
            "optimistic; for honest thresholds train stage 1 with data.val_per_class > 0",
            stacklevel=4,
        )
    return ValidationRecord(split="val", per_class=cfg.data.val_per_class, held_out_from_stage1=held_out)
