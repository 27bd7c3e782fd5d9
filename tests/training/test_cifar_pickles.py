"""Writing real CIFAR-10 JPEGs as the official "python version" batches, and reading them back.

The batches are read three ways: by our restricted ``cifar10`` reader, by a plain ``pickle.load(f,
encoding="latin1")`` exactly as torchvision's ``CIFAR10`` does it, and through ``load_data`` (which must keep the
very same long-tailed subset from the batches as from the JPEG folder).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY_TEST_PER_CLASS, TINY_TRAIN_PER_CLASS
from training.config import DataConfig
from training.data import DataError, load_data, longtail_counts
from training.data.cifar import cifar_class_names, load_cifar_split
from training.data.cifar_pickles import (
    CIFAR10_CLASSES,
    FOLDER_NAME,
    interleave_by_class,
    main,
    output_folder,
    write_cifar10_pickles,
)

# The file names torchvision.datasets.CIFAR10 opens (its train_list, test_list and meta).
TORCHVISION_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
TORCHVISION_TEST = ["test_batch"]
TORCHVISION_META = "batches.meta"


def _decoded(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every JPEG of ``root/split`` in the documented pickle order, decoded independently: HWC, labels, names."""
    per_class = [sorted((root / split / name).iterdir()) for name in CIFAR10_CLASSES]
    images, labels, names = [], [], []
    for k in range(max(len(files) for files in per_class)):  # round-robin over classes, sorted names within
        for label, files in enumerate(per_class):
            if k < len(files):
                images.append(np.array(Image.open(files[k]).convert("RGB")))
                labels.append(label)
                names.append(f"{CIFAR10_CLASSES[label]}/{files[k].name}")
    return np.stack(images), np.array(labels), names


