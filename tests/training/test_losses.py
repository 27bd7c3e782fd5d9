"""Losses against the reference numbers (../shared/REFERENCE-RIDE.md 4) and against hand computations in plain
Python."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.config import LossConfig
from training.losses import (
    ExpertLoss,
    build_loss,
    distillation_loss,
    diversity_temperatures,
    drw_weights,
    ldam_margins,
)

CIFAR100_LT_COUNTS = [int(500 * 0.01 ** (c / 99)) for c in range(100)]

# A tiny hand-written batch: B=3 samples, E=2 experts, C=4 classes.
LOGITS = [
    [[1.0, -0.5, 0.3, 2.0], [0.2, 0.8, -1.0, 0.5]],
    [[-0.3, 1.5, 0.7, 0.1], [0.9, -0.2, 0.4, -0.8]],
    [[0.6, 0.0, -0.7, 1.2], [-1.1, 0.3, 1.6, 0.2]],
]
TARGETS = [3, 0, 2]
COUNTS = [40, 20, 10, 5]
SCALE = 2.0
DRW_EPOCH = 4
# Non-default knobs so every vector is visibly non-uniform on four classes.
TINY_CFG = {"max_margin": 0.5, "drw_beta": 0.99, "reweight_factor": 0.3, "diversity_temperature": 1.5}


# ---- plain-Python reference math -------------------------------------------------------------------------------


def hand_log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    log_sum = math.log(sum(math.exp(v - top) for v in row))
    return [v - top - log_sum for v in row]


def hand_softmax(row: list[float]) -> list[float]:
    return [math.exp(v) for v in hand_log_softmax(row)]


def hand_margins(counts: list[int], max_margin: float) -> list[float]:
    raw = [n**-0.25 for n in counts]
    return [m * max_margin / max(raw) for m in raw]


def hand_weights(counts: list[int], beta: float) -> list[float]:
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    return [w * len(counts) / sum(raw) for w in raw]


def hand_temperatures(counts: list[int], gamma: float, eta: float) -> list[float]:
    psi = [gamma * len(counts) * n / sum(counts) + 1 - gamma for n in counts]
    return [eta * p / max(psi) for p in psi]


def hand_mean_logits(logits: list[list[list[float]]]) -> list[list[float]]:
    return [[sum(expert[c] for expert in sample) / len(sample) for c in range(len(sample[0]))] for sample in logits]


def hand_ce(rows: list[list[float]], targets: list[int], weights: list[float] | None) -> float:
    """Cross-entropy with PyTorch's weighted-mean semantics (divide by the sum of target weights)."""
    w = [1.0] * len(rows) if weights is None else [weights[y] for y in targets]
    nll = [-hand_log_softmax(row)[y] for row, y in zip(rows, targets, strict=True)]
    return sum(wi * li for wi, li in zip(w, nll, strict=True)) / sum(w)


def hand_ldam_rows(
    rows: list[list[float]], targets: list[int], margins: list[float], scale: float
) -> list[list[float]]:
    return [
        [v - scale * margins[y] if c == y else v for c, v in enumerate(row)]
        for row, y in zip(rows, targets, strict=True)
    ]


def hand_kl_batchmean(target_rows: list[list[float]], log_q_rows: list[list[float]]) -> float:
    total = 0.0
    for p, log_q in zip(target_rows, log_q_rows, strict=True):
        total += sum(pc * (math.log(pc) - lq) for pc, lq in zip(p, log_q, strict=True) if pc > 0)
    return total / len(target_rows)


