"""Stage 1: train the shared trunk and the experts (RIDE), or a one-expert baseline.

:func:`train` sets a run up (:func:`_setup`), runs its epochs (:func:`_run_epochs`, one epoch is
:func:`train_one_epoch`) and evaluates and saves the last one (:func:`_finish`). Everything random
during training is derived from ``(seed, epoch)``, so ``--resume`` from an epoch boundary reproduces an
uninterrupted run. With a ``teacher`` (:mod:`training.distill`) the same loop trains a distilled student: the
teacher's knowledge-distillation term is added to the loss of every batch.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from training.checkpoint import (
    CheckpointMeta,
    InputInfo,
    load_checkpoint,
    load_into,
    load_train_state,
    save_checkpoint,
    save_train_state,
)
from training.config import ConfigError, RuntimeConfig, TrainConfig, require_same_recipe
from training.data import (
    BatchAugment,
    ImageSet,
    LongTailData,
    augment_generator,
    class_groups,
    iterate_batches,
    load_data,
)
from training.distill import Teacher
from training.evaluate import evaluate_model
from training.losses import ExpertLoss, build_loss
from training.metrics import CheckpointMetrics, TrainingRecord
from training.models import RIDEModel, build_model
from training.report import print_summary, write_report
from training.run_folder import append_log, epoch_seed, last_log_record, prepare_output
from training.runtime import (
    Runtime,
    all_reduce_sum,
    describe_execution,
    resolve_precision,
    start_runtime,
    stop_runtime,
)
from training.schedule import ResolvedSchedule, drw_epoch, lr_factor, resolve_schedule


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def logit_scale(cfg: TrainConfig) -> float:
    """The factor the model applies to its logits (LDAM margins are multiplied by it)."""
    return cfg.model.scale if cfg.model.classifier == "cosine" else 1.0


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``, or nothing at all for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def epoch_batches(num_items: int, cfg: TrainConfig, epoch: int, runtime: Runtime) -> list[torch.Tensor]:
    """This process's index batches for ``epoch``, on the training device (one copy per epoch).

    Each process takes its share of the global batch, so the global batch is the same at any world size. Under DDP
    a last batch with fewer images than processes is skipped by all of them (at most world_size - 1 images of an
    epoch): a process with no image would log a NaN loss and pull the averaged gradient towards zero.
    """
    batches = iterate_batches(
        num_items, cfg.optim.batch_size, shuffle=True, seed=cfg.runtime.seed, epoch=epoch, device=runtime.device
    )
    return [b[runtime.rank :: runtime.world_size] for b in batches if len(b) >= runtime.world_size]


def train_one_epoch(
    model: nn.Module,
    loss_fn: ExpertLoss,
    optimizer: torch.optim.Optimizer,
    train_set: ImageSet,
    augment: BatchAugment,
    *,
    cfg: TrainConfig,
    epoch: int,
    runtime: Runtime,
    progress: bool,
    teacher: Teacher | None = None,
) -> EpochStats:
    """One epoch over ``train_set`` (on the training device). The step never waits for the device: batches,
    random numbers and statistics all stay there, and only the progress bar (every ``runtime.log_every`` steps)
    and the end of the epoch read numbers back."""
    model.train()
    device = runtime.device
    generator = augment_generator(device, epoch_seed(cfg.runtime.seed, epoch, runtime.rank))
    batches = epoch_batches(len(train_set), cfg, epoch, runtime)
    compute_dtype = resolve_precision(cfg.runtime.precision, device)
    log_every = cfg.runtime.log_every if progress else 0
    # Statistics stay on the training device: no host sync per step, and NCCL reduces only device tensors.
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, images
    started = time.perf_counter()
    bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.schedule.epochs}", leave=False, disable=not progress, unit="batch")
    for step, indices in enumerate(bar):
        images = augment(train_set.images[indices], generator)
        if cfg.runtime.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = train_set.labels[indices]
        with autocast(device, compute_dtype):
            outputs = model(images)
            teacher_mean = teacher.mean_logits(images) if teacher is not None else None
        loss = loss_fn(outputs.logits.float(), targets)
        if teacher is not None:
            loss = loss + teacher.kd_loss(outputs.logits, teacher_mean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            correct = (outputs.logits.float().mean(dim=1).argmax(dim=1) == targets).sum()
            totals[0] += loss.detach() * len(targets)
            totals[1] += correct
            totals[2] += len(targets)
        if log_every and step % log_every == 0:
            seen = totals[2].item()
            bar.set_postfix(
                loss=f"{totals[0].item() / max(seen, 1):.3f}",
                lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                img_s=f"{seen * runtime.world_size / (time.perf_counter() - started):.0f}",
            )
    loss_sum, correct, images = all_reduce_sum(totals, runtime).tolist()
    seconds = time.perf_counter() - started
    return EpochStats(loss_sum / images, correct / images, int(images), seconds)


def _parameter_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def _build_meta(
    cfg: TrainConfig, data: LongTailData, epoch: int, complete: bool, teacher: Teacher | None = None
) -> CheckpointMeta:
    return CheckpointMeta(
        name=cfg.name,
        stage="experts" if teacher is None else "distilled",
        parent=None if teacher is None else teacher.sha256,
        model=cfg.model,
        num_classes=data.num_classes,
        class_names=data.class_names,
        class_counts=data.class_counts,
        class_groups=class_groups(data.class_counts, cfg.data.many_shot_above, cfg.data.few_shot_below),
        input=InputInfo(image_size=cfg.data.image_size, mean=cfg.data.mean, std=cfg.data.std),
        config=cfg,
        epoch=epoch,
        epochs=cfg.schedule.epochs,
        complete=complete,
    )


def _match_parameter_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give restored momentum buffers their parameter's device and memory format (channels-last included):
    a buffer laid out unlike its parameter takes the optimizer off its fused/foreach fast path."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    state[key] = torch.empty_like(param).copy_(value)
                elif isinstance(value, torch.Tensor):
                    state[key] = value.to(param.device)


def _check_resumable(cfg: TrainConfig, meta: CheckpointMeta, data: LongTailData) -> None:
    require_same_recipe(meta.config, cfg, where="cannot resume")
    if meta.class_names != data.class_names or meta.class_counts != data.class_counts:
        raise ConfigError("cannot resume: the training data (classes or counts) differ from the interrupted run")
    if meta.complete:
        raise ConfigError(f"the run in {meta.name!r} already finished (epoch {meta.epoch}); nothing to resume")


def train(
    cfg: TrainConfig, *, out: Path, data_dir: Path | None = None, resume: bool = False, teacher: Teacher | None = None
) -> Path:
    """Train stage 1 into ``out`` (a checkpoint folder) and evaluate the last epoch on the test split.

    With ``teacher`` (a frozen model, see :mod:`training.distill`) every batch's loss gets its distillation term.
    """
    runtime = start_runtime(cfg.runtime.device, cfg.runtime.num_threads)
    try:
        return _train(cfg, out=Path(out), data_dir=data_dir, resume=resume, runtime=runtime, teacher=teacher)
    finally:
        stop_runtime(runtime)


@dataclass
class TrainingRun:
    """Everything the epochs work on, built once by :func:`_setup`."""

    cfg: TrainConfig
    out: Path
    runtime: Runtime
    schedule: ResolvedSchedule
    data: LongTailData
    model: RIDEModel
    net: nn.Module  # what the training forward runs: the model, wrapped for DDP and compiled when asked
    loss_fn: ExpertLoss
    optimizer: torch.optim.Optimizer
    train_set: ImageSet  # on the run's device
    augment: BatchAugment
    start_epoch: int
    teacher: Teacher | None


def _train(
    cfg: TrainConfig, *, out: Path, data_dir: Path | None, resume: bool, runtime: Runtime, teacher: Teacher | None
) -> Path:
    run = _setup(cfg, out=out, data_dir=data_dir, resume=resume, runtime=runtime, teacher=teacher)
    if runtime.is_main:
        _print_start(run)
    _run_epochs(run)
    if runtime.is_main:
        _finish(run)
    return out


def _setup(
    cfg: TrainConfig, *, out: Path, data_dir: Path | None, resume: bool, runtime: Runtime, teacher: Teacher | None
) -> TrainingRun:
    """Output folder, data, model, loss and optimizer (restored from ``out`` when resuming), all on the device."""
    if runtime.is_main:
        prepare_output(out, resume)
    schedule = resolve_schedule(cfg.schedule)
    data = load_data(cfg.data, data_dir, progress=runtime.is_main)
    if teacher is not None:
        teacher.check_classes(data.class_names)
        teacher.model.to(runtime.device)
    torch.manual_seed(cfg.runtime.seed)
    model: RIDEModel = build_model(cfg.model, data.num_classes)
    loss_fn = build_loss(cfg.loss, data.class_counts, logit_scale(cfg), drw_epoch(cfg.loss, schedule))
    model.to(runtime.device)
    if cfg.runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=cfg.optim.lr,
        momentum=cfg.optim.momentum,
        nesterov=cfg.optim.nesterov,
        weight_decay=cfg.optim.weight_decay,
        fused=cfg.runtime.fused_optimizer or None,
    )
    start_epoch = _restore(cfg, out, data, model, optimizer, teacher) if resume else 1
    loss_fn.to(runtime.device)
    return TrainingRun(
        cfg=cfg,
        out=out,
        runtime=runtime,
        schedule=schedule,
        data=data,
        model=model,
        net=training_forward(model, cfg.runtime, runtime),
        loss_fn=loss_fn,
        optimizer=optimizer,
        train_set=ImageSet(data.train.images.to(runtime.device), data.train.labels.to(runtime.device)),
        augment=BatchAugment.from_config(cfg.data),
        start_epoch=start_epoch,
        teacher=teacher,
    )


def training_forward(model: RIDEModel, cfg: RuntimeConfig, runtime: Runtime) -> nn.Module:
    """What the training step calls: ``model``, with SyncBatchNorm and wrapped for DDP under torchrun, and compiled
    when asked. Evaluation and checkpoints use ``model`` itself (SyncBatchNorm in eval mode is plain batch norm,
    with the same state dict)."""
    if cfg.sync_batchnorm and runtime.device.type != "cuda":
        raise ConfigError("runtime.sync_batchnorm needs CUDA devices (torch's SyncBatchNorm has no CPU kernels)")
    if cfg.sync_batchnorm and runtime.distributed:
        # In place: the SyncBatchNorm modules take over the same parameters (the optimizer's) and buffers.
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net: nn.Module = DistributedDataParallel(model) if runtime.distributed else model
    if cfg.compile:
        # Static shapes: exactly two graphs (the full batch and the epoch's last, shorter one) instead of a dynamic
        # graph that the full batches would then share. The mode switches the training step sees (train/eval
        # around evaluation, DRW in the loss, which is not compiled) keep their guards; tests/training check this.
        net = torch.compile(net, dynamic=False)
    return net


def _print_start(run: TrainingRun) -> None:
    cfg, runtime, data = run.cfg, run.runtime, run.data
    print(
        f"training {cfg.name}: {cfg.model.arch} x{cfg.model.num_experts} on {len(data.train)} images "
        f"({data.num_classes} classes), epochs {run.start_epoch}..{run.schedule.epochs}, device {runtime.device}"
        + (f", {runtime.world_size} processes" if runtime.distributed else "")
        + f", {describe_execution(cfg.runtime, runtime.device)}"
    )


def _restore(
    cfg: TrainConfig,
    out: Path,
    data: LongTailData,
    model: RIDEModel,
    optimizer: torch.optim.Optimizer,
    teacher: Teacher | None,
) -> int:
    """Load the interrupted run's weights and momentum into ``model`` and ``optimizer``; return the next epoch."""
    meta, weights = load_checkpoint(out)
    _check_resumable(cfg, meta, data)
    if meta.parent != (None if teacher is None else teacher.sha256):
        raise ConfigError("cannot resume: the interrupted run was trained with another teacher (or none)")
    load_into(model, weights, f"checkpoint {out}")
    start_epoch = load_train_state(out, optimizer, _parameter_names(model)) + 1
    _match_parameter_layout(optimizer)
    return start_epoch


