"""The lr schedule against the reference CustomLR values (../shared/REFERENCE-RIDE.md 5.1) and its scaling to other
lengths."""

from __future__ import annotations

import pytest

from training.config import ConfigError, LossConfig, ScheduleConfig
from training.losses import build_loss
from training.schedule import ResolvedSchedule, drw_epoch, lr_factor, resolve_schedule

# Reference lr per 1-based epoch for lr 0.1 at 200 epochs (measured from the reference CustomLR).
REFERENCE_LR = {
    1: 0.02,
    2: 0.04,
    3: 0.06,
    4: 0.08,
    5: 0.10,
    6: 0.1,
    160: 0.1,
    161: 0.001,
    180: 0.001,
    181: 1e-5,
    200: 1e-5,
}


def test_default_schedule_is_the_reference() -> None:
    schedule = resolve_schedule(ScheduleConfig())
    assert schedule == ResolvedSchedule(200, 5, [160, 180], [0.01, 0.0001])


@pytest.mark.parametrize(("epoch", "lr"), sorted(REFERENCE_LR.items()))
def test_reference_lr_values(epoch: int, lr: float) -> None:
    schedule = resolve_schedule(ScheduleConfig())
    assert 0.1 * lr_factor(epoch, schedule) == pytest.approx(lr, rel=1e-9)


def test_scaled_schedule_for_20_epochs() -> None:
    schedule = resolve_schedule(ScheduleConfig(epochs=20))
    assert schedule == ResolvedSchedule(20, 1, [16, 18], [0.01, 0.0001])
    factors = [lr_factor(epoch, schedule) for epoch in range(1, 21)]
    assert factors == [1.0] * 16 + [0.01, 0.01, 0.0001, 0.0001]


def test_scaled_warmup_and_milestones_for_other_lengths() -> None:
    assert resolve_schedule(ScheduleConfig(epochs=400)) == ResolvedSchedule(400, 10, [320, 360], [0.01, 0.0001])
    assert resolve_schedule(ScheduleConfig(epochs=1)).warmup_epochs == 0
    assert resolve_schedule(ScheduleConfig(epochs=2)).warmup_epochs == 1


@pytest.mark.parametrize("epochs", range(1, 41))
def test_scaled_milestones_are_strictly_increasing_and_within_the_run(epochs: int) -> None:
    schedule = resolve_schedule(ScheduleConfig(epochs=epochs))
    first, second = schedule.milestones
    assert 0 <= first < second <= epochs
    assert schedule.warmup_epochs <= epochs
    if epochs >= 2:
        # Short runs still reach the first decay (and with it DRW) before they end.
        assert first < epochs


def test_explicit_warmup_and_milestones_are_kept() -> None:
    cfg = ScheduleConfig(epochs=50, warmup_epochs=3, milestones=[10, 20, 30], decay_factors=[0.5, 0.25, 0.125])
    schedule = resolve_schedule(cfg)
    assert schedule == ResolvedSchedule(50, 3, [10, 20, 30], [0.5, 0.25, 0.125])
    assert [lr_factor(e, schedule) for e in (1, 3, 10, 11, 21, 31, 50)] == [1 / 3, 1.0, 1.0, 0.5, 0.25, 0.125, 0.125]


def test_only_milestones_given_scales_the_warmup() -> None:
    schedule = resolve_schedule(ScheduleConfig(epochs=100, milestones=[50, 75]))
    assert schedule.milestones == [50, 75]
    assert schedule.warmup_epochs == 2  # Python round(): 2.5 goes to the even neighbour


def test_zero_warmup_starts_at_full_lr() -> None:
    schedule = resolve_schedule(ScheduleConfig(warmup_epochs=0))
    assert lr_factor(1, schedule) == 1.0


def test_warmup_and_decay_multiply_when_they_overlap() -> None:
    schedule = resolve_schedule(ScheduleConfig(epochs=10, warmup_epochs=4, milestones=[2, 8]))
    assert lr_factor(3, schedule) == pytest.approx(0.01 * 3 / 4)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (ScheduleConfig(epochs=100, milestones=[160, 180]), "go past"),
        (ScheduleConfig(milestones=[180, 160]), "strictly increasing"),
        (ScheduleConfig(milestones=[160, 160]), "strictly increasing"),
        (ScheduleConfig(milestones=[-1, 160]), "negative"),
        (ScheduleConfig(epochs=10, warmup_epochs=11), "warmup_epochs"),
        (ScheduleConfig(decay_factors=[0.1, 0.01, 0.001]), "milestones"),
    ],
)
def test_invalid_schedules_are_config_errors(cfg: ScheduleConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_schedule(cfg)


def test_lr_factor_rejects_zero_based_epochs() -> None:
    with pytest.raises(ValueError, match="1-based"):
        lr_factor(0, resolve_schedule(ScheduleConfig()))


def test_drw_epoch_defaults_to_first_milestone() -> None:
    assert drw_epoch(LossConfig(), resolve_schedule(ScheduleConfig())) == 160
    assert drw_epoch(LossConfig(), resolve_schedule(ScheduleConfig(epochs=20))) == 16
    assert drw_epoch(LossConfig(drw_epoch=7), resolve_schedule(ScheduleConfig())) == 7


def test_drw_epoch_without_milestones() -> None:
    schedule = resolve_schedule(ScheduleConfig(epochs=30, milestones=[], decay_factors=[]))
    assert lr_factor(30, schedule) == 1.0
    with pytest.raises(ConfigError, match="drw_epoch"):
        drw_epoch(LossConfig(), schedule)
    assert drw_epoch(LossConfig(drw=False), schedule) == 30
    assert drw_epoch(LossConfig(drw_epoch=12), schedule) == 12


def test_drw_switches_on_with_the_first_lr_drop() -> None:
    schedule = resolve_schedule(ScheduleConfig())
    loss_cfg = LossConfig()
    loss_fn = build_loss(loss_cfg, [500, 100, 20, 5], scale=30.0, drw_epoch=drw_epoch(loss_cfg, schedule))
    for epoch in (160, 161):
        loss_fn.set_epoch(epoch)
        assert loss_fn.drw_active is (lr_factor(epoch, schedule) < 1.0)
