"""Long-tailed subsets exactly as the reference builds them (../shared/REFERENCE-RIDE.md 1.1, 1.2)."""

from __future__ import annotations

from typing import Literal

import numpy as np

Profile = Literal["exp", "step", "none"]


def longtail_counts(
    num_per_class: list[int] | int, num_classes: int, profile: Profile, imbalance_factor: float
) -> list[int]:
    """Images kept per class, in class order.

    ``img_max`` is the training-set size over ``num_classes``, as in the reference; ``int()`` truncates (trap 1).
    With an int ``num_per_class`` every class holds that many images. A class never keeps more images than it
    has (only matters for unbalanced folders; on balanced data the reference counts come out unchanged).
    """
    available = [num_per_class] * num_classes if isinstance(num_per_class, int) else list(num_per_class)
    if len(available) != num_classes:
        raise ValueError(f"num_per_class has {len(available)} entries for {num_classes} classes")
    img_max = sum(available) / num_classes
    # The reference multiplies by imb_factor = 1/ratio; compute it the same way so floats truncate identically.
    ratio = 1.0 / imbalance_factor
    if profile == "exp":
        last = max(num_classes - 1, 1)
        counts = [int(img_max * ratio ** (c / last)) for c in range(num_classes)]
    elif profile == "step":
        half = num_classes // 2
        counts = [int(img_max)] * half + [int(img_max * ratio)] * (num_classes - half)
    elif profile == "none":
        counts = list(available)
    else:
        raise ValueError(f"unknown imbalance profile '{profile}'; expected exp, step or none")
    return [min(n, have) for n, have in zip(counts, available, strict=True)]


def select_longtail(labels: np.ndarray, counts: list[int], seed: int) -> np.ndarray:
    """Indices of the kept samples: class-contiguous, each class in its shuffled order.

    A local legacy ``RandomState`` gives the same stream as the reference's ``np.random.seed(seed)`` without
    touching the global NumPy RNG. Every class is shuffled, even one that keeps everything, so the stream
    advances exactly as in the reference.
    """
    rs = np.random.RandomState(seed)
    labels = np.asarray(labels)
    kept = []
    for c, n in enumerate(counts):
        idx = np.where(labels == c)[0]
        rs.shuffle(idx)
        kept.append(idx[:n])
    return np.concatenate(kept).astype(np.int64) if kept else np.zeros(0, dtype=np.int64)
