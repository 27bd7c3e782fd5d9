"""Stage 2's training: the routers' targets and loss, their optimiser and schedule, and the loop.

- Router k is trained on the cumulative ensemble's correctness with all experts run on all images (trap 11 of
  ../shared/REFERENCE-RIDE.md): positive when experts 1..k together are wrong and some larger ensemble 1..j
  (j > k) is right. BCE with ``pos_weight`` (100), averaged over the batch, summed over the E-1 routers and
  divided by E-1.
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
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from training.checkpoint import CheckpointMeta
from training.config import ConfigError, TrainConfig
from training.data import BatchAugment, ImageSet, augment_generator, balanced_indices
from training.models import RIDEModel
from training.models.blocks import init_weights
from training.models.router import Routers
from training.run_folder import append_log, epoch_seed

ROUTER_MOMENTUM = 0.9


def _running_means(expert_logits: Tensor) -> Tensor:
    """``[B, E, C]``: entry k - 1 is the mean of experts 1..k's logits."""
    num_experts = expert_logits.shape[1]
    counts = torch.arange(1, num_experts + 1, device=expert_logits.device, dtype=expert_logits.dtype)
    return expert_logits.cumsum(dim=1) / counts.view(1, -1, 1)


def router_targets(expert_logits: Tensor, labels: Tensor) -> Tensor:
    """``bool [B, E-1]``: column k - 1 (router k) is True when the running mean of experts 1..k is wrong and the
    running mean of some 1..j with j > k is right (../shared/REFERENCE-RIDE.md 3.3)."""
    correct = _running_means(expert_logits).argmax(dim=2) == labels.view(-1, 1)
    # correct_from[:, j] = any(correct[:, j:]): a reversed running maximum.
    correct_from = correct.flip(1).long().cummax(dim=1).values.flip(1).bool()
    return ~correct[:, :-1] & correct_from[:, 1:]


def routing_loss(
    routers: Routers, expert_logits: Tensor, expert_features: Tensor, labels: Tensor, pos_weight: float
) -> tuple[Tensor, Tensor]:
    """``(mean over routers of the batch-mean weighted BCE, the float targets [B, E-1])``."""
    num_experts = expert_logits.shape[1]
    targets = router_targets(expert_logits, labels).float()
    running_mean = _running_means(expert_logits)
    weight = expert_logits.new_full((), pos_weight)  # made on the device: no copy from the host per step
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


def new_routers(meta: CheckpointMeta, cfg: TrainConfig, feature_dim: int) -> Routers:
    """Routers initialised like the reference (its ``_weights_init`` reaches the router layers too)."""
    top_z = cfg.router.top_z if cfg.router.top_z is not None else min(30, meta.num_classes)
    if top_z > meta.num_classes:
        raise ConfigError(f"router.top_z = {top_z} is more than the {meta.num_classes} classes")
    torch.manual_seed(cfg.runtime.seed)
    routers = Routers(meta.model.num_experts, meta.num_classes, feature_dim, top_z, cfg.router.hidden)
    init_weights(routers)
    return routers


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
    to the log of the run folder ``out``, if given). ``model``, ``routers`` and the images go to ``device`` once;
    the steps then never wait for it."""
    freeze_backbone(model)
    on_device = ImageSet(train_set.images.to(device), train_set.labels.to(device))
    optimizer = torch.optim.SGD(
        routers.parameters(),
        lr=cfg.router.lr,
        momentum=ROUTER_MOMENTUM,
        nesterov=True,
        weight_decay=cfg.router.weight_decay,
    )
    records = []
    for epoch in tqdm(range(1, cfg.router.epochs + 1), desc="routers", unit="epoch", disable=not progress):
        lr = cosine_lr(cfg.router.lr, epoch, cfg.router.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        record = _router_epoch(model, routers, optimizer, on_device, train_set.labels, cfg, epoch=epoch)
        records.append(record)
        if out is not None:
            append_log(out, record)
    routers.eval()
    return records


def _router_epoch(
    model: RIDEModel,
    routers: Routers,
    optimizer: torch.optim.Optimizer,
    train_set: ImageSet,
    host_labels: Tensor,
    cfg: TrainConfig,
    *,
    epoch: int,
) -> dict[str, Any]:
    """One epoch of class-balanced, augmented batches of ``train_set`` (on the device; ``host_labels`` are its
    labels on the CPU, where the epoch's order is drawn); returns the epoch's log record."""
    routers.train()
    device = train_set.images.device
    augment = BatchAugment.from_config(cfg.data)
    generator = augment_generator(device, epoch_seed(cfg.runtime.seed, epoch))
    order = balanced_indices(host_labels, len(train_set), cfg.runtime.seed, epoch).to(device)
    totals = torch.zeros(2 + routers.num_experts - 1, dtype=torch.float64, device=device)  # loss sum, images, positives
    started = time.perf_counter()
    for indices in order.split(cfg.router.batch_size):
        images = augment(train_set.images[indices], generator)
        labels = train_set.labels[indices]
        # fp32 whatever runtime.precision says: the routers must learn on the inputs the served fp32 graphs give.
        with torch.no_grad():
            outputs = model(images)
        loss, targets = routing_loss(
            routers, outputs.logits.float(), outputs.features.float(), labels, cfg.router.pos_weight
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            totals[0] += loss.detach().double() * len(labels)
            totals[1] += len(labels)
            totals[2:] += targets.sum(dim=0)
    loss_sum, images_seen, *positives = totals.tolist()
    return {
        "stage": "routers",
        "epoch": epoch,
        "lr": optimizer.param_groups[0]["lr"],
        "loss": loss_sum / images_seen,
        "positive_rate": [p / images_seen for p in positives],
        "images": int(images_seen),
        "seconds": time.perf_counter() - started,
    }
