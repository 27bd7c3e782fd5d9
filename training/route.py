"""Stage 2: train the expert-assignment routers of a stage-1 checkpoint (../shared/REFERENCE-RIDE.md 3).

``python -m training.run route --checkpoint DIR`` writes a new checkpoint folder (default ``DIR-routers``) with
the unchanged stage-1 weights, the router weights under the ``routers.`` prefix, ``stage = "routers"``, the
chosen decision threshold, the routed test metrics, and the accuracy-compute curve (``curve.csv``,
``curve.png``).

Choices (the reference's where it has one):

- Router k is trained on the cumulative ensemble's correctness with all experts run on all images (trap 11):
  positive when experts 1..k together are wrong and some larger ensemble 1..j (j > k) is right. BCE with
  ``pos_weight`` (100), averaged over the batch, summed over the E-1 routers and divided by E-1.
- Everything but the routers is frozen (``requires_grad = False``, not in the optimizer, so weight decay never
  touches it) and the whole backbone runs in eval mode, so its weights and batch-norm statistics stay
  bit-identical (trap 9).
- Each epoch draws ``len(train)`` class-balanced indices (``balanced_indices``); SGD momentum 0.9, Nesterov,
  weight decay 5e-4 on router parameters only, batch 512, 5 epochs, lr 0.01 with cosine decay **stepped per
  epoch** like the reference's ``CosineAnnealingLR(T_max=epochs)`` (0.01, 0.009045, 0.006545, 0.003455, 0.000955).
- Images get the stage-1 training augmentation, as in the reference. The frozen backbone's outputs are computed
  batch by batch under ``no_grad`` right before the router step: with a frozen eval-mode backbone this is exactly
  what precomputing the augmented epoch's outputs would give, with memory bounded by one batch. Stage 2 thus
  costs about one forward pass per training image per epoch.
- The threshold is chosen on a validation split carved from the training data (``data.val_per_class``): when
  the stage-1 run held none out, ``route`` carves ``DEFAULT_VAL_PER_CLASS`` per class. Those images were in
  stage 1's training set (the experts are over-confident on them, so validation under-estimates the compute the
  test set needs); the routers never see them. For honest thresholds train stage 1 with ``data.val_per_class``
  > 0 and keep the same value here. The test set is never used for a choice; its curve is for information.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from cascade import CostModel
from training.checkpoint import (
    CheckpointMeta,
    RouterInfo,
    load_meta,
    model_from_checkpoint,
    router_state,
    save_checkpoint,
    weights_sha256,
)
from training.config import ConfigError, TrainConfig, apply_overrides, config_from_dict, load_config
from training.curve import (
    CURVE_CSV,
    CURVE_PNG,
    CurvePoint,
    accuracy_compute_curve,
    choose_threshold,
    plot_curve,
    router_probabilities,
    sweep_thresholds,
    write_curve_csv,
)
from training.data import BatchAugment, DataError, ImageSet, LongTailData, balanced_indices, load_data
from training.evaluate import metrics_from_outputs, predict, print_summary, write_report
from training.macs import cascade_cost
from training.models import ExpertOutputs, RIDEModel
from training.models.blocks import init_weights
from training.models.router import Routers
from training.replay import ReplayGraphs
from training.run_folder import LOG_FILE, append_log, epoch_seed, prepare_output
from training.runtime import resolve_device

DEFAULT_VAL_PER_CLASS = 20
ROUTER_MOMENTUM = 0.9


def router_targets(expert_logits: Tensor, labels: Tensor) -> Tensor:
    """``bool [B, E-1]``: column k - 1 (router k) is True when the running mean of experts 1..k is wrong and the
    running mean of some 1..j with j > k is right (../shared/REFERENCE-RIDE.md 3.3)."""
    num_experts = expert_logits.shape[1]
    counts = torch.arange(1, num_experts + 1, device=expert_logits.device, dtype=expert_logits.dtype)
    running_mean = expert_logits.cumsum(dim=1) / counts.view(1, -1, 1)
    correct = running_mean.argmax(dim=2) == labels.view(-1, 1)
    # correct_from[:, j] = any(correct[:, j:]): a reversed running maximum.
    correct_from = correct.flip(1).long().cummax(dim=1).values.flip(1).bool()
    return ~correct[:, :-1] & correct_from[:, 1:]


def routing_loss(
    routers: Routers, expert_logits: Tensor, expert_features: Tensor, labels: Tensor, pos_weight: float
) -> tuple[Tensor, Tensor]:
    """``(mean over routers of the batch-mean weighted BCE, the float targets [B, E-1])``."""
    num_experts = expert_logits.shape[1]
    targets = router_targets(expert_logits, labels).float()
    counts = torch.arange(1, num_experts + 1, device=expert_logits.device, dtype=expert_logits.dtype)
    running_mean = expert_logits.cumsum(dim=1) / counts.view(1, -1, 1)
    weight = torch.tensor(pos_weight, device=expert_logits.device)
    total = expert_logits.new_zeros(())
    for k in range(1, num_experts):
        logit = routers(k, running_mean[:, k - 1], expert_features[:, k - 1])
        total = total + F.binary_cross_entropy_with_logits(logit, targets[:, k - 1], pos_weight=weight)
    return total / (num_experts - 1), targets


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """lr of 1-based ``epoch``: ``CosineAnnealingLR(T_max=epochs, eta_min=0)`` stepped once per epoch."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / epochs))


