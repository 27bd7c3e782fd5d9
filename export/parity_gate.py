"""The parity gate of an int8 model: its cascade against the float32 one on held-out validation images.

Both cascades run the one decision rule (`cascade.run_cascade`) at the manifest's default threshold on the same
images, so what differs is the quantized graphs, through the predictions and through the exits they move. The
gate reports top-1 agreement, the accuracy of each and their difference in percentage points, and the mean
experts used by each; it passes when int8 loses at most ``max_accuracy_drop_points`` of accuracy.

The validation split (``data.val_per_class`` images per class held out of the training data) is small, so one
image is worth 100 / n points: with 200 images, 0.5 points. The report states n beside every figure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cascade import CascadeGraphs, CascadeResult, run_cascade
from export.manifest import ParityGate

DEFAULT_MAX_ACCURACY_DROP = 0.5  # percentage points


@dataclass(frozen=True)
class GateReport:
    """The figures of one parity gate; ``passed`` when the accuracy drop is within the bound."""

    num_images: int
    threshold: float
    top1_agreement: float
    float32_accuracy: float
    int8_accuracy: float
    accuracy_change_points: float  # int8 minus float32
    float32_mean_experts: float
    int8_mean_experts: float
    max_accuracy_drop_points: float
    float32_correct: int
    int8_correct: int

    @property
    def passed(self) -> bool:
        # Judged on counts, so that a drop of exactly the bound (one image of 200 at 0.5) is not lost to rounding.
        drop = 100.0 * (self.float32_correct - self.int8_correct)
        return drop <= self.max_accuracy_drop_points * self.num_images

    @property
    def experts_change(self) -> float:
        return self.int8_mean_experts - self.float32_mean_experts

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def to_manifest(self) -> ParityGate:
        fields = {name: value for name, value in asdict(self).items() if not name.endswith("_correct")}
        return ParityGate(**fields)

    def summary(self) -> str:
        return "\n".join(
            [
                f"int8 parity gate on {self.num_images} validation images (threshold {self.threshold:g}): "
                f"{'passed' if self.passed else 'FAILED'}",
                f"  top-1 agreement with float32 {100 * self.top1_agreement:.2f} %",
                f"  accuracy {100 * self.float32_accuracy:.2f} % (float32) -> {100 * self.int8_accuracy:.2f} % (int8): "
                f"{self.accuracy_change_points:+.2f} points (a drop of at most {self.max_accuracy_drop_points:g} "
                f"allowed; one image is {100 / self.num_images:.2f} points)",
                f"  mean experts used {self.float32_mean_experts:.3f} -> {self.int8_mean_experts:.3f} "
                f"({self.experts_change:+.3f})",
            ]
        )


def judge(
    float32: CascadeResult,
    int8: CascadeResult,
    labels: np.ndarray,
    *,
    threshold: float,
    max_accuracy_drop_points: float = DEFAULT_MAX_ACCURACY_DROP,
) -> GateReport:
    """Compare the two cascades' results on the same labelled images."""
    n = len(labels)
    if n == 0:
        raise ValueError("the parity gate needs at least one validation image")
    predicted_32, predicted_8 = float32.logits.argmax(axis=1), int8.logits.argmax(axis=1)
    correct_32, correct_8 = int(np.sum(predicted_32 == labels)), int(np.sum(predicted_8 == labels))
    return GateReport(
        num_images=n,
        threshold=threshold,
        top1_agreement=float(np.mean(predicted_32 == predicted_8)),
        float32_accuracy=correct_32 / n,
        int8_accuracy=correct_8 / n,
        accuracy_change_points=100.0 * (correct_8 - correct_32) / n,
        float32_mean_experts=float(float32.experts_used.mean()),
        int8_mean_experts=float(int8.experts_used.mean()),
        max_accuracy_drop_points=max_accuracy_drop_points,
        float32_correct=correct_32,
        int8_correct=correct_8,
    )


def run_gate(
    float32: CascadeGraphs,
    int8: CascadeGraphs,
    float32_inputs: np.ndarray,
    int8_images: np.ndarray,
    labels: np.ndarray,
    *,
    threshold: float,
    max_accuracy_drop_points: float = DEFAULT_MAX_ACCURACY_DROP,
) -> GateReport:
    """Run both cascades at ``threshold`` with every expert allowed and judge them. ``float32_inputs`` are what
    the float32 graphs take (images, or row numbers for a PyTorch replay); ``int8_images`` normalised images."""
    limit = int8.num_experts
    reference = run_cascade(float32, float32_inputs, thresholds=threshold, max_experts=limit)
    candidate = run_cascade(int8, int8_images, thresholds=threshold, max_experts=limit)
    return judge(reference, candidate, labels, threshold=threshold, max_accuracy_drop_points=max_accuracy_drop_points)