def hand_ride(
    logits: list[list[list[float]]],
    targets: list[int],
    *,
    base: str,
    active: bool,
    diversity_factor: float,
    collaborative: bool,
) -> float:
    counts, cfg = COUNTS, TINY_CFG
    margins = hand_margins(counts, cfg["max_margin"])
    weights = hand_weights(counts, cfg["drw_beta"]) if active else None
    eta = cfg["diversity_temperature"]
    temps = hand_temperatures(counts, cfg["reweight_factor"], eta) if active else [eta] * len(counts)
    t_mean = sum(temps) / len(temps)
    mean_rows = hand_mean_logits(logits)
    target_dist = [hand_softmax([v / t for v, t in zip(row, temps, strict=True)]) for row in mean_rows]
    total = 0.0
    for e in range(len(logits[0])):
        expert_rows = [sample[e] for sample in logits]
        cls_rows = mean_rows if collaborative else expert_rows
        if base == "ldam":
            cls_rows = hand_ldam_rows(cls_rows, targets, margins, SCALE)
        total += hand_ce(cls_rows, targets, weights)
        log_q = [hand_log_softmax([v / t for v, t in zip(row, temps, strict=True)]) for row in expert_rows]
        total += diversity_factor * t_mean**2 * hand_kl_batchmean(target_dist, log_q)
    return total


def tiny_loss(**overrides: object) -> ExpertLoss:
    cfg = LossConfig(**{**TINY_CFG, **overrides})
    return build_loss(cfg, COUNTS, scale=SCALE, drw_epoch=DRW_EPOCH)


def tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(LOGITS), torch.tensor(TARGETS)


# ---- class vectors -----------------------------------------------------------------------------------------------


def test_ldam_margins_match_reference_cifar100_lt() -> None:
    margins = ldam_margins(CIFAR100_LT_COUNTS)
    assert margins.shape == (100,)
    assert margins[0].item() == pytest.approx(0.158, abs=5e-4)
    assert margins[99].item() == pytest.approx(0.5, abs=1e-6)
    assert margins.max().item() == pytest.approx(0.5, abs=1e-6)
    assert ldam_margins(CIFAR100_LT_COUNTS, max_margin=0.2).max().item() == pytest.approx(0.2, abs=1e-6)


def test_drw_weights_match_reference_cifar100_lt() -> None:
    weights = drw_weights(CIFAR100_LT_COUNTS)
    assert weights[0].item() == pytest.approx(0.045, abs=5e-4)
    assert weights[99].item() == pytest.approx(4.378, abs=5e-4)
    assert weights.sum().item() == pytest.approx(100.0, rel=1e-5)


def test_diversity_temperatures_match_reference_cifar100_lt() -> None:
    temps = diversity_temperatures(CIFAR100_LT_COUNTS)
    assert temps[0].item() == pytest.approx(1.0, abs=1e-6)
    assert temps[50].item() == pytest.approx(0.824, abs=5e-4)
    assert temps[99].item() == pytest.approx(0.807, abs=5e-4)
    assert temps.mean().item() == pytest.approx(0.847, abs=5e-4)
    scaled = diversity_temperatures(CIFAR100_LT_COUNTS, base_temperature=2.0)
    torch.testing.assert_close(scaled, 2.0 * temps)


def test_class_vectors_match_hand_formulas_on_tiny_counts() -> None:
    np.testing.assert_allclose(ldam_margins(COUNTS, 0.5).numpy(), hand_margins(COUNTS, 0.5), rtol=1e-6)
    np.testing.assert_allclose(drw_weights(COUNTS, 0.99).numpy(), hand_weights(COUNTS, 0.99), rtol=1e-6)
    np.testing.assert_allclose(
        diversity_temperatures(COUNTS, 0.3, 1.5).numpy(), hand_temperatures(COUNTS, 0.3, 1.5), rtol=1e-6
    )


@pytest.mark.parametrize("counts", [[10, 0, 3], []])
def test_class_vectors_reject_empty_classes(counts: list[int]) -> None:
    with pytest.raises(ValueError):
        ldam_margins(counts)
    with pytest.raises(ValueError):
        drw_weights(counts)


