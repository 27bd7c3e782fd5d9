"""Data pipeline: long-tailed CIFAR / image-folder datasets, batched GPU-friendly augmentation, index streams."""

from training.data.augment import BatchAugment, augment_generator
from training.data.datasets import ImageSet, LongTailData, class_groups, load_data
from training.data.errors import DataError
from training.data.loader import balanced_indices, iterate_batches, shard
from training.data.longtail import longtail_counts, select_longtail
from training.data.preprocess import channel_vector, normalize

__all__ = [
    "BatchAugment",
    "DataError",
    "ImageSet",
    "LongTailData",
    "augment_generator",
    "balanced_indices",
    "channel_vector",
    "class_groups",
    "iterate_batches",
    "load_data",
    "longtail_counts",
    "normalize",
    "select_longtail",
    "shard",
]
