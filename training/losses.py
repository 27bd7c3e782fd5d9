"""Training losses: CE, focal, LDAM(-DRW), the RIDE multi-expert loss and logit distillation.

Every loss takes the model's expert logits ``[B, E, C]``: already scaled (the cosine classifier multiplies by s
inside the model, ../shared/REFERENCE-RIDE.md 2.2), and the ensemble prediction is their mean over dim 1. The
class-count derived vectors (LDAM margins, DRW weights, diversity temperatures) are non-persistent buffers of
:class:`ExpertLoss`, so ``.to(device)`` moves them and a state dict stays empty: which of them are in use is
derived from the epoch alone (:meth:`ExpertLoss.set_epoch`).

Losses are computed in float32 whatever the logits' dtype, so bfloat16 autocast outputs mix safely with the
float32 buffers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.config import LossConfig


def _counts_tensor(class_counts: Sequence[int]) -> Tensor:
    counts = torch.as_tensor(list(class_counts), dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError("class_counts must be a non-empty sequence of per-class training counts")
    if bool((counts < 1).any()):
        empty = [i for i, n in enumerate(counts.tolist()) if n < 1]
        raise ValueError(f"every class needs at least one training image; empty classes: {empty}")
    return counts


def ldam_margins(class_counts: Sequence[int], max_margin: float = 0.5) -> Tensor:
    """LDAM per-class margins ``m_c ∝ n_c^{-1/4}``, rescaled so the rarest class gets ``max_margin``.

    Margins are in cosine units (../shared/REFERENCE-RIDE.md 4.1). Returns float32 ``[C]``.
    """
    if max_margin <= 0:
        raise ValueError(f"max_margin must be positive, got {max_margin}")
    margins = _counts_tensor(class_counts).pow(-0.25)
    return (margins * (max_margin / margins.max())).float()


def drw_weights(class_counts: Sequence[int], beta: float = 0.9999) -> Tensor:
    """Class-balanced "effective number" weights ``(1-β)/(1-β^{n_c})``, normalised to sum to C.

    Returns float32 ``[C]`` (../shared/REFERENCE-RIDE.md 4.2).
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    counts = _counts_tensor(class_counts)
    weights = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
    return (weights * (counts.numel() / weights.sum())).float()


def diversity_temperatures(
    class_counts: Sequence[int], reweight_factor: float = 0.05, base_temperature: float = 1.0
) -> Tensor:
    """Per-class (logit-column) diversity temperatures ``T = η·ψ/max ψ`` with ``ψ_c = γ·C·n_c/N + (1-γ)``.

    This is the code's multiplicative form, not the paper's additive one (../shared/REFERENCE-RIDE.md 4.3). Returns
    float32 ``[C]``; the head class gets ``base_temperature``.
    """
    if not 0.0 <= reweight_factor <= 1.0:
        raise ValueError(f"reweight_factor must be in [0, 1], got {reweight_factor}")
    if base_temperature <= 0:
        raise ValueError(f"base_temperature must be positive, got {base_temperature}")
    counts = _counts_tensor(class_counts)
    psi = reweight_factor * counts.numel() * counts / counts.sum() + (1.0 - reweight_factor)
    return (base_temperature * psi / psi.max()).float()


def _weighted_mean(per_sample: Tensor, targets: Tensor, weights: Tensor | None) -> Tensor:
    # PyTorch's weighted cross-entropy semantics: divide by the batch's sum of target weights, not by B.
    if weights is None:
        return per_sample.mean()
    w = weights[targets]
    return (per_sample * w).sum() / w.sum()


def _cross_entropy(logits: Tensor, targets: Tensor, weights: Tensor | None) -> Tensor:
    return F.cross_entropy(logits, targets, weight=weights)


def _focal(logits: Tensor, targets: Tensor, weights: Tensor | None, gamma: float) -> Tensor:
    log_p = F.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
    # expm1 keeps 1-p accurate near p=1; the floor keeps the gradient of (1-p)^γ finite for 0 < γ < 1.
    one_minus_p = (-torch.expm1(log_p)).clamp_min(1e-12)
    return _weighted_mean(one_minus_p.pow(gamma) * -log_p, targets, weights)