# ---- the RIDE loss -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["ldam", "ce"])
@pytest.mark.parametrize("epoch", [DRW_EPOCH, DRW_EPOCH + 1])
def test_ride_loss_matches_hand_computation(base: str, epoch: int) -> None:
    loss_fn = tiny_loss(kind="ride", base=base, diversity_factor=-0.45)
    loss_fn.set_epoch(epoch)
    logits, targets = tiny_batch()
    active = epoch > DRW_EPOCH
    assert loss_fn.drw_active is active
    expected = hand_ride(LOGITS, TARGETS, base=base, active=active, diversity_factor=-0.45, collaborative=False)
    assert loss_fn(logits, targets).item() == pytest.approx(expected, rel=1e-5)


def test_ride_loss_changes_when_drw_activates() -> None:
    loss_fn = tiny_loss(kind="ride")
    logits, targets = tiny_batch()
    loss_fn.set_epoch(DRW_EPOCH)
    before = loss_fn(logits, targets).item()
    loss_fn.set_epoch(DRW_EPOCH + 1)
    after = loss_fn(logits, targets).item()
    assert abs(after - before) > 1e-3


@pytest.mark.parametrize("diversity_factor", [0.0, -0.45])
@pytest.mark.parametrize("epoch", [1, DRW_EPOCH + 1])
def test_collaborative_switch_is_independent_of_lambda(diversity_factor: float, epoch: int) -> None:
    logits, targets = tiny_batch()
    results = {}
    for collaborative in (False, True):
        loss_fn = tiny_loss(kind="ride", diversity_factor=diversity_factor, collaborative=collaborative)
        loss_fn.set_epoch(epoch)
        results[collaborative] = loss_fn(logits, targets).item()
        expected = hand_ride(
            LOGITS,
            TARGETS,
            base="ldam",
            active=epoch > DRW_EPOCH,
            diversity_factor=diversity_factor,
            collaborative=collaborative,
        )
        assert results[collaborative] == pytest.approx(expected, rel=1e-5)
    assert abs(results[True] - results[False]) > 1e-3


@pytest.mark.parametrize("epoch", [1, DRW_EPOCH + 1])
def test_zero_lambda_individual_is_sum_of_expert_base_losses(epoch: int) -> None:
    loss_fn = tiny_loss(kind="ride", diversity_factor=0.0, collaborative=False)
    loss_fn.set_epoch(epoch)
    logits, targets = tiny_batch()
    active = epoch > DRW_EPOCH
    weights = hand_weights(COUNTS, TINY_CFG["drw_beta"]) if active else None
    margins = hand_margins(COUNTS, TINY_CFG["max_margin"])
    expected = 0.0
    for e in range(2):
        rows = hand_ldam_rows([sample[e] for sample in LOGITS], TARGETS, margins, SCALE)
        expected += hand_ce(rows, TARGETS, weights)
    assert loss_fn(logits, targets).item() == pytest.approx(expected, rel=1e-5)


def test_collaborative_loss_is_num_experts_times_base_of_mean() -> None:
    loss_fn = tiny_loss(kind="ride", diversity_factor=0.0, collaborative=True)
    loss_fn.set_epoch(1)
    logits, targets = tiny_batch()
    margins = hand_margins(COUNTS, TINY_CFG["max_margin"])
    expected = 2 * hand_ce(hand_ldam_rows(hand_mean_logits(LOGITS), TARGETS, margins, SCALE), TARGETS, None)
    assert loss_fn(logits, targets).item() == pytest.approx(expected, rel=1e-5)


