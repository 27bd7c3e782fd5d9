"""A run's output folder: the guard against overwriting it, its per-epoch log, and the per-epoch seed.

Stage 1, distillation and stage 2 all write a checkpoint folder with a ``log.jsonl`` beside it. Everything
random during an epoch is derived from ``(seed, epoch)`` (:func:`epoch_seed`), so ``--resume`` from an epoch
boundary replays exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training.atomic import append_jsonl
from training.checkpoint import META_FILE, CheckpointError

LOG_FILE = "log.jsonl"


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """One seed per (run seed, epoch, rank): resuming at an epoch boundary replays the same randomness."""
    return (seed * 1_000_003 + epoch * 7919 + rank) % (2**63)


def prepare_output(out: Path, resume: bool) -> None:
    """Refuse to overwrite a finished or interrupted run unless resuming it."""
    has_checkpoint = (out / META_FILE).is_file()
    if resume and not has_checkpoint:
        raise CheckpointError(f"--resume: {out} holds no checkpoint to resume from")
    if not resume and has_checkpoint:
        raise CheckpointError(
            f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out (nothing was "
            "overwritten)"
        )
    out.mkdir(parents=True, exist_ok=True)


def append_log(out: Path, record: dict[str, Any]) -> None:
    """Add one epoch's record to the run's log."""
    append_jsonl(out / LOG_FILE, record)


def last_log_record(out: Path) -> dict[str, Any] | None:
    """The last line of the run's log (None when there is none)."""
    path = out / LOG_FILE
    if not path.is_file():
        return None
    lines = path.read_text().strip().splitlines()
    return json.loads(lines[-1]) if lines else None
