"""The official CIFAR-10/100 "python version" batches, read with a restricted unpickler.

The batches are pickles; a plain ``pickle.load`` would run whatever code a tampered file names. The unpickler
below resolves only the globals that rebuild NumPy arrays and refuses everything else by name.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np

from training.data.errors import DataError

CifarName = Literal["cifar10", "cifar100"]

_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_SPLIT_FILES = {
    "cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
    "cifar100": {"train": ["train"], "test": ["test"]},
}
_META = {"cifar10": ("batches.meta", "label_names"), "cifar100": ("meta", "fine_label_names")}
_LABEL_KEYS = ("labels", "fine_labels")

# NumPy array (and scalar) reconstruction helpers under their NumPy 1.x and 2.x module names, plus the helper that
# protocol-2 pickles written by Python 3 use for bytes. Nothing here can run arbitrary code.
_ALLOWED_GLOBALS = frozenset(
    {(f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")}
    | {(f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")}
    | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, source: Path) -> None:
        # latin1 is how NumPy asks Python-2 array pickles (the official batches) to be read.
        super().__init__(file, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise DataError(
                f"{self._source}: refusing to load the pickle global '{module}.{name}'; a CIFAR batch only needs "
                "NumPy arrays, so this file is not an official CIFAR batch (or has been tampered with)"
            )
        return super().find_class(module, name)


def read_batch(path: Path) -> dict[str, Any]:
    """Load one pickled batch with the restricted unpickler; keys are returned as ``str``."""
    try:
        with open(path, "rb") as f:
            batch = _RestrictedUnpickler(f, path).load()
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"CIFAR batch not found: {path}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise DataError(f"{path} is not a readable CIFAR batch: {error}") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR batch: expected a dict, found {type(batch).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}


def find_cifar_dir(root: Path, name: CifarName) -> Path | None:
    """The folder holding the batches: ``root`` itself or ``root/<official folder name>``; None if neither."""
    marker = _META[name][0]
    for candidate in (root, root / _FOLDERS[name]):
        if (candidate / marker).is_file():
            return candidate
    return None


def _require_dir(root: Path, name: CifarName) -> Path:
    folder = find_cifar_dir(root, name)
    if folder is None:
        raise DataError(
            f"no {name} batches in {root}: expected {_META[name][0]} there or in {root / _FOLDERS[name]} "
            "(the extracted 'python version' archive)"
        )
    return folder


def load_cifar_split(root: Path, name: CifarName, split: Literal["train", "test"]) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 [N, 3, 32, 32]`` and labels ``int64 [N]`` of one split, in file order."""
    folder = _require_dir(root, name)
    images, labels = [], []
    for file_name in _SPLIT_FILES[name][split]:
        path = folder / file_name
        batch = read_batch(path)
        label_key = next((k for k in _LABEL_KEYS if k in batch), None)
        if "data" not in batch or label_key is None:
            raise DataError(f"{path} is not a CIFAR batch: it has no 'data' and 'labels'/'fine_labels' entries")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch[label_key]):
            raise DataError(f"{path}: expected 'data' of shape [N, 3072] with N labels, got {data.shape}")
        # Rows hold the red, green and blue planes one after another, each 32x32 row-major: that is CHW already.
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def cifar_class_names(root: Path, name: CifarName) -> list[str]:
    """Class names in label order, from the archive's meta file."""
    file_name, key = _META[name]
    path = _require_dir(root, name) / file_name
    names = read_batch(path).get(key)
    if not isinstance(names, list):
        raise DataError(f"{path} has no '{key}' list")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
