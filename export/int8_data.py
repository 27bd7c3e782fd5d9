"""The images of an int8 export: calibration from the training split, the parity gate from the validation split.

Both come from the training run's own data recipe (`training.data.load_data` with the run's ``data`` config), and
the split is checked against the model's: the same classes and the same training images per class, so that a
different ``data.val_per_class`` or imbalance setting cannot slip validation images into calibration. A model
whose stage 1 trained on the validation images too (stage 2 carved its split out of them) matches with them
counted in. Test images are never read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.config import DataConfig
from training.data import DataError, LongTailData, load_data, normalize

CALIBRATION_SELECTION = "evenly spaced over the long-tailed training split (class order), validation images excluded"


@dataclass(frozen=True)
class Int8Images:
    """Normalised float32 images ``[n, 3, H, W]``: calibration (training split) and validation with labels."""

    calibration: np.ndarray
    validation: np.ndarray
    validation_labels: np.ndarray

    @property
    def validation_split(self) -> tuple[np.ndarray, np.ndarray]:
        """The validation images and their labels."""
        return self.validation, self.validation_labels


def load_splits(
    data_cfg: DataConfig, data_dir: Path | None, *, class_names: list[str], class_counts: list[int]
) -> LongTailData:
    """The run's training and validation splits, checked against the model's classes and training counts.

    Raises:
        DataError: unreadable data, other classes, another split, or no validation split.
    """
    data = load_data(data_cfg, data_dir, progress=False)
    if data.class_names != class_names:
        raise DataError(f"the data's classes {data.class_names[:5]}... differ from the model's {class_names[:5]}...")
    if data.class_counts != class_counts and data.sampled_counts != class_counts:
        raise DataError(
            f"the data config gives training counts {data.class_counts}, but the model was trained on "
            f"{class_counts}: use the run's own data settings (data.imbalance_factor, data.val_per_class, ...)"
        )
    if data.val is None or len(data.val) == 0:
        raise DataError(
            "the int8 parity gate needs the run's validation split, and this run has none (data.val_per_class = 0); "
            "it never uses test images"
        )
    return data


def evenly_spaced(total: int, count: int) -> np.ndarray:
    """``min(count, total)`` distinct indices spread evenly over ``range(total)``."""
    return np.unique(np.linspace(0, total - 1, num=min(count, total)).round().astype(np.int64))


def int8_images(
    data: LongTailData, *, calibration_images: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> Int8Images:
    """``calibration_images`` training images (all of them if fewer) and the whole validation split."""
    if calibration_images < 1:
        raise DataError("--calibration-images must be at least 1")
    assert data.val is not None  # load_splits refuses data without a validation split
    picked = data.train.images[torch.from_numpy(evenly_spaced(len(data.train), calibration_images))]
    return Int8Images(
        calibration=normalize(picked, mean, std).numpy(),
        validation=normalize(data.val.images, mean, std).numpy(),
        validation_labels=data.val.labels.numpy(),
    )