def hand_ride_gradient(active: bool, diversity_factor: float) -> np.ndarray:
    """d loss / d z[b, e, c] for the individual LDAM RIDE loss, derived by hand with the KL target held fixed."""
    margins = hand_margins(COUNTS, TINY_CFG["max_margin"])
    weights = hand_weights(COUNTS, TINY_CFG["drw_beta"]) if active else [1.0] * len(COUNTS)
    eta = TINY_CFG["diversity_temperature"]
    temps = hand_temperatures(COUNTS, TINY_CFG["reweight_factor"], eta) if active else [eta] * len(COUNTS)
    t_mean = sum(temps) / len(temps)
    mean_rows = hand_mean_logits(LOGITS)
    batch = len(LOGITS)
    weight_sum = sum(weights[y] for y in TARGETS)
    grad = np.zeros((batch, 2, len(COUNTS)))
    for b, y in enumerate(TARGETS):
        target_dist = hand_softmax([v / t for v, t in zip(mean_rows[b], temps, strict=True)])
        for e in range(2):
            row = LOGITS[b][e]
            p_margin = hand_softmax(hand_ldam_rows([row], [y], margins, SCALE)[0])
            p_tempered = hand_softmax([v / t for v, t in zip(row, temps, strict=True)])
            for c in range(len(COUNTS)):
                base = weights[y] * (p_margin[c] - (1.0 if c == y else 0.0)) / weight_sum
                kl = (p_tempered[c] - target_dist[c]) / temps[c] / batch
                grad[b, e, c] = base + diversity_factor * t_mean**2 * kl
    return grad


@pytest.mark.parametrize("epoch", [1, DRW_EPOCH + 1])
def test_ride_gradient_matches_detached_target_derivation(epoch: int) -> None:
    loss_fn = tiny_loss(kind="ride", diversity_factor=-0.45)
    loss_fn.set_epoch(epoch)
    logits, targets = tiny_batch()
    logits.requires_grad_(True)
    loss_fn(logits, targets).backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad.abs().sum(dim=(0, 2)) > 0).all(), "every expert must receive gradient"
    expected = hand_ride_gradient(active=epoch > DRW_EPOCH, diversity_factor=-0.45)
    np.testing.assert_allclose(logits.grad.numpy(), expected, rtol=1e-4, atol=1e-6)


