"""Self-distillation (the paper's appendix A.2): train a student RIDE model with the help of a frozen teacher.

``python -m training.run distill --teacher DIR --config FILE`` runs the stage-1 loop (:func:`training.train.train`)
with one extra term per batch::

    L = L_stage1(student expert logits, y) + factor · τ² · KL(softmax(t̄ / τ) ‖ softmax(s̄ / τ))

with t̄ and s̄ the teacher's and the student's **mean** logits over their experts, τ = ``distill.temperature``
(1.5) and ``factor`` = ``distill.factor`` (1.0), on the same augmented batch.

Which reading (../shared/REFERENCE-RIDE.md 4.5, trap 18) and why:

- KD on the **mean** logits, as the reference code does, not the paper's per-expert KD: the student is used
  (and served) through its mean and running means, and pulling every expert towards the same teacher
  distribution would work against the diversity term that keeps the experts apart.
- Without the reference's extra factor E: the reference adds RIDE loss + KD inside its loop over experts, so its
  whole loss is E × (RIDE + KD). Its KD : RIDE ratio (1 : 1) is kept; the overall ×E is not, because it only acts
  as an E-times larger learning rate next to an unscaled weight decay, which would make the distilled run's
  optimisation differ from stage 1 at the same ``optim`` settings.
- The teacher runs in **eval mode** under ``no_grad`` (frozen weights and batch-norm statistics), as the issue
  asks; the reference leaves it in train mode (batch statistics, drifting running statistics), which makes its
  targets depend on the batch and silently changes the teacher. Deterministic targets are the point of KD here.
- A teacher with as many or fewer experts than the student is allowed with a warning (born-again style
  self-distillation is legitimate, but the paper's use is a larger teacher); a teacher whose classes or input
  (size, mean, std) differ from the student's is an error.

The student checkpoint has ``stage = "distilled"`` and ``parent`` = the teacher's weights sha256.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from training.checkpoint import CheckpointMeta, check_same_classes, model_from_checkpoint, weights_sha256
from training.config import ConfigError, TrainConfig
from training.losses import distillation_loss
from training.metrics import DistillationRecord
from training.models import RIDEModel


@dataclass
class Teacher:
    """A frozen eval-mode teacher and how its knowledge enters the student's loss."""

    model: RIDEModel
    meta: CheckpointMeta
    folder: Path
    sha256: str
    temperature: float
    factor: float

    def check_classes(self, class_names: list[str]) -> None:
        """Raise DataError unless the student's classes are the teacher's, in the same order."""
        check_same_classes(self.meta, class_names, f"the student's data (teacher {self.folder})")

    @torch.no_grad()
    def mean_logits(self, images: Tensor) -> Tensor:
        """The teacher's mean expert logits ``[B, C]`` (float32) on normalised ``images``."""
        return self.model(images).logits.float().mean(dim=1)

    def kd_loss(self, student_logits: Tensor, teacher_mean: Tensor) -> Tensor:
        """``factor · τ² · KL(teacher mean ‖ student mean)`` for student expert logits ``[B, E, C]``."""
        return self.factor * distillation_loss(student_logits.float().mean(dim=1), teacher_mean, self.temperature)

    def describe(self) -> DistillationRecord:
        """What the student's metrics record about its teacher."""
        return DistillationRecord(
            teacher=str(self.folder),
            teacher_sha256=self.sha256,
            teacher_experts=self.meta.model.num_experts,
            temperature=self.temperature,
            factor=self.factor,
            reading="KD on mean logits (reference), no x E factor, teacher in eval mode",
        )


def load_teacher(folder: Path, cfg: TrainConfig, device: torch.device | None = None) -> Teacher:
    """Load the teacher checkpoint for the student config ``cfg`` (frozen, eval mode, optionally on ``device``)."""
    folder = Path(folder)
    model, meta, _ = model_from_checkpoint(folder)
    if not meta.complete:
        raise ConfigError(f"the teacher {folder} is an unfinished run (epoch {meta.epoch} of {meta.epochs})")
    student_input = (cfg.data.image_size, tuple(cfg.data.mean), tuple(cfg.data.std))
    teacher_input = (meta.input.image_size, tuple(meta.input.mean), tuple(meta.input.std))
    if student_input != teacher_input:
        raise ConfigError(
            f"the teacher expects input (size, mean, std) {teacher_input} but the student is trained on "
            f"{student_input}: both must see the same normalised images"
        )
    if meta.model.num_experts <= cfg.model.num_experts:
        warnings.warn(
            f"the teacher has {meta.model.num_experts} experts and the student {cfg.model.num_experts}: "
            "self-distillation usually distils a larger teacher into a smaller student",
            stacklevel=2,
        )
    model.requires_grad_(False)
    model.eval()
    if device is not None:
        model.to(device)
    return Teacher(model, meta, folder, weights_sha256(folder), cfg.distill.temperature, cfg.distill.factor)
