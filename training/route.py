"""Stage 2: train the expert-assignment routers of a stage-1 checkpoint (../shared/REFERENCE-RIDE.md 3).

``python -m training.run route --checkpoint DIR`` writes a new checkpoint folder (default ``DIR-routers``) with
the unchanged stage-1 weights, the router weights under the ``routers.`` prefix, ``stage = "routers"``, the
chosen decision threshold, the routed test metrics, and the accuracy-compute curve (``curve.csv``,
``curve.png``). The steps live beside this module: the settings (`training.route_plan`), the training
(`training.route_train`), the curve (`training.curve`) and the threshold choice (`training.threshold`). The
test set is never used for a choice; its curve is for information.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from cascade import CostModel
from training.checkpoint import (
    CheckpointMeta,
    RouterInfo,
    check_same_classes,
    load_weights,
    model_from_weights,
    router_state,
    save_checkpoint,
    weights_sha256,
)
from training.curve import (
    CURVE_CSV,
    CURVE_PNG,
    CurvePoint,
    accuracy_compute_curve,
    plot_curve,
    router_probabilities,
    sweep_thresholds,
    write_curve_csv,
)
from training.data import DataError, LongTailData, load_data
from training.evaluate import metrics_from_outputs, predict
from training.macs import cascade_cost
from training.metrics import CheckpointMetrics, RouterTrainingRecord, ThresholdSelection
from training.models import ExpertOutputs, RIDEModel
from training.models.router import Routers
from training.replay import ReplayGraphs
from training.report import print_summary, write_report
from training.route_plan import RoutePlan, plan_route
from training.route_train import new_routers, train_routers
from training.run_folder import LOG_FILE, prepare_output
from training.runtime import configure_device, resolve_device
from training.threshold import ThresholdChoice, check_reachable, pick_threshold


def route_checkpoint(
    checkpoint: Path,
    *,
    config_path: Path | None = None,
    overrides: Sequence[str] = (),
    out: Path | None = None,
    data_dir: Path | None = None,
    target_compute: float | None = None,
    threshold: float | None = None,
    progress: bool = True,
) -> Path:
    """Train routers for the stage-1 ``checkpoint`` and write the routed checkpoint to ``out``; return ``out``.

    The config is the checkpoint's own (or ``config_path``) with ``overrides`` (see
    :func:`training.route_plan.resolve_route_config`). ``target_compute`` picks the threshold with the best
    validation accuracy whose relative compute is at most that fraction; ``threshold`` sets it directly;
    otherwise ``router.threshold`` (0.5).
    """
    plan = plan_route(
        checkpoint,
        config_path=config_path,
        overrides=overrides,
        out=out,
        threshold=threshold,
        target_compute=target_compute,
    )
    cfg, meta = plan.cfg, plan.meta
    device = resolve_device(cfg.runtime.device)
    configure_device(device)
    if cfg.runtime.num_threads is not None:
        torch.set_num_threads(cfg.runtime.num_threads)
    model, _ = model_from_weights(meta, load_weights(plan.checkpoint), f"checkpoint {plan.checkpoint}")
    routers = new_routers(meta, cfg, model.feature_dim)
    cost = cascade_cost(model, routers, meta.input.image_size)
    if plan.target_compute is not None:
        check_reachable(plan.target_compute, cost)
    prepare_output(plan.out, resume=False)
    (plan.out / LOG_FILE).unlink(missing_ok=True)  # left by an earlier attempt that failed before saving
    data = load_data(cfg.data, data_dir, progress=progress)
    _check_data(plan, data)
    if progress:
        print(
            f"stage 2 of {meta.name}: {meta.model.num_experts - 1} routers on {len(data.train)} training images "
            f"(class-balanced, {cfg.router.epochs} epochs), threshold chosen on {len(data.val)} validation images, "
            f"device {device}"
        )
    model.to(device)
    routers.to(device)
    log = train_routers(model, routers, data.train, cfg, device=device, out=plan.out, progress=progress)
    routers.cpu()
    _finish(plan, model, routers, cost, data, log, device=device)
    return plan.out


def _check_data(plan: RoutePlan, data: LongTailData) -> None:
    check_same_classes(plan.meta, data.class_names, "the data")
    stage1 = plan.meta.config.data
    if plan.cfg.data.val_per_class == stage1.val_per_class and data.class_counts != plan.meta.class_counts:
        raise DataError(
            f"the training split's class counts {data.class_counts[:5]}... differ from stage 1's "
            f"{plan.meta.class_counts[:5]}...: stage 2 must see stage 1's data (same data section)"
        )


def _finish(
    plan: RoutePlan,
    model: RIDEModel,
    routers: Routers,
    cost: CostModel,
    data: LongTailData,
    log: list[dict[str, Any]],
    *,
    device: torch.device,
) -> None:
    """Curves, the threshold, the routed test metrics; then the checkpoint folder and its report."""
    input_info = plan.meta.input
    predicted = {
        name: predict(model, split.images, mean=input_info.mean, std=input_info.std, device=device)
        for name, split in (("val", data.val), ("test", data.test))
    }
    curve = _curves(predicted, data, plan.meta.class_groups, routers, cost)
    choice = pick_threshold(plan.cfg, plan.threshold, plan.target_compute, curve)
    routed_meta = _routed_meta(plan, routers, choice)
    metrics = metrics_from_outputs(
        model, predicted["test"], data.test, routed_meta, routers=routers, threshold=choice.value
    )
    metrics = _with_stage2_records(metrics, plan, log, choice, num_val_images=len(data.val))
    routed_meta = routed_meta.model_copy(update={"metrics": metrics})
    save_checkpoint(plan.out, {**model.state_dict(), **router_state(routers)}, routed_meta)
    write_report(plan.out, metrics, routed_meta)
    write_curve_csv(plan.out / CURVE_CSV, curve)
    plot_curve(plan.out / CURVE_PNG, curve, title=f"{plan.cfg.name}: accuracy vs compute", chosen=choice.point)
    title = f"{plan.cfg.name}: routed (threshold {choice.value:.4g}, {choice.source}) on the test split"
    print_summary(metrics, title=title)


def _curves(
    predicted: dict[str, ExpertOutputs], data: LongTailData, groups: list[str], routers: Routers, cost: CostModel
) -> list[CurvePoint]:
    """Validation and test curves, both over the thresholds derived from the validation split."""
    graphs = {name: ReplayGraphs(outputs, routers, cost) for name, outputs in predicted.items()}
    thresholds = sweep_thresholds(router_probabilities(graphs["val"]))
    curve = []
    for name, split in (("val", data.val), ("test", data.test)):
        curve += accuracy_compute_curve(graphs[name], split.labels, groups, split=name, thresholds=thresholds)
    return curve


def _routed_meta(plan: RoutePlan, routers: Routers, choice: ThresholdChoice) -> CheckpointMeta:
    cfg = plan.cfg
    info = RouterInfo(
        top_z=routers.top_z, hidden=routers.hidden, threshold=choice.value, threshold_source=choice.source
    )
    return plan.meta.model_copy(
        update={
            "name": cfg.name,
            "stage": "routers",
            "config": cfg,
            "epoch": cfg.router.epochs,
            "epochs": cfg.router.epochs,
            "complete": True,
            "routers": info,
            "router_config": cfg.router,
            "parent": weights_sha256(plan.checkpoint),
        }
    )


def _with_stage2_records(
    metrics: CheckpointMetrics,
    plan: RoutePlan,
    log: list[dict[str, Any]],
    choice: ThresholdChoice,
    *,
    num_val_images: int,
) -> CheckpointMetrics:
    """The routed metrics plus how stage 2 ran, and stage 1's training record."""
    router_training = RouterTrainingRecord(
        lr_schedule="cosine, stepped per epoch",
        sampler="class-balanced",
        augmentation="stage-1 training augmentation",
        epochs=len(log),
        last_epoch_log=log[-1],
    )
    selection = ThresholdSelection(
        source=choice.source,
        validation_point=None if choice.point is None else asdict(choice.point),
        curve_csv=CURVE_CSV,
        curve_png=CURVE_PNG,
    )
    stage1 = plan.meta.metrics
    return metrics.model_copy(
        update={
            "router_training": router_training,
            "validation": plan.validation.model_copy(update={"num_images": num_val_images}),
            "threshold_selection": selection,
            "training": stage1.training if stage1 is not None else None,
        }
    )
