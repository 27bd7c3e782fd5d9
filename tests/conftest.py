"""Shared test fixtures: where the real CIFAR-10 image folder lives (``../shared`` beside the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The repo root's sibling `shared/` holds the real data; RIDE_CIFAR10_DIR points elsewhere when it lives apart.
CIFAR10_DIR = Path(
    os.environ.get("RIDE_CIFAR10_DIR", Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10")
)


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    if not (CIFAR10_DIR / "train").is_dir():
        pytest.skip(f"real CIFAR-10 image folder not found at {CIFAR10_DIR} (set RIDE_CIFAR10_DIR)")
    return CIFAR10_DIR