def _run_epochs(run: TrainingRun) -> None:
    """The epochs from ``run.start_epoch`` on; the main process logs each and saves a resumable state every
    ``runtime.checkpoint_every`` epochs."""
    cfg, runtime, schedule = run.cfg, run.runtime, run.schedule
    epochs = range(run.start_epoch, schedule.epochs + 1)
    epochs_bar = tqdm(epochs, desc="train", unit="epoch", disable=not runtime.is_main)
    for epoch in epochs_bar:
        lr = cfg.optim.lr * lr_factor(epoch, schedule)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        run.loss_fn.set_epoch(epoch)
        stats = train_one_epoch(
            run.net,
            run.loss_fn,
            run.optimizer,
            run.train_set,
            run.augment,
            cfg=cfg,
            epoch=epoch,
            runtime=runtime,
            progress=runtime.is_main,
            teacher=run.teacher,
        )
        if not runtime.is_main:
            continue
        record = {
            "epoch": epoch,
            "lr": lr,
            "loss": stats.loss,
            "train_accuracy": stats.accuracy,
            "images_per_second": stats.images_per_second,
            "seconds": stats.seconds,
            "drw_active": run.loss_fn.drw_active,
        }
        append_log(run.out, record)
        epochs_bar.set_postfix(
            loss=f"{stats.loss:.3f}", acc=f"{stats.accuracy:.3f}", img_s=f"{stats.images_per_second:.0f}"
        )
        if epoch % cfg.runtime.checkpoint_every == 0 and epoch < schedule.epochs:
            _save(run, epoch, complete=False)