def freeze_backbone(model: RIDEModel) -> None:
    """No gradients and eval mode (batch norm uses and keeps its running statistics) for the whole model."""
    model.requires_grad_(False)
    model.eval()


def _check_threshold_arguments(threshold: float | None, target_compute: float | None) -> None:
    if threshold is not None and target_compute is not None:
        raise ConfigError("give either --threshold or --target-compute, not both")
    if threshold is not None and not (0.0 <= threshold <= 1.0):
        raise ConfigError(
            f"--threshold must be in [0, 1] (continue to the next expert when sigmoid(router logit) >= threshold), "
            f"got {threshold}"
        )
    if target_compute is not None and not (0.0 < target_compute <= 1.0):
        raise ConfigError(
            f"--target-compute must be in (0, 1] (a fraction of the all-experts cost), got {target_compute}"
        )


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


def resolve_route_config(
    meta: CheckpointMeta, config_path: Path | None = None, overrides: list[str] | tuple[str, ...] = ()
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
    return with_validation_split(cfg)


def with_validation_split(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``data.val_per_class = DEFAULT_VAL_PER_CLASS`` when it is 0 (stage 2 needs a validation split)."""
    if cfg.data.val_per_class > 0:
        return cfg
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"val_per_class": DEFAULT_VAL_PER_CLASS})})


def _validation_note(meta: CheckpointMeta, cfg: TrainConfig) -> dict[str, Any]:
    held_out = 0 < cfg.data.val_per_class <= meta.config.data.val_per_class
    note = {
        "split": "val",
        "per_class": cfg.data.val_per_class,
        "held_out_from_stage1": held_out,
    }
    if not held_out:
        warnings.warn(
            f"the validation split ({cfg.data.val_per_class} per class) was part of stage 1's training set "
            f"(stage 1 used data.val_per_class = {meta.config.data.val_per_class}): thresholds chosen on it are "
            "optimistic; for honest thresholds train stage 1 with data.val_per_class > 0",
            stacklevel=3,
        )
    return note


def _check_data(meta: CheckpointMeta, cfg: TrainConfig, class_names: list[str], class_counts: list[int]) -> None:
    if class_names != meta.class_names:
        raise DataError(
            f"the data's classes {class_names[:5]}... differ from the checkpoint's {meta.class_names[:5]}...: "
            "point --data-dir at the dataset stage 1 was trained on"
        )
    if cfg.data.val_per_class == meta.config.data.val_per_class and class_counts != meta.class_counts:
        raise DataError(
            f"the training split's class counts {class_counts[:5]}... differ from stage 1's "
            f"{meta.class_counts[:5]}...: stage 2 must see stage 1's data (same data section)"
        )


def train_routers(
    model: RIDEModel,
    routers: Routers,
    train_set: ImageSet,
    cfg: TrainConfig,
    *,
    device: torch.device,
    out: Path | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train ``routers`` on ``model``'s (frozen, eval-mode) outputs; return one log record per epoch (also appended
    to the log of the run folder ``out``, if given)."""
    freeze_backbone(model)
    router_cfg = cfg.router
    optimizer = torch.optim.SGD(
        routers.parameters(),
        lr=router_cfg.lr,
        momentum=ROUTER_MOMENTUM,
        nesterov=True,
        weight_decay=router_cfg.weight_decay,
    )
    augment = BatchAugment.from_config(cfg.data)
    records = []
    for epoch in tqdm(range(1, router_cfg.epochs + 1), desc="routers", unit="epoch", disable=not progress):
        lr = cosine_lr(router_cfg.lr, epoch, router_cfg.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        routers.train()
        generator = torch.Generator().manual_seed(epoch_seed(cfg.runtime.seed, epoch))
        order = balanced_indices(train_set.labels, len(train_set), cfg.runtime.seed, epoch)
        totals = torch.zeros(2 + routers.num_experts - 1, dtype=torch.float64)  # loss sum, images, positives
        started = time.perf_counter()
        for indices in order.split(router_cfg.batch_size):
            images = augment(train_set.images[indices].to(device, non_blocking=True), generator)
            labels = train_set.labels[indices].to(device, non_blocking=True)
            # fp32 whatever runtime.precision says: the routers must learn on the inputs the served fp32 graphs give.
            with torch.no_grad():
                outputs = model(images)
            loss, targets = routing_loss(
                routers, outputs.logits.float(), outputs.features.float(), labels, router_cfg.pos_weight
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            batch = torch.tensor([loss.item() * len(labels), len(labels)], dtype=torch.float64)
            totals += torch.cat([batch, targets.sum(dim=0).double().cpu()])
        record = {
            "stage": "routers",
            "epoch": epoch,
            "lr": lr,
            "loss": totals[0].item() / totals[1].item(),
            "positive_rate": (totals[2:] / totals[1]).tolist(),
            "images": int(totals[1].item()),
            "seconds": time.perf_counter() - started,
        }
        records.append(record)
        if out is not None:
            append_log(out, record)
    routers.eval()
    return records


def _check_reachable(target_compute: float, cost: CostModel) -> None:
    """Fail before training when even stopping every image after expert 1 costs more than the target."""
    one = np.ones(1, dtype=np.int64)  # one expert run, one router asked
    cheapest = float(cost.relative_compute(experts_used=one, routers_evaluated=one)[0])
    if target_compute < cheapest:
        raise ConfigError(
            f"--target-compute {target_compute} is below what any threshold can reach: stopping every image after "
            f"the first expert already costs {cheapest:.3f} of the all-experts compute"
        )


def _pick_threshold(
    cfg: TrainConfig, threshold: float | None, target_compute: float | None, curve: list[CurvePoint]
) -> tuple[float, str, CurvePoint | None]:
    num_experts = cfg.model.num_experts
    if target_compute is not None:
        chosen = choose_threshold(curve, target_compute, num_experts)
        source = f"target-compute {target_compute} on validation split ({cfg.data.val_per_class} per class)"
        return float(chosen.threshold), source, chosen
    value = cfg.router.threshold if threshold is None else threshold
    source = "--threshold" if threshold is not None else "default" if value == 0.5 else "config router.threshold"
    match = [p for p in curve if p.split == "val" and p.max_experts == num_experts and p.threshold == value]
    return value, source, match[0] if match else None


def _new_routers(meta: CheckpointMeta, cfg: TrainConfig, feature_dim: int) -> Routers:
    """Routers initialised like the reference (its ``_weights_init`` reaches the router layers too)."""
    top_z = cfg.router.top_z if cfg.router.top_z is not None else min(30, meta.num_classes)
    if top_z > meta.num_classes:
        raise ConfigError(f"router.top_z = {top_z} is more than the {meta.num_classes} classes")
    torch.manual_seed(cfg.runtime.seed)
    routers = Routers(meta.model.num_experts, meta.num_classes, feature_dim, top_z, cfg.router.hidden)
    init_weights(routers)
    return routers


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


def _stage2_records(
    log: list[dict[str, Any]], validation: dict[str, Any], source: str, chosen: CurvePoint | None
) -> dict[str, Any]:
    return {
        "router_training": {
            "lr_schedule": "cosine, stepped per epoch",
            "sampler": "class-balanced",
            "augmentation": "stage-1 training augmentation",
            "epochs": len(log),
            "last_epoch_log": log[-1],
        },
        "validation": validation,
        "threshold_selection": {
            "source": source,
            "validation_point": None if chosen is None else asdict(chosen),
            "curve_csv": CURVE_CSV,
            "curve_png": CURVE_PNG,
        },
    }


def route_checkpoint(
    checkpoint: Path,
    *,
    cfg: TrainConfig | None = None,
    out: Path | None = None,
    data_dir: Path | None = None,
    target_compute: float | None = None,
    threshold: float | None = None,
    progress: bool = True,
) -> Path:
    """Train routers for the stage-1 ``checkpoint`` and write the routed checkpoint to ``out``; return ``out``.

    ``cfg`` defaults to :func:`resolve_route_config` of the checkpoint. ``target_compute`` picks the threshold
    with the best validation accuracy whose relative compute is at most that fraction; ``threshold`` sets it
    directly; otherwise ``cfg.router.threshold`` (0.5).
    """
    checkpoint = Path(checkpoint)
    _check_threshold_arguments(threshold, target_compute)
    meta = load_meta(checkpoint)
    _check_routable(meta, checkpoint)
    cfg = resolve_route_config(meta) if cfg is None else with_validation_split(cfg)
    if cfg.model != meta.model:
        raise ConfigError("the config's model section differs from the checkpoint's; stage 2 keeps the architecture")
    if threshold is not None:
        cfg = cfg.model_copy(update={"router": cfg.router.model_copy(update={"threshold": threshold})})
    out = Path(out) if out is not None else checkpoint.parent / f"{checkpoint.name}-routers"
    if out.resolve() == checkpoint.resolve():
        raise ConfigError("--out must be a new folder: stage 2 never overwrites the stage-1 checkpoint")
    validation = _validation_note(meta, cfg)
    device = resolve_device(cfg.runtime.device)
    if cfg.runtime.num_threads is not None:
        torch.set_num_threads(cfg.runtime.num_threads)
    model, meta, _ = model_from_checkpoint(checkpoint)
    routers = _new_routers(meta, cfg, model.feature_dim)
    cost = cascade_cost(model, routers, meta.input.image_size)
    if target_compute is not None:
        _check_reachable(target_compute, cost)
    prepare_output(out, resume=False)
    (out / LOG_FILE).unlink(missing_ok=True)  # left by an earlier attempt that failed before saving
    data = load_data(cfg.data, data_dir, progress=progress)
    _check_data(meta, cfg, data.class_names, data.class_counts)
    validation["num_images"] = len(data.val)
    if progress:
        print(
            f"stage 2 of {meta.name}: {meta.model.num_experts - 1} routers on {len(data.train)} training images "
            f"(class-balanced, {cfg.router.epochs} epochs), threshold chosen on {len(data.val)} validation images, "
            f"device {device}"
        )
    model.to(device)
    routers.to(device)
    log = train_routers(model, routers, data.train, cfg, device=device, out=out, progress=progress)
    routers.cpu()
    predicted = {
        name: predict(model, split.images, mean=meta.input.mean, std=meta.input.std, device=device)
        for name, split in (("val", data.val), ("test", data.test))
    }
    curve = _curves(predicted, data, meta.class_groups, routers, cost)
    chosen_value, source, chosen = _pick_threshold(cfg, threshold, target_compute, curve)

    routed_meta = meta.model_copy(
        update={
            "name": cfg.name,
            "stage": "routers",
            "config": cfg,
            "epoch": cfg.router.epochs,
            "epochs": cfg.router.epochs,
            "complete": True,
            "routers": RouterInfo(
                top_z=routers.top_z, hidden=routers.hidden, threshold=chosen_value, threshold_source=source
            ),
            "router_config": cfg.router,
            "parent": weights_sha256(checkpoint),
        }
    )
    metrics = metrics_from_outputs(
        model, predicted["test"], data.test, routed_meta, routers=routers, threshold=chosen_value
    )
    metrics.update(_stage2_records(log, validation, source, chosen))
    if meta.metrics and "training" in meta.metrics:
        metrics["training"] = meta.metrics["training"]
    routed_meta = routed_meta.model_copy(update={"metrics": metrics})
    save_checkpoint(out, {**model.state_dict(), **router_state(routers)}, routed_meta)
    write_report(out, metrics, routed_meta)
    write_curve_csv(out / CURVE_CSV, curve)
    plot_curve(out / CURVE_PNG, curve, title=f"{cfg.name}: accuracy vs compute", chosen=chosen)
    print_summary(metrics, title=f"{cfg.name}: routed (threshold {chosen_value:.4g}, {source}) on the test split")
    return out
