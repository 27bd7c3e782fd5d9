"""Build the long-tailed training set, the optional validation split and the balanced test set."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.config import DataConfig
from training.data.cifar import cifar_class_names, find_cifar_dir, load_cifar_split
from training.data.errors import DataError
from training.data.folder import decode_images, scan_image_folder
from training.data.longtail import longtail_counts, select_longtail
from training.data.preprocess import resize_batch

_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


@dataclass
class ImageSet:
    """Images ``uint8 [N, 3, H, W]`` (contiguous, RGB) and their labels ``int64 [N]``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class LongTailData:
    """Everything a run needs; ``class_counts`` counts the final training set (after the validation split)."""

    train: ImageSet
    val: ImageSet | None
    test: ImageSet
    class_names: list[str]
    class_counts: list[int]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def sampled_counts(self) -> list[int]:
        """Images per class the long-tail sampler kept, the validation split included: what a stage 1 run without
        a validation split trained on when stage 2 carves its split out of it (`training.route_plan`)."""
        if self.val is None:
            return self.class_counts
        val_counts = np.bincount(self.val.labels.numpy(), minlength=self.num_classes)
        return [int(n) for n in np.asarray(self.class_counts) + val_counts]


def class_groups(class_counts: list[int], many_shot_above: int = 100, few_shot_below: int = 20) -> list[str]:
    """'many', 'medium' or 'few' per class from training counts, with the reference's boundaries (trap 2)."""
    return ["many" if n > many_shot_above else "few" if n < few_shot_below else "medium" for n in class_counts]


def _image_set(images: np.ndarray, labels: np.ndarray) -> ImageSet:
    return ImageSet(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)))


def _kept_indices(labels: np.ndarray, num_classes: int, cfg: DataConfig) -> np.ndarray:
    available = np.bincount(labels, minlength=num_classes).tolist()
    counts = longtail_counts(available, num_classes, cfg.imbalance_profile, cfg.imbalance_factor)
    return select_longtail(labels, counts, cfg.subset_seed)


def _split_val(labels: np.ndarray, num_classes: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions kept for training and held out: the last ``per_class`` of each class, leaving at least one."""
    train, val = [], []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        cut = len(idx) - min(per_class, max(len(idx) - 1, 0))
        train.append(idx[:cut])
        val.append(idx[cut:])
    return np.concatenate(train), np.concatenate(val)


# class names, train images, train labels, test images, test labels
_Loaded = tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _load_pickles(root: Path, cfg: DataConfig) -> _Loaded:
    names = cifar_class_names(root, cfg.dataset)
    images, labels = load_cifar_split(root, cfg.dataset, "train")
    keep = _kept_indices(labels, len(names), cfg)
    test_images, test_labels = load_cifar_split(root, cfg.dataset, "test")
    size = cfg.image_size
    return names, resize_batch(images[keep], size), labels[keep], resize_batch(test_images, size), test_labels


def _load_folder(root: Path, cfg: DataConfig, progress: bool) -> _Loaded:
    index = scan_image_folder(root)
    expected = _NUM_CLASSES.get(cfg.dataset)
    if expected is not None and len(index.classes) != expected:
        raise DataError(f"{cfg.dataset} has {expected} classes but {root / 'train'} holds {len(index.classes)}")
    keep = _kept_indices(index.train_labels, len(index.classes), cfg)
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else None
    decode = {"image_size": cfg.image_size, "cache_dir": cache, "progress": progress}
    train = decode_images(root, [index.train_files[i] for i in keep], split="train", **decode)
    test = decode_images(root, index.test_files, split="test", **decode)
    return index.classes, train, index.train_labels[keep], test, index.test_labels


def load_data(cfg: DataConfig, data_dir: Path | None = None, progress: bool = True) -> LongTailData:
    """Load the dataset ``cfg`` describes from ``data_dir`` (or ``cfg.root``).

    ``cifar10``/``cifar100`` read the official pickled batches when the folder has them and the image-folder
    layout otherwise; ``folder`` reads any image folder. Only the kept long-tailed training images are decoded.
    """
    if cfg.dataset not in ("cifar10", "cifar100", "folder"):
        raise DataError(f"unknown dataset '{cfg.dataset}'; expected cifar10, cifar100 or folder")
    if data_dir is None and cfg.root is None:
        raise DataError("no dataset folder given: set data.root in the config or pass --data-dir")
    root = Path(data_dir if data_dir is not None else cfg.root).expanduser()
    if cfg.dataset != "folder" and find_cifar_dir(root, cfg.dataset) is not None:
        names, train_x, train_y, test_x, test_y = _load_pickles(root, cfg)
    elif cfg.dataset != "folder" and root.is_dir() and not (root / "train").is_dir():
        raise DataError(
            f"{root} holds neither the official {cfg.dataset} python batches nor the image-folder layout "
            "ROOT/train/<class>/<image>, ROOT/test/<class>/<image>"
        )
    else:
        names, train_x, train_y, test_x, test_y = _load_folder(root, cfg, progress)
    counts = np.bincount(train_y, minlength=len(names))
    empty = [names[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise DataError(
            f"imbalance factor {cfg.imbalance_factor} leaves no training images in classes {empty} "
            f"(the largest class keeps {counts.max()}); lower data.imbalance_factor"
        )
    val = None
    if cfg.val_per_class > 0:
        train_pos, val_pos = _split_val(train_y, len(names), cfg.val_per_class)
        val = _image_set(train_x[val_pos], train_y[val_pos])
        train_x, train_y = train_x[train_pos], train_y[train_pos]
    train = _image_set(train_x, train_y)
    counts = np.bincount(train_y, minlength=len(names)).tolist()
    return LongTailData(train, val, _image_set(test_x, test_y), names, counts)
