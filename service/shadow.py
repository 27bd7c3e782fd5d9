"""Shadow agreement: the live cost of early exit.

A share (``RIDE_SHADOW_RATE``) of the classifications of a routed model is run a second time through every expert
(threshold 0), after its answer has been sent, and the two top-1 classes are compared: the agreement is how often
early exit leaves the answer unchanged, split by the class group (many / medium / few) of the routed answer.

The shadow never delays a client for more than one small shadow batch: its queue is bounded
(``RIDE_SHADOW_QUEUE_SIZE``; a sample that finds it full is dropped and counted), and it runs on the inference
thread only when no request is waiting or running, at most `SHADOW_BATCH_SIZE` images at a time. Under load it
runs less, and drops, rather than slowing the requests it watches.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from cascade import CascadeResult

logger = logging.getLogger(__name__)

# Images per shadow run: the longest a request arriving meanwhile can be held up is one such run.
SHADOW_BATCH_SIZE = 4
# How often the shadow looks again whether the batcher is idle.
IDLE_POLL_S = 0.002

FullRun = Callable[[np.ndarray], CascadeResult]  # every expert on a batch of preprocessed images
Observer = Callable[[bool, str, float], None]  # (agrees, group of the routed answer, relative compute spent)


@dataclass(frozen=True)
class ShadowSample:
    """One answered classification to check: its preprocessed image and the routed answer's class and group."""

    image: np.ndarray
    routed_class: int
    group: str


class Shadow:
    """Samples answered classifications and re-runs them through every expert when the batcher is idle."""

    def __init__(
        self,
        *,
        rate: float,
        queue_size: int,
        full_run: FullRun,
        run_in_worker: Callable[[FullRun, np.ndarray], Awaitable[CascadeResult]],
        is_idle: Callable[[], bool],
        observe: Observer,
        on_dropped: Callable[[], None],
        rng: random.Random | None = None,
    ) -> None:
        self.rate = rate
        self._queue_size = queue_size
        self._full_run = full_run
        self._run_in_worker = run_in_worker
        self._is_idle = is_idle
        self._observe = observe
        self._on_dropped = on_dropped
        self._rng = rng if rng is not None else random.Random()
        self._queue: asyncio.Queue[ShadowSample] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    @property
    def waiting(self) -> int:
        """Samples queued for the shadow."""
        return self._queue.qsize() if self._queue is not None else 0

    def offer(self, image: np.ndarray, routed_class: int, group: str) -> None:
        """Sample this answered classification at the shadow rate; drop it (counted) when the queue is full."""
        if self._queue is None or self._rng.random() >= self.rate:
            return
        try:
            self._queue.put_nowait(ShadowSample(image, routed_class, group))
        except asyncio.QueueFull:
            self._on_dropped()

    async def start(self) -> None:
        if not self.enabled:
            return
        self._queue = asyncio.Queue(maxsize=self._queue_size)
        self._task = asyncio.create_task(self._loop(), name="ride-shadow")

    async def stop(self) -> None:
        """Stop at once: what is still queued is dropped (a shadow sample is never worth delaying a shutdown)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._queue = None

    async def _loop(self) -> None:
        assert self._queue is not None
        while True:
            samples = [await self._queue.get()]
            while len(samples) < SHADOW_BATCH_SIZE and not self._queue.empty():
                samples.append(self._queue.get_nowait())
            while not self._is_idle():  # lower priority: every waiting or running request goes first
                await asyncio.sleep(IDLE_POLL_S)
            try:
                result = await self._run_in_worker(self._full_run, np.stack([s.image for s in samples]))
            except Exception:
                logger.exception("shadow run failed for %d samples", len(samples))
                continue
            full_classes = result.probabilities.argmax(axis=1)  # as the routed answer: the first most probable class
            for sample, full_class, compute in zip(samples, full_classes, result.relative_compute, strict=True):
                self._observe(bool(full_class == sample.routed_class), sample.group, float(compute))