def _save(run: TrainingRun, epoch: int, *, complete: bool, metrics: CheckpointMetrics | None = None) -> None:
    """Momentum buffers, weights and sidecar of ``epoch``."""
    save_train_state(run.out, run.optimizer, _parameter_names(run.model), epoch)
    meta = _build_meta(run.cfg, run.data, epoch, complete=complete, teacher=run.teacher)
    save_checkpoint(run.out, run.model.state_dict(), meta.model_copy(update={"metrics": metrics}))


def _finish(run: TrainingRun) -> None:
    """Evaluate the last epoch on the test split, save it as the finished checkpoint and write its report."""
    cfg, epochs = run.cfg, run.schedule.epochs
    meta = _build_meta(cfg, run.data, epochs, complete=True, teacher=run.teacher)
    metrics = evaluate_model(
        run.model, run.data, meta, device=run.runtime.device, batch_size=cfg.runtime.eval_batch_size
    )
    metrics = metrics.model_copy(
        update={
            "training": TrainingRecord(epochs=epochs, last_epoch_log=last_log_record(run.out)),
            "distillation": run.teacher.describe() if run.teacher is not None else None,
        }
    )
    _save(run, epochs, complete=True, metrics=metrics)
    write_report(run.out, metrics, meta.model_copy(update={"metrics": metrics}))
    print_summary(metrics, title=f"{cfg.name}: last epoch ({epochs}) on the test split")
