"""Write a CIFAR-10 image folder as the official CIFAR-10 "python version" batches (``cifar-10-batches-py``).

Used to feed the official RIDE code (and torchvision's ``CIFAR10``) exactly the images our ``folder`` reader
decodes, and to check our ``cifar10`` pickle reader on files another program reads::

    python -m training.data.cifar_pickles --src ../shared/data/cifar10 --out DIR

writes ``DIR/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` (into ``DIR`` itself when its name
already is ``cifar-10-batches-py``). Pass ``DIR`` as torchvision's ``root`` or our ``--data-dir``.

Layout, as torchvision reads it (``pickle.load(f, encoding="latin1")``): each batch is a dict with ``str`` keys
``data`` (``uint8 [N, 3072]``, a row is the 32x32 red plane, then green, then blue, each row-major),
``labels`` (list of int), ``filenames`` (list of ``"<class>/<file>"``) and ``batch_label``; ``batches.meta`` holds
``label_names`` (the CIFAR-10 names in official label order), ``num_cases_per_batch`` and ``num_vis``. Written
with pickle protocol 4; the arrays are NumPy's own pickles (readable by NumPy >= 1.26 when written by NumPy 2).

Order (deterministic): within each class the files are taken in sorted file-name order, and the classes are
interleaved round-robin (image 0 of every class, then image 1 of every class, ...), so that every training batch
holds about the same number of images per class, as the original batches do. The training images are then cut into
5 consecutive batches (10,000 each for the full 50,000). What matters for the long-tailed subset is the *position of
an image within its class*: the reference (and our ``select_longtail``) shuffles ``np.where(labels == c)`` with a
seeded RNG, and that position is the sorted-file-name rank here, exactly as in our ``folder`` reader. Both readers
therefore keep the same images.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from training.atomic import atomic_write
from training.data.errors import DataError
from training.data.folder import FolderIndex, scan_image_folder

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FOLDER_NAME = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
IMAGE_SIZE = 32
PICKLE_PROTOCOL = 4


def interleave_by_class(labels: np.ndarray) -> np.ndarray:
    """Positions of ``labels`` in round-robin class order, each class keeping its own order.

    Output position k of class c is c's (k-th) image; classes that run out are skipped, so unequal classes work.
    """
    labels = np.asarray(labels)
    rank = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rank[idx] = np.arange(len(idx))
    # Sort by (rank within class, class); lexsort's last key is the primary one.
    return np.lexsort((labels, rank))


def _check_classes(index: FolderIndex) -> None:
    if tuple(index.classes) != CIFAR10_CLASSES:
        missing = [c for c in CIFAR10_CLASSES if c not in index.classes]
        extra = [c for c in index.classes if c not in CIFAR10_CLASSES]
        raise DataError(
            f"{index.root / 'train'} must hold exactly the 10 CIFAR-10 class folders {', '.join(CIFAR10_CLASSES)}; "
            f"missing: {missing or 'none'}, unexpected: {extra or 'none'}"
        )


def _decode_32(path: Path) -> np.ndarray:
    """One image as ``uint8 [3072]`` (R plane, G plane, B plane), decoded like our ``folder`` reader."""
    try:
        with Image.open(path) as image:
            size = image.size
            rgb = image.convert("RGB") if size == (IMAGE_SIZE, IMAGE_SIZE) else None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {path}: {error}") from None
    if rgb is None:
        raise DataError(
            f"{path} is {size[0]}x{size[1]} pixels; CIFAR batches hold 32x32 images only (nothing is resized here)"
        )
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).reshape(-1)


def _decode_split(root: Path, files: list[str], progress: bool, desc: str) -> np.ndarray:
    data = np.empty((len(files), 3 * IMAGE_SIZE * IMAGE_SIZE), dtype=np.uint8)
    for i, rel in enumerate(tqdm(files, desc=desc, unit="img", disable=not progress)):
        data[i] = _decode_32(root / rel)
    return data


def _filename(rel: str) -> str:
    # "train/airplane/0000.jpg" -> "airplane/0000.jpg": unique across classes, like the original's distinct names.
    return rel.split("/", 1)[1]


def _dump(path: Path, obj: dict[str, Any]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            pickle.dump(obj, handle, protocol=PICKLE_PROTOCOL)
        tmp.chmod(0o644)  # the temporary file is private (0600); the batches are plain data for anyone to read

    atomic_write(path, write)


def output_folder(out: Path) -> Path:
    """Where the batches go: ``out`` if it is named ``cifar-10-batches-py``, else ``out/cifar-10-batches-py``."""
    out = Path(out)
    return out if out.name == FOLDER_NAME else out / FOLDER_NAME


def write_cifar10_pickles(src: Path, out: Path, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Write the image folder ``src`` (``train/<class>/*``, ``test/<class>/*``, the 10 CIFAR-10 classes, 32x32
    images) as the official CIFAR-10 python batches; returns the folder holding them (see ``output_folder``).

    Raises ``DataError`` for a missing folder, wrong class folders, an unreadable or non-32x32 image, or existing
    batches in the target when ``overwrite`` is false.
    """
    src = Path(src)
    target = output_folder(out)
    index = scan_image_folder(src)
    _check_classes(index)
    existing = [name for name in (*TRAIN_FILES, TEST_FILE, META_FILE) if (target / name).exists()]
    if existing and not overwrite:
        raise DataError(f"{target} already holds {', '.join(existing)}; pass --overwrite to replace them")

    splits = (("train", index.train_files, index.train_labels), ("test", index.test_files, index.test_labels))
    decoded = {}
    for split, files, labels in splits:
        order = interleave_by_class(labels)
        ordered_files = [files[i] for i in order]
        decoded[split] = (
            _decode_split(src, ordered_files, progress, f"decoding {split}"),
            [int(label) for label in labels[order]],
            [_filename(rel) for rel in ordered_files],
        )

    target.mkdir(parents=True, exist_ok=True)
    data, labels, names = decoded["train"]
    chunks = np.array_split(np.arange(len(labels)), len(TRAIN_FILES))
    for number, (file_name, chunk) in enumerate(zip(TRAIN_FILES, chunks, strict=True), start=1):
        start, stop = (int(chunk[0]), int(chunk[-1]) + 1) if len(chunk) else (0, 0)
        _dump(
            target / file_name,
            {
                "batch_label": f"training batch {number} of {len(TRAIN_FILES)}",
                "labels": labels[start:stop],
                "data": np.ascontiguousarray(data[start:stop]),
                "filenames": names[start:stop],
            },
        )
    data, labels, names = decoded["test"]
    _dump(
        target / TEST_FILE, {"batch_label": "testing batch 1 of 1", "labels": labels, "data": data, "filenames": names}
    )
    per_batch = max(len(chunk) for chunk in chunks)
    _dump(
        target / META_FILE,
        {"label_names": list(CIFAR10_CLASSES), "num_cases_per_batch": per_batch, "num_vis": 3 * IMAGE_SIZE**2},
    )
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.data.cifar_pickles", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--src", type=Path, required=True, help="image folder with train/<class>/ and test/<class>/")
    parser.add_argument("--out", type=Path, required=True, help=f"folder that receives {FOLDER_NAME}/")
    parser.add_argument("--overwrite", action="store_true", help="replace batches already in the target folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        target = write_cifar10_pickles(args.src, args.out, overwrite=args.overwrite, progress=not args.no_progress)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join((*TRAIN_FILES, TEST_FILE, META_FILE))} to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