@pytest.fixture(scope="module")
def written(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pickles")
    assert write_cifar10_pickles(tiny_data_dir, out, progress=False) == out / FOLDER_NAME
    return out


def test_our_cifar10_reader_gets_the_exact_jpeg_pixels(tiny_data_dir: Path, written: Path) -> None:
    for split, per_class in (("train", TINY_TRAIN_PER_CLASS), ("test", TINY_TEST_PER_CLASS)):
        expected, expected_labels, _ = _decoded(tiny_data_dir, split)
        images, labels = load_cifar_split(written, "cifar10", split)
        assert images.shape == (10 * per_class, 3, 32, 32) and images.dtype == np.uint8
        assert np.array_equal(images, expected.transpose(0, 3, 1, 2))  # pixel-exact, CHW
        assert np.array_equal(labels, expected_labels)
    assert cifar_class_names(written, "cifar10") == list(CIFAR10_CLASSES)


def test_layout_is_what_torchvision_reads(tiny_data_dir: Path, written: Path) -> None:
    folder = written / FOLDER_NAME
    assert sorted(p.name for p in folder.iterdir()) == sorted([*TORCHVISION_TRAIN, *TORCHVISION_TEST, TORCHVISION_META])
    for split, files in (("train", TORCHVISION_TRAIN), ("test", TORCHVISION_TEST)):
        data, labels, names, batch_labels = [], [], [], []
        for file_name in files:
            # torchvision.datasets.CIFAR10.__init__: pickle.load(f, encoding="latin1"), then entry["data"] and
            # entry["labels"] (or "fine_labels"): the keys must be str.
            with open(folder / file_name, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            assert isinstance(entry, dict) and all(isinstance(k, str) for k in entry)
            assert set(entry) == {"data", "labels", "filenames", "batch_label"}
            assert isinstance(entry["data"], np.ndarray) and entry["data"].dtype == np.uint8
            assert entry["data"].ndim == 2 and entry["data"].shape[1] == 3072
            assert all(type(label) is int for label in entry["labels"]) and len(entry["labels"]) == len(entry["data"])
            assert all(isinstance(name, str) for name in entry["filenames"])
            data.append(entry["data"])
            labels += entry["labels"]
            names += entry["filenames"]
            batch_labels.append(entry["batch_label"])
        # ... np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1)) gives HWC images for PIL.
        hwc = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
        expected, expected_labels, expected_names = _decoded(tiny_data_dir, split)
        assert np.array_equal(hwc, expected)
        assert labels == expected_labels.tolist() and names == expected_names
        if split == "train":
            assert [len(d) for d in data] == [2 * TINY_TRAIN_PER_CLASS] * 5  # 400 images cut into 5 equal batches
            assert batch_labels == [f"training batch {i} of 5" for i in range(1, 6)]
            assert [np.bincount(entry, minlength=10).tolist() for entry in np.split(np.array(labels), 5)] == [
                [8] * 10
            ] * 5  # interleaved: every batch balanced
        else:
            assert batch_labels == ["testing batch 1 of 1"]
    with open(folder / TORCHVISION_META, "rb") as f:
        meta = pickle.load(f, encoding="latin1")
    assert meta["label_names"] == list(CIFAR10_CLASSES) and meta["num_vis"] == 3072


def test_pickles_and_folder_give_the_same_longtail_subset(tiny_data_dir: Path, written: Path, tmp_path: Path) -> None:
    settings = {"imbalance_factor": 10.0, "cache_dir": str(tmp_path / "cache")}
    from_pickles = load_data(DataConfig(dataset="cifar10", **settings), written, progress=False)
    from_folder = load_data(DataConfig(dataset="folder", **settings), tiny_data_dir, progress=False)
    assert from_pickles.class_counts == from_folder.class_counts == longtail_counts(40, 10, "exp", 10.0)
    assert from_pickles.class_names == from_folder.class_names
    # Same kept images, in the same (class-contiguous, shuffled) order, bit for bit.
    assert from_pickles.train.images.equal(from_folder.train.images)
    assert from_pickles.train.labels.equal(from_folder.train.labels)
    # The test split holds the same images; the pickle interleaves the classes, the folder reader does not.
    order = interleave_by_class(from_folder.test.labels.numpy())
    assert from_pickles.test.images.equal(from_folder.test.images[order])
    assert from_pickles.test.labels.equal(from_folder.test.labels[order])


def test_interleave_keeps_within_class_order_for_unequal_classes() -> None:
    labels = np.array([0, 0, 0, 1, 2, 2])
    order = interleave_by_class(labels)
    assert order.tolist() == [0, 3, 4, 1, 5, 2]
    assert labels[order].tolist() == [0, 1, 2, 0, 2, 0]


def test_output_folder_naming(tmp_path: Path) -> None:
    assert output_folder(tmp_path) == tmp_path / FOLDER_NAME
    assert output_folder(tmp_path / FOLDER_NAME) == tmp_path / FOLDER_NAME


# ---------------------------------------------------------------- bad input


@pytest.fixture
def small_src(tiny_data_dir: Path, tmp_path: Path) -> Path:
    """Two train and one test image per class, as fresh symlinks that a test may replace."""
    root = tmp_path / "src"
    for split, count in (("train", 2), ("test", 1)):
        for name in CIFAR10_CLASSES:
            (root / split / name).mkdir(parents=True)
            for source in sorted((tiny_data_dir / split / name).iterdir())[:count]:
                (root / split / name / source.name).symlink_to(source.resolve())
    return root


def test_cli_writes_and_refuses_to_overwrite(small_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(["--src", str(small_src), "--out", str(out), "--no-progress"]) == 0
    assert f"to {out / FOLDER_NAME}" in capsys.readouterr().out
    images, labels = load_cifar_split(out, "cifar10", "train")
    assert images.shape == (20, 3, 32, 32) and labels.tolist() == list(range(10)) * 2
    assert main(["--src", str(small_src), "--out", str(out / FOLDER_NAME), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already holds data_batch_1" in err and "--overwrite" in err
    assert main(["--src", str(small_src), "--out", str(out), "--no-progress", "--overwrite"]) == 0


def test_missing_source_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "dataset folder not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_wrong_class_folders(small_src: Path, tmp_path: Path) -> None:
    for split in ("train", "test"):
        (small_src / split / "automobile").rename(small_src / split / "car")
    with pytest.raises(DataError, match=r"missing: \['automobile'\], unexpected: \['car'\]"):
        write_cifar10_pickles(small_src, tmp_path / "out", progress=False)
    for split in ("train", "test"):
        (small_src / split / "car").rename(small_src / split / "automobile")
    (small_src / "test" / "automobile").rename(tmp_path / "gone")
    with pytest.raises(DataError, match=r"missing \['automobile'\]"):
        write_cifar10_pickles(small_src, tmp_path / "out", progress=False)


def test_image_that_is_not_32x32(small_src: Path, tmp_path: Path) -> None:
    victim = small_src / "test" / "frog" / sorted(p.name for p in (small_src / "test" / "frog").iterdir())[0]
    victim.unlink()
    Image.new("RGB", (32, 40)).save(victim, format="JPEG")
    with pytest.raises(DataError, match=r"test/frog/\d+\.jpg is 32x40 pixels; CIFAR batches hold 32x32 images only"):
        write_cifar10_pickles(small_src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / FOLDER_NAME / "data_batch_1").exists()  # nothing half-written


def test_unreadable_image(small_src: Path, tmp_path: Path) -> None:
    victim = next((small_src / "train" / "ship").iterdir())
    victim.unlink()
    victim.write_bytes(b"\x00not a jpeg" * 20)
    with pytest.raises(DataError, match=r"cannot read image .*train/ship/"):
        write_cifar10_pickles(small_src, tmp_path / "out", progress=False)
