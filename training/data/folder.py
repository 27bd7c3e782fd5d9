"""Image-folder datasets: ROOT/train/<class>/* and ROOT/test/<class>/*, decoded in threads and cached on disk."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from training.data.errors import DataError
from training.data.preprocess import to_model_size

_CHUNK = 256  # images per decode task: big enough to amortise the pool overhead on 32x32 JPEGs


@dataclass(frozen=True)
class FolderIndex:
    """The files of an image folder; paths are relative to ``root`` and sorted by class, then name."""

    root: Path
    classes: list[str]
    train_files: list[str]
    train_labels: np.ndarray
    test_files: list[str]
    test_labels: np.ndarray


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "ride-serve"


def image_extensions() -> set[str]:
    """The file extensions of every format Pillow can open."""
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _subfolders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _list_split(root: Path, split: str, classes: list[str], extensions: set[str]) -> tuple[list[str], np.ndarray]:
    files, labels = [], []
    for label, name in enumerate(classes):
        folder = root / split / name
        names = sorted(
            e.name
            for e in os.scandir(folder)
            if not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in extensions and e.is_file()
        )
        if not names:
            raise DataError(f"class folder {folder} has no images (any format Pillow reads, e.g. .jpg or .png)")
        files += [f"{split}/{name}/{n}" for n in names]
        labels += [label] * len(names)
    return files, np.asarray(labels, dtype=np.int64)


def scan_image_folder(root: Path) -> FolderIndex:
    """List the images of ``root``; classes are the sorted subfolders of ``train/`` and ``test/`` must match."""
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(
                f"{root} has no {split}/ folder; expected the layout ROOT/train/<class>/<image> and "
                "ROOT/test/<class>/<image>"
            )
    classes = _subfolders(root / "train")
    if not classes:
        raise DataError(f"{root / 'train'} has no class folders")
    test_classes = _subfolders(root / "test")
    if test_classes != classes:
        missing = sorted(set(classes) - set(test_classes))
        extra = sorted(set(test_classes) - set(classes))
        raise DataError(
            f"{root / 'test'} must hold the same class folders as train/: missing {missing or 'none'}, "
            f"not in train/ {extra or 'none'}"
        )
    extensions = image_extensions()
    train_files, train_labels = _list_split(root, "train", classes, extensions)
    test_files, test_labels = _list_split(root, "test", classes, extensions)
    return FolderIndex(root, classes, train_files, train_labels, test_files, test_labels)


def _decode(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return to_model_size(image, size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {path}: {error}") from None


def _cache_key(root: Path, split: str, files: Sequence[str], size: int) -> str:
    digest = hashlib.sha256(json.dumps([str(root.resolve()), split, size]).encode())
    for rel in files:
        try:
            stat = (root / rel).stat()
        except OSError as error:
            raise DataError(f"cannot read image {root / rel}: {error}") from None
        digest.update(f"\n{rel}\t{stat.st_size}\t{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def _read_cache(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return array if array.shape == shape and array.dtype == np.uint8 else None


def _write_cache(path: Path, array: np.ndarray) -> None:
    # Temp file plus rename: a crash or a concurrent loader never leaves a half-written cache entry behind.
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except OSError as error:
        warnings.warn(f"could not write the image cache {path}: {error}", stacklevel=3)
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _decode_all(root: Path, files: Sequence[str], size: int, progress: bool, desc: str) -> np.ndarray:
    out = np.empty((len(files), size, size, 3), dtype=np.uint8)

    def work(start: int) -> int:
        for i in range(start, min(start + _CHUNK, len(files))):
            out[i] = _decode(root / files[i], size)
        return min(_CHUNK, len(files) - start)

    # Pillow releases the GIL while decoding, so threads scale without pickling images between processes.
    with (
        ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool,
        tqdm(total=len(files), desc=desc, unit="img", disable=not progress) as bar,
    ):
        for done in pool.map(work, range(0, len(files), _CHUNK)):
            bar.update(done)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def decode_images(
    root: Path,
    files: Sequence[str],
    image_size: int,
    *,
    split: str,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Decode ``files`` (relative to ``root``) to ``uint8 [N, 3, S, S]`` RGB, reusing the on-disk cache.

    The cache key covers the absolute root, the split, the size and every file's path, size and mtime, so
    editing, adding or removing an image, or keeping a different long-tailed subset, gives a fresh entry.
    """
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    path = cache_dir / f"{split}-{image_size}px-{_cache_key(root, split, files, image_size)}.npy"
    cached = _read_cache(path, (len(files), 3, image_size, image_size))
    if cached is not None:
        return cached
    images = _decode_all(root, files, image_size, progress, f"decoding {split}")
    _write_cache(path, images)
    return images