def _apply_margin(logits: Tensor, targets: Tensor, margins: Tensor, scale: float) -> Tensor:
    # Only the true-class logit moves; the margin is in cosine units and the logits are already ×s.
    shift = F.one_hot(targets, logits.shape[-1]).to(logits.dtype) * (scale * margins[targets])[:, None]
    return logits - shift


def distillation_loss(student_mean_logits: Tensor, teacher_mean_logits: Tensor, temperature: float) -> Tensor:
    """``τ²·KL(softmax(teacher/τ) ‖ softmax(student/τ))``, batch-mean, on ``[B, C]`` mean logits.

    The teacher is detached. The reference adds this inside its loop over experts (so the whole loss is E× larger,
    ../shared/REFERENCE-RIDE.md 4.5); this function is the single term, the caller decides the factor.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_mean_logits.shape != teacher_mean_logits.shape or student_mean_logits.ndim != 2:
        raise ValueError(
            "student and teacher logits must both be [B, C], got "
            f"{tuple(student_mean_logits.shape)} and {tuple(teacher_mean_logits.shape)}"
        )
    student = F.log_softmax(student_mean_logits.float() / temperature, dim=1)
    teacher = F.softmax(teacher_mean_logits.detach().float() / temperature, dim=1)
    return temperature * temperature * F.kl_div(student, teacher, reduction="batchmean")


class ExpertLoss(nn.Module):
    """Training loss over expert logits ``[B, E, C]``; build it with :func:`build_loss`.

    Kinds (``LossConfig.kind``):

    - ``"ce"``: cross-entropy on the mean logits.
    - ``"focal"``: focal loss on the mean logits, ``w_y·(1-p_y)^γ·(-log p_y)`` averaged like weighted CE (divided
      by Σ w_y), so γ = 0 is exactly CE. The LDAM-DRW reference instead uses ``p = exp(-w_y·CE)`` and divides by B;
      with DRW weights the two differ.
    - ``"ldam"``: LDAM on the mean logits: ``scale·m_y`` is subtracted from the true-class logit, then CE. The
      margin is in cosine units and the logits arrive already multiplied by the cosine scale s, so pass
      ``scale = s`` for a cosine classifier (the reference's ``x - s·m_y`` with s = 30) and ``scale = 1`` for a
      linear classifier (margin in logit units).
    - ``"ride"``: the reference RIDELoss (../shared/REFERENCE-RIDE.md 4.3-4.4), summed — not averaged — over experts::

          L = Σ_e [ base(z_e, y; w_DRW) + λ·T̄²·KL(softmax(z̄/T) ‖ softmax(z_e/T)) ]

      with ``base`` = LDAM-CE (``cfg.base == "ldam"``) or CE (``"ce"``; unlike the reference, which never weights
      this path, DRW weights apply to it too), z̄ the expert mean, the KL target computed without gradient, T the
      per-column temperature vector once active (else the scalar η) and T̄ its mean. **Departure from the
      reference:** there, λ == 0 silently switches to the collaborative loss (issue #7). Here
      ``cfg.collaborative`` is its own switch — when set, every expert's classification term uses z̄
      (``E × base(z̄)``) — and λ = 0 with ``collaborative = False`` is the individual loss without diversity.

    DRW weights (and, for ``"ride"``, the temperature vector) are active iff ``cfg.drw`` and ``epoch > drw_epoch``
    (1-based epochs, :meth:`set_epoch`). The state is the plain attributes ``epoch`` and ``drw_active``; the class
    vectors are non-persistent buffers, so ``state_dict()`` is empty and ``.to(device)`` moves them.
    """

    margins: Tensor
    class_weights: Tensor
    temperatures: Tensor

    def __init__(self, cfg: LossConfig, class_counts: Sequence[int], scale: float, drw_epoch: int) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.kind = cfg.kind
        self.base = cfg.base
        self.scale = float(scale)
        self.focal_gamma = cfg.focal_gamma
        self.use_drw = cfg.drw
        self.drw_epoch = int(drw_epoch)
        self.diversity_factor = cfg.diversity_factor
        self.base_temperature = cfg.diversity_temperature
        self.collaborative = cfg.collaborative
        self.num_classes = len(class_counts)
        self.register_buffer("margins", ldam_margins(class_counts, cfg.max_margin), persistent=False)
        self.register_buffer("class_weights", drw_weights(class_counts, cfg.drw_beta), persistent=False)
        temperatures = diversity_temperatures(class_counts, cfg.reweight_factor, cfg.diversity_temperature)
        self.register_buffer("temperatures", temperatures, persistent=False)
        # A Python float, computed once on the CPU, so the training step never syncs with the device for it.
        self.temperature_mean_active = float(temperatures.double().mean())
        self.epoch = 0
        self.drw_active = False

    def set_epoch(self, epoch: int) -> None:
        """Enter 1-based ``epoch``: DRW weights and temperatures are active iff ``drw`` and ``epoch > drw_epoch``."""
        if epoch < 1:
            raise ValueError(f"epochs are 1-based, got {epoch}")
        self.epoch = int(epoch)
        self.drw_active = self.use_drw and self.epoch > self.drw_epoch

    def active_weights(self) -> Tensor | None:
        """The DRW class weights in use now (None before activation)."""
        return self.class_weights if self.drw_active else None

    def temperature(self) -> tuple[Tensor | float, float]:
        """The diversity temperature in use now and its mean T̄: ``([1, C] vector, mean)`` or ``(η, η)``."""
        if self.drw_active:
            return self.temperatures[None, :], self.temperature_mean_active
        return self.base_temperature, self.base_temperature

    def forward(self, expert_logits: Tensor, targets: Tensor) -> Tensor:
        """Scalar loss for expert logits ``[B, E, C]`` and integer targets ``[B]``."""
        self._check_inputs(expert_logits, targets)
        logits = expert_logits.float()
        mean_logits = logits.mean(dim=1)
        weights = self.active_weights()
        if self.kind == "ce":
            return _cross_entropy(mean_logits, targets, weights)
        if self.kind == "focal":
            return _focal(mean_logits, targets, weights, self.focal_gamma)
        if self.kind == "ldam":
            return _cross_entropy(_apply_margin(mean_logits, targets, self.margins, self.scale), targets, weights)
        return self._ride(logits, mean_logits, targets, weights)

    def _base(self, logits: Tensor, targets: Tensor, weights: Tensor | None) -> Tensor:
        if self.base == "ldam":
            logits = _apply_margin(logits, targets, self.margins, self.scale)
        return _cross_entropy(logits, targets, weights)

    def _ride(self, logits: Tensor, mean_logits: Tensor, targets: Tensor, weights: Tensor | None) -> Tensor:
        num_experts = logits.shape[1]
        if self.collaborative:
            loss = num_experts * self._base(mean_logits, targets, weights)
        else:
            loss = sum(self._base(logits[:, e], targets, weights) for e in range(num_experts))
        if self.diversity_factor == 0:
            return loss
        temperature, temperature_mean = self.temperature()
        with torch.no_grad():
            # Reference behaviour: the target (which includes expert e) carries no gradient. With z̄ the plain mean
            # of these same logits, the gradient through it would cancel anyway; detaching saves that work.
            target_dist = F.softmax(mean_logits / temperature, dim=1)
        divergence = sum(
            F.kl_div(F.log_softmax(logits[:, e] / temperature, dim=1), target_dist, reduction="batchmean")
            for e in range(num_experts)
        )
        return loss + self.diversity_factor * temperature_mean**2 * divergence

    def _check_inputs(self, expert_logits: Tensor, targets: Tensor) -> None:
        if expert_logits.ndim != 3 or expert_logits.shape[-1] != self.num_classes:
            raise ValueError(f"expert logits must be [B, E, {self.num_classes}], got {tuple(expert_logits.shape)}")
        if targets.shape != expert_logits.shape[:1]:
            raise ValueError(f"targets must be [B] = [{expert_logits.shape[0]}], got {tuple(targets.shape)}")

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, base={self.base!r}, classes={self.num_classes}, scale={self.scale}, "
            f"drw={self.use_drw}, drw_epoch={self.drw_epoch}, diversity_factor={self.diversity_factor}, "
            f"collaborative={self.collaborative}"
        )


def build_loss(cfg: LossConfig, class_counts: Sequence[int], scale: float, drw_epoch: int) -> ExpertLoss:
    """Build the training loss; call ``set_epoch`` before each epoch.

    ``scale`` is the factor the model already applied to its logits (the cosine scale s, or 1 for a linear
    classifier); LDAM margins are multiplied by it. ``drw_epoch`` is usually :func:`training.schedule.drw_epoch`.
    """
    return ExpertLoss(cfg, class_counts, scale, drw_epoch)
