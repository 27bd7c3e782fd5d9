"""The evaluation report of a checkpoint, typed: what ``metrics.json`` and the sidecar's ``metrics`` hold.

Evaluation writes it, stage 2 and distillation add their records, the exporter copies the headline numbers into
the manifest. Reading it by attribute means a renamed or missing field fails when the checkpoint is loaded, not
when some later step looks a key up. Fields renamed since checkpoints were first written still load under
their old names (``shared`` is the trunk, ``macs_all_experts_and_routers`` the full ensemble).
"""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _OmitsAbsent(_Record):
    """A record whose optional parts are left out of its JSON when absent, rather than written as null (a stage-1
    run has no "routed" section and no router MACs)."""

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class GroupNumbers(_Record):
    """One number per many / medium / few-shot group (None for an empty group)."""

    many: float | None
    medium: float | None
    few: float | None


class AccuracyMetrics(_Record):
    """Accuracy overall (per sample) and per group (mean of the per-class accuracies in it)."""

    top1: float
    groups: GroupNumbers
    per_class: dict[str, float]
    confusion_matrix: list[list[int]] = Field(description="[true class][predicted class] counts.")


class AllExpertsMetrics(AccuracyMetrics):
    """The all-experts ensemble, and every expert alone."""

    per_expert_top1: list[float]


class MacsPerImage(_OmitsAbsent):
    trunk: int = Field(validation_alias=AliasChoices("trunk", "shared"))
    experts: list[int]
    total: int = Field(description="Trunk and every expert, no router.")
    routers: list[int] | None = None


class CostMetrics(_Record):
    parameters: int
    macs_per_image: MacsPerImage


class RoutedMetrics(AccuracyMetrics):
    """The early-exit cascade at ``threshold``: accuracy, experts used and MACs spent (groups of the true class)."""

    threshold: float
    max_experts: int
    mean_experts_used: float
    mean_experts_used_per_group: GroupNumbers
    experts_used_histogram: dict[str, list[float] | None] = Field(description="overall and per group: shares.")
    experts_used_counts: dict[str, list[int]] = Field(description="overall and per group: images using 1..E.")
    mean_macs_per_image: float
    mean_macs_per_image_per_group: GroupNumbers
    full_ensemble_macs: int = Field(validation_alias=AliasChoices("full_ensemble_macs", "macs_all_experts_and_routers"))
    relative_compute: float
    relative_compute_vs_plain_model: float


class TrainingRecord(_Record):
    epochs: int
    last_epoch_log: dict[str, Any] | None


class DistillationRecord(_Record):
    teacher: str
    teacher_sha256: str
    teacher_experts: int
    temperature: float
    factor: float
    reading: str


class RouterTrainingRecord(_Record):
    lr_schedule: str
    sampler: str
    augmentation: str
    epochs: int
    last_epoch_log: dict[str, Any]


class ValidationRecord(_Record):
    """The split stage 2 chose its threshold on."""

    split: str
    per_class: int
    held_out_from_stage1: bool
    num_images: int | None = None


class ThresholdSelection(_Record):
    source: str
    validation_point: dict[str, Any] | None = Field(description="The chosen point of the validation curve.")
    curve_csv: str
    curve_png: str


class CheckpointMetrics(_OmitsAbsent):
    """The test-split evaluation, plus the records of the stages that produced the checkpoint."""

    split: str
    num_images: int
    all_experts: AllExpertsMetrics
    cost: CostMetrics
    routed: RoutedMetrics | None = None
    training: TrainingRecord | None = None
    distillation: DistillationRecord | None = None
    router_training: RouterTrainingRecord | None = None
    validation: ValidationRecord | None = None
    threshold_selection: ThresholdSelection | None = None