def autograd_node_names(output: torch.Tensor) -> set[str]:
    names: set[str] = set()
    seen: set[int] = set()
    alive = []  # keeps visited nodes referenced so their ids cannot be reused during the walk
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        alive.append(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_kl_target_is_outside_the_graph() -> None:
    # Gradient values cannot show the detach: when the target is softmax of the arithmetic mean of the same logits,
    # the gradient through the target sums to a per-row constant that the softmax Jacobian annihilates. So check the
    # graph itself: the only softmax in the loss is the target's, and it must not be recorded.
    loss_fn = tiny_loss(kind="ride", diversity_factor=-0.45)
    loss_fn.set_epoch(DRW_EPOCH + 1)
    logits, targets = tiny_batch()
    value = loss_fn(logits.requires_grad_(True), targets)
    names = autograd_node_names(value)
    assert "LogSoftmaxBackward0" in names, "sanity: the graph walk sees the student side"
    assert "SoftmaxBackward0" not in names


def test_single_expert_has_zero_diversity_term() -> None:
    # With one expert the ensemble is the expert itself: target and student must be tempered the same way, so the
    # KL vanishes whatever λ is.
    loss_with = tiny_loss(kind="ride", diversity_factor=-5.0)
    loss_without = tiny_loss(kind="ride", diversity_factor=0.0)
    one_expert = torch.tensor(LOGITS)[:, :1]
    targets = torch.tensor(TARGETS)
    for fn in (loss_with, loss_without):
        fn.set_epoch(DRW_EPOCH + 1)
    assert loss_with(one_expert, targets).item() == pytest.approx(loss_without(one_expert, targets).item(), abs=1e-6)


# ---- single-head kinds -------------------------------------------------------------------------------------------


def test_ldam_margin_is_applied_only_to_true_class() -> None:
    loss_fn = tiny_loss(kind="ldam")
    loss_fn.set_epoch(1)
    logits, targets = tiny_batch()
    margins = hand_margins(COUNTS, TINY_CFG["max_margin"])
    mean_rows = hand_mean_logits(LOGITS)
    expected = hand_ce(hand_ldam_rows(mean_rows, TARGETS, margins, SCALE), TARGETS, None)
    value = loss_fn(logits, targets).item()
    assert value == pytest.approx(expected, rel=1e-5)
    # Shifting every logit would leave CE unchanged; shifting the others would lower it.
    assert value > hand_ce(mean_rows, TARGETS, None) + 1e-3


def test_ldam_with_drw_weights_after_activation() -> None:
    loss_fn = tiny_loss(kind="ldam")
    loss_fn.set_epoch(DRW_EPOCH + 1)
    logits, targets = tiny_batch()
    margins = hand_margins(COUNTS, TINY_CFG["max_margin"])
    weights = hand_weights(COUNTS, TINY_CFG["drw_beta"])
    expected = hand_ce(hand_ldam_rows(hand_mean_logits(LOGITS), TARGETS, margins, SCALE), TARGETS, weights)
    assert loss_fn(logits, targets).item() == pytest.approx(expected, rel=1e-5)


def test_weighted_ce_divides_by_sum_of_target_weights() -> None:
    loss_fn = tiny_loss(kind="ce")
    loss_fn.set_epoch(DRW_EPOCH + 1)
    logits, targets = tiny_batch()
    weights = hand_weights(COUNTS, TINY_CFG["drw_beta"])
    mean_rows = hand_mean_logits(LOGITS)
    nll = [-hand_log_softmax(row)[y] for row, y in zip(mean_rows, TARGETS, strict=True)]
    by_weight_sum = sum(weights[y] * n for y, n in zip(TARGETS, nll, strict=True)) / sum(weights[y] for y in TARGETS)
    by_batch_size = sum(weights[y] * n for y, n in zip(TARGETS, nll, strict=True)) / len(TARGETS)
    value = loss_fn(logits, targets).item()
    assert value == pytest.approx(by_weight_sum, rel=1e-5)
    assert abs(value - by_batch_size) > 1e-2


def test_ce_ignores_weights_before_drw_and_when_drw_is_off() -> None:
    logits, targets = tiny_batch()
    unweighted = hand_ce(hand_mean_logits(LOGITS), TARGETS, None)
    before = tiny_loss(kind="ce")
    before.set_epoch(DRW_EPOCH)
    off = tiny_loss(kind="ce", drw=False)
    off.set_epoch(1000)
    assert not off.drw_active
    assert before(logits, targets).item() == pytest.approx(unweighted, rel=1e-5)
    assert off(logits, targets).item() == pytest.approx(unweighted, rel=1e-5)


@pytest.mark.parametrize("epoch", [1, DRW_EPOCH + 1])
def test_focal_with_gamma_zero_equals_ce(epoch: int) -> None:
    logits, targets = tiny_batch()
    focal = tiny_loss(kind="focal", focal_gamma=0.0)
    ce = tiny_loss(kind="ce")
    focal.set_epoch(epoch)
    ce.set_epoch(epoch)
    assert focal(logits, targets).item() == pytest.approx(ce(logits, targets).item(), rel=1e-6)


@pytest.mark.parametrize("epoch", [1, DRW_EPOCH + 1])
def test_focal_matches_hand_computation(epoch: int) -> None:
    loss_fn = tiny_loss(kind="focal", focal_gamma=2.0)
    loss_fn.set_epoch(epoch)
    logits, targets = tiny_batch()
    active = epoch > DRW_EPOCH
    weights = hand_weights(COUNTS, TINY_CFG["drw_beta"]) if active else [1.0] * len(COUNTS)
    numerator = denominator = 0.0
    for row, y in zip(hand_mean_logits(LOGITS), TARGETS, strict=True):
        p = hand_softmax(row)[y]
        numerator += weights[y] * (1 - p) ** 2 * -math.log(p)
        denominator += weights[y]
    assert loss_fn(logits, targets).item() == pytest.approx(numerator / denominator, rel=1e-5)


def test_focal_gradient_stays_finite_when_confident() -> None:
    loss_fn = tiny_loss(kind="focal", focal_gamma=0.5)
    loss_fn.set_epoch(1)
    logits = torch.tensor([[[60.0, 0.0, 0.0, 0.0]]], requires_grad=True)
    loss_fn(logits, torch.tensor([0])).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


# ---- distillation ------------------------------------------------------------------------------------------------


def test_distillation_loss_matches_hand_computation() -> None:
    student = [[1.0, -0.5, 0.3, 2.0], [0.2, 0.8, -1.0, 0.5]]
    teacher = [[0.4, 0.1, -0.2, 1.4], [-0.6, 1.2, 0.3, 0.0]]
    tau = 1.5
    expected = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        p = hand_softmax([v / tau for v in t_row])
        log_q = hand_log_softmax([v / tau for v in s_row])
        expected += sum(pc * (math.log(pc) - lq) for pc, lq in zip(p, log_q, strict=True))
    expected = tau**2 * expected / len(student)
    teacher_t = torch.tensor(teacher, requires_grad=True)
    student_t = torch.tensor(student, requires_grad=True)
    value = distillation_loss(student_t, teacher_t, tau)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    value.backward()
    assert teacher_t.grad is None, "the teacher must be detached"
    assert student_t.grad is not None and student_t.grad.abs().sum() > 0


def test_distillation_loss_is_zero_for_identical_logits() -> None:
    logits = torch.tensor(LOGITS).mean(dim=1)
    assert distillation_loss(logits, logits.clone(), 1.5).item() == pytest.approx(0.0, abs=1e-6)


# ---- state, devices, dtypes, validation --------------------------------------------------------------------------


def test_drw_state_is_derived_from_epoch_only() -> None:
    loss_fn = tiny_loss(kind="ride")
    assert not loss_fn.drw_active
    assert loss_fn.state_dict() == {}
    loss_fn.set_epoch(DRW_EPOCH + 1)
    assert loss_fn.drw_active and loss_fn.epoch == DRW_EPOCH + 1
    temperature, temperature_mean = loss_fn.temperature()
    assert isinstance(temperature, torch.Tensor) and temperature.shape == (1, 4)
    assert temperature_mean == pytest.approx(sum(hand_temperatures(COUNTS, 0.3, 1.5)) / 4, rel=1e-6)
    loss_fn.set_epoch(DRW_EPOCH)
    assert not loss_fn.drw_active
    assert loss_fn.temperature() == (1.5, 1.5)
    with pytest.raises(ValueError, match="1-based"):
        loss_fn.set_epoch(0)


def test_buffers_follow_to() -> None:
    loss_fn = tiny_loss(kind="ride").to(torch.device("meta"))
    assert {buf.device.type for buf in loss_fn.buffers()} == {"meta"}
    assert len(list(loss_fn.buffers())) == 3


def test_bfloat16_logits_give_float32_loss() -> None:
    loss_fn = tiny_loss(kind="ride")
    loss_fn.set_epoch(DRW_EPOCH + 1)
    logits, targets = tiny_batch()
    low = logits.to(torch.bfloat16)
    value = loss_fn(low, targets)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(loss_fn(low.float(), targets).item(), rel=1e-6)


def test_rejects_wrong_shapes() -> None:
    loss_fn = tiny_loss(kind="ride")
    logits, targets = tiny_batch()
    with pytest.raises(ValueError, match=r"\[B, E, 4\]"):
        loss_fn(logits.mean(dim=1), targets)
    with pytest.raises(ValueError, match=r"\[B, E, 4\]"):
        loss_fn(logits[..., :3], targets)
    with pytest.raises(ValueError, match="targets"):
        loss_fn(logits, targets[:2])
