"""Data pipeline: long-tail subsets, CIFAR pickles, image folders, augmentation and index streams."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.config import CIFAR10_MEAN, CIFAR10_STD, DataConfig
from training.data import (
    BatchAugment,
    DataError,
    balanced_indices,
    class_groups,
    iterate_batches,
    load_data,
    longtail_counts,
    normalize,
    select_longtail,
    shard,
)
from training.data.augment import random_crop, rotate
from training.data.cifar import load_cifar_split, read_batch

# ../shared/REFERENCE-RIDE.md 1.1 [measured]
CIFAR100_LT_COUNTS = [
    *(500, 477, 455, 434, 415, 396, 378, 361, 344, 328, 314, 299, 286, 273, 260, 248, 237, 226, 216, 206),
    *(197, 188, 179, 171, 163, 156, 149, 142, 135, 129, 123, 118, 112, 107, 102, 98, 93, 89, 85, 81),
    *(77, 74, 70, 67, 64, 61, 58, 56, 53, 51, 48, 46, 44, 42, 40, 38, 36, 35, 33, 32),
    *(30, 29, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 15, 14, 13, 13, 12),
    *(12, 11, 11, 10, 10, 9, 9, 8, 8, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5),
]
CIFAR10_LT_COUNTS = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
FIXTURE_SHA256 = "02531196187640a7980e3d31a4de86d039b5a426160eb7f9d07317edbde9286a"


# ---------------------------------------------------------------- long-tail subsets


def test_cifar100_exp_counts_match_reference() -> None:
    counts = longtail_counts(500, 100, "exp", 100.0)
    assert counts == CIFAR100_LT_COUNTS
    assert sum(counts) == 10_847
    assert longtail_counts([500] * 100, 100, "exp", 100.0) == counts


def test_cifar10_exp_counts() -> None:
    counts = longtail_counts(5000, 10, "exp", 100.0)
    assert counts == CIFAR10_LT_COUNTS
    assert sum(counts) == 12_406


def test_step_and_none_profiles() -> None:
    assert longtail_counts(500, 10, "step", 10.0) == [500] * 5 + [50] * 5
    assert longtail_counts(100, 5, "step", 4.0) == [100, 100, 25, 25, 25]
    assert longtail_counts([7, 3, 5], 3, "none", 100.0) == [7, 3, 5]
    # Unbalanced folders: img_max is the mean, and no class keeps more than it has.
    assert longtail_counts([10, 2], 2, "exp", 2.0) == [6, 2]


@pytest.mark.parametrize("layout", ["contiguous", "interleaved"])
def test_cifar100_subset_matches_reference_fixture(layout: str) -> None:
    if layout == "contiguous":
        labels, position = np.repeat(np.arange(100), 500), lambda i: i % 500
    else:
        labels, position = np.tile(np.arange(100), 500), lambda i: i // 100
    kept = select_longtail(labels, CIFAR100_LT_COUNTS, seed=0)
    assert len(kept) == 10_847
    assert np.array_equal(labels[kept], np.repeat(np.arange(100), CIFAR100_LT_COUNTS))
    starts = np.cumsum([0, *CIFAR100_LT_COUNTS])
    per_class = [[int(position(i)) for i in kept[starts[c] : starts[c + 1]]] for c in range(100)]
    assert per_class[0][:8] == [90, 254, 283, 445, 461, 15, 316, 489]
    assert per_class[1][:8] == [277, 307, 436, 88, 261, 57, 413, 459]
    assert per_class[99] == [348, 153, 363, 361, 299]
    digest = hashlib.sha256(json.dumps([sorted(p) for p in per_class]).encode()).hexdigest()
    assert digest == FIXTURE_SHA256


def test_select_longtail_leaves_global_numpy_rng_alone() -> None:
    np.random.seed(123)
    expected = np.random.rand(3)
    np.random.seed(123)
    select_longtail(np.repeat(np.arange(10), 50), [50] * 10, seed=0)
    assert np.array_equal(np.random.rand(3), expected)


def test_class_groups_match_reference_split() -> None:
    groups = class_groups(CIFAR100_LT_COUNTS)
    assert [groups.count(g) for g in ("many", "medium", "few")] == [35, 35, 30]
    assert groups[34] == "many" and groups[35] == "medium"
    assert CIFAR100_LT_COUNTS[69] == 20 and groups[69] == "medium" and groups[70] == "few"


# ---------------------------------------------------------------- CIFAR pickles


def _write_pickle(path: Path, obj: object, protocol: int) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def _fake_cifar(folder: Path, name: str, per_class: int, protocol: int = 4, bytes_keys: bool = True) -> None:
    """An extracted 'python version' archive with random pixels; labels cycle through the classes."""
    num_classes = 10 if name == "cifar10" else 100
    label_key = "labels" if name == "cifar10" else "fine_labels"
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)

    def batch(n: int) -> dict:
        labels = [i % num_classes for i in range(n)]
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        return {key("data"): data, key(label_key): labels, key("filenames"): [b"x.png"] * n}

    if name == "cifar10":
        for i in range(1, 6):
            _write_pickle(folder / f"data_batch_{i}", batch(2 * num_classes * per_class // 10), protocol)
        _write_pickle(folder / "test_batch", batch(2 * num_classes), protocol)
        meta = {key("label_names"): [f"class{c}".encode() for c in range(num_classes)]}
        _write_pickle(folder / "batches.meta", meta, protocol)
    else:
        _write_pickle(folder / "train", batch(num_classes * per_class), protocol)
        _write_pickle(folder / "test", batch(2 * num_classes), protocol)
        _write_pickle(folder / "meta", {key("fine_label_names"): [f"c{c}" for c in range(num_classes)]}, protocol)


@pytest.mark.parametrize(("protocol", "bytes_keys"), [(2, True), (2, False), (4, True), (5, True)])
def test_cifar_batch_reads_official_format(tmp_path: Path, protocol: int, bytes_keys: bool) -> None:
    batch = {b"data": np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072), b"labels": [3, 7]}
    if not bytes_keys:
        batch = {k.decode(): v for k, v in batch.items()}
    root = tmp_path / "cifar-10-batches-py"
    _fake_cifar(root, "cifar10", per_class=5, protocol=protocol, bytes_keys=bytes_keys)
    _write_pickle(root / "test_batch", batch, protocol)
    loaded = read_batch(root / "test_batch")
    assert loaded["labels"] == [3, 7]
    images, labels = load_cifar_split(tmp_path, "cifar10", "test")  # root given as the parent folder
    assert images.shape == (2, 3, 32, 32) and images.dtype == np.uint8
    assert labels.tolist() == [3, 7]
    # Row layout: 1024 red, then green, then blue values, each 32x32 row-major.
    flat = batch[b"data" if bytes_keys else "data"]
    assert images[1, 2, 5, 7] == flat[1, 2 * 1024 + 5 * 32 + 7]


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple:
            return os.system, (f"touch {marker}",)

    path = tmp_path / "data_batch_1"
    _write_pickle(path, {b"data": Exploit()}, 4)
    with pytest.raises(DataError, match=r"refusing to load the pickle global '(posix|os|nt)\.system'") as info:
        read_batch(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_garbage_batch_file_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "test_batch"
    path.write_bytes(b"this is not a pickle")
    with pytest.raises(DataError, match="not a readable CIFAR batch"):
        read_batch(path)


def test_load_data_from_cifar10_pickles(tmp_path: Path) -> None:
    _fake_cifar(tmp_path / "cifar-10-batches-py", "cifar10", per_class=50)
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path), imbalance_factor=10.0)
    data = load_data(cfg, progress=False)
    assert data.class_names == [f"class{c}" for c in range(10)]
    assert data.class_counts == longtail_counts(50, 10, "exp", 10.0)
    assert data.train.images.shape == (sum(data.class_counts), 3, 32, 32)
    assert len(data.test) == 20 and data.val is None


def test_load_data_from_cifar100_pickles_with_val_split(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    _fake_cifar(folder, "cifar100", per_class=5)
    cfg = DataConfig(dataset="cifar100", imbalance_factor=5.0, val_per_class=2)
    data = load_data(cfg, data_dir=folder, progress=False)  # root given as the extracted folder
    kept = longtail_counts(5, 100, "exp", 5.0)
    assert data.class_names[:2] == ["c0", "c1"]
    assert data.class_counts == [n - min(2, n - 1) for n in kept]
    assert data.val is not None and len(data.val) == sum(min(2, n - 1) for n in kept)


# ---------------------------------------------------------------- image folders


@pytest.fixture(scope="module")
def small_sources(cifar10_dir: Path) -> list[Path]:
    """The first 30 train and 5 test real JPEGs of every class (listing 55,000 files once per module)."""
    sources = []
    for split, n in (("train", 30), ("test", 5)):
        for class_dir in sorted((cifar10_dir / split).iterdir()):
            sources += sorted(class_dir.iterdir())[:n]
    return sources


@pytest.fixture
def small_folder(tmp_path: Path, small_sources: list[Path]) -> Path:
    """A fresh folder of symlinks to real JPEGs; tests replace links, never write through them."""
    root = tmp_path / "data"
    for source in small_sources:
        link = root / source.relative_to(source.parents[2])
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source)
    return root


def _folder_cfg(tmp_path: Path, **changes: object) -> DataConfig:
    settings = {"dataset": "folder", "imbalance_factor": 10.0, "cache_dir": str(tmp_path / "cache")}
    return DataConfig(**{**settings, **changes})


def test_folder_keeps_the_longtail_subset_with_real_pixels(small_folder: Path, tmp_path: Path) -> None:
    data = load_data(_folder_cfg(tmp_path), small_folder, progress=False)
    assert data.class_names == sorted(p.name for p in (small_folder / "train").iterdir())
    assert data.class_counts == longtail_counts(30, 10, "exp", 10.0)
    assert data.train.images.dtype == torch.uint8 and data.train.images.is_contiguous()
    assert data.train.labels.dtype == torch.int64
    assert data.test.labels.tolist() == [c for c in range(10) for _ in range(5)]
    # The first kept image of class 1 is the file the sampler picked, decoded as RGB CHW.
    files = sorted((small_folder / "train" / data.class_names[1]).iterdir())
    labels = np.repeat(np.arange(10), 30)
    pick = select_longtail(labels, data.class_counts, 0)[data.class_counts[0]] % 30
    expected = np.array(Image.open(files[pick]).convert("RGB")).transpose(2, 0, 1)
    assert torch.equal(data.train.images[data.class_counts[0]], torch.from_numpy(expected))


def test_folder_resizes_to_image_size(small_folder: Path, tmp_path: Path) -> None:
    data = load_data(_folder_cfg(tmp_path, image_size=16, imbalance_profile="none"), small_folder, progress=False)
    assert data.train.images.shape == (300, 3, 16, 16) and data.test.images.shape == (50, 3, 16, 16)


def test_folder_cache_is_used_and_invalidated(small_folder: Path, tmp_path: Path) -> None:
    cfg = _folder_cfg(tmp_path)
    first = load_data(cfg, small_folder, progress=False)
    entries = sorted((tmp_path / "cache").glob("*.npy"))
    assert [p.name.split("-")[0] for p in entries] == ["test", "train"]
    # Prove the second load reads the cache: a doctored entry comes back as is.
    train_entry = entries[1]
    np.save(train_entry, np.zeros_like(first.train.images.numpy()))
    assert int(load_data(cfg, small_folder, progress=False).train.images.sum()) == 0
    # Replacing a kept image (new size and mtime) gives a new key, so it is decoded afresh.
    victim = small_folder / "train" / first.class_names[0] / "0000.jpg"
    replacement = (small_folder / "train" / first.class_names[1] / "0003.jpg").resolve()
    victim.unlink()
    shutil.copyfile(replacement, victim)
    again = load_data(cfg, small_folder, progress=False)
    assert int(again.train.images.sum()) > 0
    assert len(list((tmp_path / "cache").glob("train-*.npy"))) == 2


def test_val_split_takes_the_last_kept_images(small_folder: Path, tmp_path: Path) -> None:
    full = load_data(_folder_cfg(tmp_path, imbalance_factor=30.0), small_folder, progress=False)
    split = load_data(_folder_cfg(tmp_path, imbalance_factor=30.0, val_per_class=2), small_folder, progress=False)
    kept = longtail_counts(30, 10, "exp", 30.0)
    assert kept[-1] == 1  # the last class keeps one image, so none of it goes to validation
    held = [min(2, n - 1) for n in kept]
    assert split.class_counts == [n - h for n, h in zip(kept, held, strict=True)]
    assert split.val is not None and split.val.labels.tolist() == [c for c, h in enumerate(held) for _ in range(h)]
    starts = np.cumsum([0, *kept])
    val_pos = np.concatenate([np.arange(starts[c + 1] - h, starts[c + 1]) for c, h in enumerate(held)])
    assert torch.equal(split.val.images, full.train.images[val_pos])
    assert len(split.train) + len(split.val) == len(full.train)


def test_full_cifar10_folder_longtail(cifar10_dir: Path, tmp_path: Path) -> None:
    cfg = DataConfig(dataset="cifar10", imbalance_factor=100.0, cache_dir=str(tmp_path))
    start = time.perf_counter()
    data = load_data(cfg, cifar10_dir, progress=False)
    decode_s = time.perf_counter() - start
    assert len(data.train) == 12_406 and data.class_counts == CIFAR10_LT_COUNTS
    assert data.train.images.shape == (12_406, 3, 32, 32)
    assert data.test.images.shape == (5_000, 3, 32, 32)
    assert torch.bincount(data.test.labels).tolist() == [500] * 10
    assert data.class_names[:3] == ["airplane", "automobile", "bird"]
    start = time.perf_counter()
    cached = load_data(cfg, cifar10_dir, progress=False)
    assert time.perf_counter() - start < decode_s
    assert torch.equal(cached.train.images, data.train.images) and torch.equal(cached.test.images, data.test.images)


def _replace_with_bytes(path: Path, payload: bytes) -> None:
    path.unlink()  # drop the symlink first: the shared data must never be written
    path.write_bytes(payload)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_names_the_file(small_folder: Path, tmp_path: Path, damage: str) -> None:
    victim = small_folder / "train" / "airplane" / "0002.jpg"  # class 0 keeps every image
    payload = b"\x00garbage" * 50 if damage == "garbage" else victim.read_bytes()[:200]
    _replace_with_bytes(victim, payload)
    with pytest.raises(DataError, match=r"cannot read image .*airplane/0002\.jpg"):
        load_data(_folder_cfg(tmp_path), small_folder, progress=False)


def test_missing_root_and_missing_splits(small_folder: Path, tmp_path: Path) -> None:
    cfg = _folder_cfg(tmp_path)
    with pytest.raises(DataError, match="dataset folder not found"):
        load_data(cfg, tmp_path / "nowhere", progress=False)
    shutil.rmtree(small_folder / "test")
    with pytest.raises(DataError, match="has no test/ folder"):
        load_data(cfg, small_folder, progress=False)
    with pytest.raises(DataError, match="no dataset folder given"):
        load_data(cfg, progress=False)
    with pytest.raises(DataError, match="holds neither the official cifar10 python batches nor the image-folder"):
        load_data(cfg.model_copy(update={"dataset": "cifar10"}), small_folder / "train", progress=False)


def test_empty_root_and_empty_class(small_folder: Path, tmp_path: Path) -> None:
    cfg = _folder_cfg(tmp_path)
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "test").mkdir()
    with pytest.raises(DataError, match="has no class folders"):
        load_data(cfg, empty, progress=False)
    for file in (small_folder / "train" / "cat").iterdir():
        file.unlink()
    (small_folder / "train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"class folder .*train/cat has no images"):
        load_data(cfg, small_folder, progress=False)


def test_test_split_must_have_every_class(small_folder: Path, tmp_path: Path) -> None:
    shutil.rmtree(small_folder / "test" / "dog")
    with pytest.raises(DataError, match=r"missing \['dog'\]"):
        load_data(_folder_cfg(tmp_path), small_folder, progress=False)


def test_unknown_dataset_and_wrong_class_count(small_folder: Path, tmp_path: Path) -> None:
    unknown = _folder_cfg(tmp_path).model_copy(update={"dataset": "imagenet"})
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        load_data(unknown, small_folder, progress=False)
    cifar100 = _folder_cfg(tmp_path).model_copy(update={"dataset": "cifar100"})
    with pytest.raises(DataError, match="cifar100 has 100 classes"):
        load_data(cifar100, small_folder, progress=False)


def test_factor_that_empties_a_class_is_an_error(small_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"leaves no training images in classes \['horse', 'ship', 'truck'\]"):
        load_data(_folder_cfg(tmp_path, imbalance_factor=100.0), small_folder, progress=False)


# ---------------------------------------------------------------- augmentation


def _augment(**changes: object) -> BatchAugment:
    settings = {"image_size": 8, "padding": 2, "hflip": False, "rotation_degrees": 0.0, "mean": (0, 0, 0)}
    return BatchAugment(**{**settings, "std": (1, 1, 1), **changes})


def _pattern(batch: int, size: int = 8) -> torch.Tensor:
    """Distinct non-zero values per pixel, so a window of the padded image identifies its offset."""
    plane = torch.arange(1, size * size + 1, dtype=torch.uint8).view(size, size)
    return plane.expand(batch, 3, size, size).contiguous()


def test_augment_shapes_dtype_and_determinism() -> None:
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    augment = BatchAugment.from_config(DataConfig())
    out = augment(images, torch.Generator().manual_seed(7))
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out, augment(images, torch.Generator().manual_seed(7)))
    assert not torch.equal(out, augment(images, torch.Generator().manual_seed(8)))


def test_random_crop_shifts_content_with_zero_fill() -> None:
    images = _pattern(64)
    out = (_augment()(images, torch.Generator().manual_seed(0)) * 255).round().to(torch.uint8)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    offsets = set()
    for sample in range(64):
        windows = [(i, j) for i in range(5) for j in range(5)]
        matches = [(i, j) for i, j in windows if torch.equal(out[sample], padded[sample, :, i : i + 8, j : j + 8])]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 10  # offsets vary per sample
    assert (out == 0).any() and torch.equal(random_crop(images, 8, 0, torch.Generator()), images)


def test_hflip_mirrors_about_half_the_batch() -> None:
    images = _pattern(200)
    out = (_augment(padding=0, hflip=True)(images, torch.Generator().manual_seed(0)) * 255).round().to(torch.uint8)
    flipped = [torch.equal(o, images[0].flip(-1)) for o in out]
    assert all(f or torch.equal(o, images[0]) for f, o in zip(flipped, out, strict=True))
    assert 70 < sum(flipped) < 130


def test_rotation_nearest_with_zero_fill() -> None:
    images = _pattern(2).float()
    assert torch.equal(rotate(images, torch.tensor([90.0, 0.0]))[0], torch.rot90(images[0], 1, (1, 2)))
    assert torch.equal(rotate(images, torch.tensor([90.0, 0.0]))[1], images[1])
    corners = rotate(torch.full((1, 3, 8, 8), 200.0), torch.tensor([45.0]))[0, :, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 0).all()
    out = _augment(padding=0, rotation_degrees=30.0)(_pattern(32), torch.Generator().manual_seed(0)) * 255
    assert torch.allclose(out, out.round(), atol=1e-3)  # nearest sampling keeps original pixel values
    assert not torch.equal(out.round().to(torch.uint8), _pattern(32))


def test_normalize_uses_the_given_statistics() -> None:
    white = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    expected = (1 - torch.tensor(CIFAR10_MEAN)) / torch.tensor(CIFAR10_STD)
    assert torch.allclose(normalize(white, CIFAR10_MEAN, CIFAR10_STD)[1, :, 2, 3], expected)
    black = normalize(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), CIFAR10_MEAN, CIFAR10_STD)
    assert torch.allclose(black[0, :, 0, 0], -torch.tensor(CIFAR10_MEAN) / torch.tensor(CIFAR10_STD))


# ---------------------------------------------------------------- index streams


def test_iterate_batches_is_reproducible_per_epoch() -> None:
    batches = list(iterate_batches(10_847, 128, shuffle=True, seed=0, epoch=3))
    assert len(batches) == 85 and len(batches[-1]) == 95
    assert torch.equal(torch.cat(batches).sort().values, torch.arange(10_847))
    again = torch.cat(list(iterate_batches(10_847, 128, shuffle=True, seed=0, epoch=3)))
    assert torch.equal(again, torch.cat(batches))
    assert not torch.equal(torch.cat(list(iterate_batches(10_847, 128, shuffle=True, seed=0, epoch=4))), again)
    assert len(list(iterate_batches(10_847, 128, shuffle=True, seed=0, epoch=3, drop_last=True))) == 84
    assert torch.equal(torch.cat(list(iterate_batches(10, 3, shuffle=False, seed=0, epoch=0))), torch.arange(10))


def test_balanced_indices_are_uniform_over_classes() -> None:
    labels = torch.repeat_interleave(torch.arange(100), torch.tensor(CIFAR100_LT_COUNTS))
    draws = balanced_indices(labels, 100_000, seed=0, epoch=1)
    per_class = torch.bincount(labels[draws], minlength=100)
    assert per_class.min() > 850 and per_class.max() < 1150
    # Buckets are walked in full passes: every item of a 5-image class is drawn equally often (within one).
    tail = torch.bincount(draws[labels[draws] == 99] - int(labels.eq(99).nonzero()[0]), minlength=5)
    assert tail.max() - tail.min() <= 1
    assert torch.equal(draws, balanced_indices(labels, 100_000, seed=0, epoch=1))
    assert not torch.equal(draws[:1000], balanced_indices(labels, 1000, seed=0, epoch=2))


def test_shard_pads_like_distributed_sampler() -> None:
    indices = torch.arange(10)
    shards = [shard(indices, rank, 4).tolist() for rank in range(4)]
    assert shards == [[0, 4, 8], [1, 5, 9], [2, 6, 0], [3, 7, 1]]
    assert shard(torch.arange(2), 4, 5).tolist() == [0]
    with pytest.raises(ValueError, match="rank 4"):
        shard(indices, 4, 4)
