"""Learning-rate schedule: linear warm-up, then step decays (the reference ``CustomLR``,
../shared/REFERENCE-RIDE.md 5.1).

Epochs are 1-based everywhere. At the reference's 200 epochs: epochs 1-5 warm up (0.2, 0.4, ..., 1.0 × lr),
epochs 6-160 run at lr, 161-180 at 0.01 × lr and 181-200 at 0.0001 × lr. Shorter or longer runs scale the
warm-up and the milestones with the epoch count unless they are given explicitly.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from training.config import ConfigError, LossConfig, ScheduleConfig

REFERENCE_EPOCHS = 200
REFERENCE_WARMUP = 5
REFERENCE_MILESTONES = (160, 180)


@dataclass(frozen=True)
class ResolvedSchedule:
    """A schedule with every default filled in for the run's epoch count."""

    epochs: int
    warmup_epochs: int
    milestones: list[int]
    decay_factors: list[float]


def _scaled_warmup(epochs: int) -> int:
    # Python's round(): halves go to the even neighbour (100 epochs -> 2).
    return max(1, round(REFERENCE_WARMUP * epochs / REFERENCE_EPOCHS)) if epochs >= 2 else 0


def _scaled_milestones(epochs: int) -> list[int]:
    milestones = [round(m * epochs / REFERENCE_EPOCHS) for m in REFERENCE_MILESTONES]
    for i in range(1, len(milestones)):
        milestones[i] = max(milestones[i], milestones[i - 1] + 1)
    # Pull back from the end so the last milestone is at most `epochs`: very short runs still reach the first decay
    # (and with it DRW) before they end.
    milestones[-1] = min(milestones[-1], epochs)
    for i in range(len(milestones) - 2, -1, -1):
        milestones[i] = min(milestones[i], milestones[i + 1] - 1)
    return milestones


def _check_milestones(milestones: list[int], epochs: int) -> None:
    if any(m < 0 for m in milestones):
        raise ConfigError(f"schedule.milestones must not be negative, got {milestones}")
    if any(b <= a for a, b in itertools.pairwise(milestones)):
        raise ConfigError(f"schedule.milestones must be strictly increasing, got {milestones}")
    if milestones and milestones[-1] > epochs:
        raise ConfigError(
            f"schedule.milestones {milestones} go past schedule.epochs = {epochs}: those decays would never happen"
        )


def resolve_schedule(cfg: ScheduleConfig) -> ResolvedSchedule:
    """Fill in the warm-up and milestones (scaled from 5 and [160, 180] at 200 epochs) and validate them."""
    epochs = cfg.epochs
    if cfg.milestones is None:
        if len(cfg.decay_factors) != len(REFERENCE_MILESTONES):
            raise ConfigError(
                f"schedule.decay_factors has {len(cfg.decay_factors)} entries but the default milestones have "
                f"{len(REFERENCE_MILESTONES)}: set schedule.milestones too"
            )
        milestones = _scaled_milestones(epochs)
    else:
        milestones = list(cfg.milestones)
        _check_milestones(milestones, epochs)
    warmup = _scaled_warmup(epochs) if cfg.warmup_epochs is None else cfg.warmup_epochs
    if warmup > epochs:
        raise ConfigError(f"schedule.warmup_epochs = {warmup} is more than schedule.epochs = {epochs}")
    return ResolvedSchedule(epochs, warmup, milestones, list(cfg.decay_factors))


def lr_factor(epoch: int, schedule: ResolvedSchedule) -> float:
    """Multiplier of the base lr during 1-based ``epoch``.

    Warm-up epochs ``1..warmup`` get ``epoch / warmup``; after milestone i the factor is ``decay_factors[i]`` of
    the last milestone passed (relative to the base lr, not cumulative). Both multiply if they overlap.
    """
    if epoch < 1:
        raise ValueError(f"epochs are 1-based, got {epoch}")
    factor = 1.0
    for milestone, decay in zip(schedule.milestones, schedule.decay_factors, strict=True):
        if epoch > milestone:
            factor = decay
    if epoch <= schedule.warmup_epochs:
        factor *= epoch / schedule.warmup_epochs
    return factor


def drw_epoch(cfg: LossConfig, schedule: ResolvedSchedule) -> int:
    """The epoch after which DRW and the diversity temperatures switch on: ``cfg.drw_epoch``, else the first milestone.

    With ``drw`` disabled the value is unused; a schedule without milestones then gives ``schedule.epochs``.
    """
    if cfg.drw_epoch is not None:
        return cfg.drw_epoch
    if schedule.milestones:
        return schedule.milestones[0]
    if cfg.drw:
        raise ConfigError("set loss.drw_epoch: the schedule has no milestones to take the DRW epoch from")
    return schedule.epochs
