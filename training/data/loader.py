"""Index streams for training: per-epoch shuffles, class-balanced draws and distributed shards.

Each epoch's randomness comes from a generator seeded by (seed, epoch), so resuming at epoch e replays the
exact order an uninterrupted run would have used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator whose state depends only on ``(seed, epoch)``."""
    digest = hashlib.sha256(f"ride-serve:{seed}:{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def iterate_batches(
    num_items: int,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int,
    drop_last: bool = False,
    device: torch.device | None = None,
) -> Iterator[torch.Tensor]:
    """Yield int64 index batches covering ``range(num_items)`` once, shuffled per (seed, epoch) if asked.

    The order is drawn on the CPU (the same on every device) and, with ``device``, copied there once for the epoch:
    the batches are then slices of a device tensor, and indexing device data with them needs no copy per batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = torch.randperm(num_items, generator=epoch_generator(seed, epoch)) if shuffle else torch.arange(num_items)
    if device is not None:
        order = order.to(device)
    stop = num_items - num_items % batch_size if drop_last else num_items
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


def balanced_indices(labels: torch.Tensor, num_draws: int, seed: int, epoch: int) -> torch.Tensor:
    """``num_draws`` indices where each draw picks a class uniformly, then that class's next item.

    Each class's bucket is walked in a random order and reshuffled whenever it wraps, like the reference's
    ``BalancedSampler`` (../shared/REFERENCE-RIDE.md 1.3), but restarted per (seed, epoch) for reproducible resumes.
    """
    labels = labels.cpu()
    if len(labels) == 0:
        raise ValueError("balanced_indices needs at least one labelled item")
    generator = epoch_generator(seed, epoch)
    classes = torch.unique(labels)
    picks = torch.randint(0, len(classes), (num_draws,), generator=generator)
    out = torch.empty(num_draws, dtype=torch.int64)
    for k, c in enumerate(classes):
        slots = torch.nonzero(picks == k).flatten()
        bucket = torch.nonzero(labels == c).flatten()
        passes = -(-len(slots) // len(bucket))
        walk = [bucket[torch.randperm(len(bucket), generator=generator)] for _ in range(passes)]
        out[slots] = torch.cat(walk)[: len(slots)] if walk else bucket[:0]
    return out


def shard(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's share of ``indices``, padded by repeating from the start so every rank gets as many items
    (like ``DistributedSampler``): rank r takes positions r, r + world_size, ..."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    total = -(-len(indices) // world_size) * world_size
    if len(indices) and total > len(indices):
        repeats = -(-total // len(indices))
        indices = indices.repeat(repeats)[:total]
    return indices[rank:total:world_size]
