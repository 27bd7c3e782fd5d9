"""Dynamic batching: requests wait a little so that they run through the cascade together.

A request that finds no other waiting runs at once: holding it for company that may not come would only add
latency (the fast path; at concurrency 1 it was the whole ``max_wait_s``), unless ``wait_when_idle`` asks for the
wait anyway (a GPU, where a batch of several costs what one image costs, may prefer it). Requests that queue up
while a batch runs form the next batch: its first request waits at most ``max_wait_s`` (counted from its arrival)
for more, up to ``max_batch_size`` rows; the batch then runs in a dedicated inference thread, so the event loop
keeps accepting and decoding requests meanwhile, and those form the next batch. Requests accepted but not yet
running are bounded by ``max_queue_size``: beyond it `submit` raises `OverloadedError` at once instead of letting
latency grow.

With ``buckets`` (the server gives them on CUDA, :func:`batch_buckets`) a batch is padded with blank rows up to
the next bucket size, so the GPU only ever sees the batch shapes that were warmed up; the blank rows stop after
the first expert and their results are dropped.

Every queued request has a deadline, ``max_queue_wait_s`` after it was queued: one still waiting then is dropped
with `OverloadedError` rather than run late. A request whose future is cancelled (its client went away) leaves the
count at once and is skipped when its turn comes, so it neither runs nor delays others. The time a batch takes is
tracked (an exponential moving average), so that `expected_wait_s` can tell the admission control
(`service.admission`) how long a new request would wait.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from cascade import CascadeResult
from service.errors import NotReadyError, OverloadedError

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Runs a batch: (images [N, 3, H, W], thresholds [N], max_experts [N]) -> per-row results.
InferFn = Callable[[np.ndarray, np.ndarray, np.ndarray], CascadeResult]
BatchObserver = Callable[[int, float], None]


@dataclass(frozen=True)
class RowResult:
    """One request's share of a batch result."""

    probabilities: np.ndarray  # [C] float32
    experts_used: int
    relative_compute: float
    queue_seconds: float
    inference_seconds: float
    batch_size: int


# Weight of the latest batch in the moving average of a batch's time.
BATCH_TIME_SMOOTHING = 0.2


@dataclass
class _Pending:
    image: np.ndarray
    threshold: float
    max_experts: int
    future: asyncio.Future[RowResult]
    deadline: float  # time.perf_counter() after which it is dropped
    enqueued_at: float = field(default_factory=time.perf_counter)
    counted: bool = True  # still counted in Batcher.pending


def batch_buckets(max_batch_size: int) -> list[int]:
    """The batch sizes a padded batcher forms: powers of two below ``max_batch_size``, and ``max_batch_size``."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch_size]


def padded_size(rows: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``rows`` (``rows`` itself without buckets, or beyond the largest)."""
    return next((size for size in buckets if size >= rows), rows)


class Batcher:
    """Collects concurrent requests into batches and runs them off the event loop, one batch at a time."""

    def __init__(
        self,
        infer: InferFn,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue_size: int,
        max_queue_wait_s: float = math.inf,
        on_batch: BatchObserver | None = None,
        buckets: Sequence[int] = (),
        wait_when_idle: bool = False,
    ) -> None:
        self._infer = infer
        self._wait_when_idle = wait_when_idle
        self._buckets = tuple(buckets)
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._max_queue_size = max_queue_size
        self._max_queue_wait_s = max_queue_wait_s
        self.queue_wait_bound_s = max_queue_wait_s  # lowered by load-adaptive early exit at its floor
        self._on_batch = on_batch
        self._batch_seconds: float | None = None  # moving average of a batch's time
        self._queue: asyncio.Queue[_Pending] | None = None
        self._pending = 0
        self._running_batch = False
        self._closing = False
        self._current: list[_Pending] = []  # the batch being formed or run
        self._worker: asyncio.Task[None] | None = None
        # One thread: batches run one after another, and onnxruntime parallelises inside each one.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ride-inference")

    @property
    def pending(self) -> int:
        """Requests accepted and not yet running (queued, or in a batch still being formed), cancelled ones not
        counted."""
        return self._pending

    @property
    def idle(self) -> bool:
        """No request waiting and no batch running."""
        return self._pending == 0 and not self._running_batch

    def bound_queue_wait(self, seconds: float | None) -> None:
        """Give requests queued from now on at most ``seconds`` in the queue (at most the configured bound); None:
        the configured bound again."""
        self.queue_wait_bound_s = self._max_queue_wait_s if seconds is None else min(seconds, self._max_queue_wait_s)

    def expected_wait_s(self, rows_ahead: int) -> float:
        """About how long a request with ``rows_ahead`` rows before it would wait to start: the batch running, and
        the full batches those rows make, at the recent time of a batch (0 before the first one). Under overload
        batches are full, and so is the batch time averaged; with little load, few rows wait."""
        if self._batch_seconds is None:
            return 0.0
        batches = rows_ahead // self._max_batch_size + (1 if self._running_batch else 0)
        return batches * self._batch_seconds

    async def start(self) -> None:
        """Start the batching loop (call from the event loop that will submit)."""
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._loop(), name="ride-batcher")

    async def run_in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the inference thread, serialised with the batches (used for warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def submit(self, image: np.ndarray, *, threshold: float, max_experts: int) -> RowResult:
        """Queue one preprocessed image and wait for its result (see `enqueue`)."""
        return await self.enqueue(image, threshold=threshold, max_experts=max_experts)

    def enqueue(self, image: np.ndarray, *, threshold: float, max_experts: int) -> asyncio.Future[RowResult]:
        """Queue one preprocessed image; the future holds its result. Cancelling the future takes the request out.

        Raises:
            OverloadedError: ``max_queue_size`` requests are already waiting (also set on the future when the
                request is still waiting at its deadline).
            NotReadyError: the batcher is not started or is shutting down.
        """
        if self._queue is None or self._closing:
            raise NotReadyError("the server is shutting down" if self._closing else "the batcher is not running")
        if self._pending >= self._max_queue_size:
            raise OverloadedError(f"{self._pending} requests are already waiting; retry later")
        future: asyncio.Future[RowResult] = asyncio.get_running_loop().create_future()
        item = _Pending(image, threshold, max_experts, future, deadline=time.perf_counter() + self.queue_wait_bound_s)
        self._pending += 1
        future.add_done_callback(lambda _: self._uncount(item))  # cancelled or dropped: out of the count at once
        self._queue.put_nowait(item)
        return future

    def enqueue_rows(
        self, images: Sequence[np.ndarray], *, threshold: float, max_experts: int
    ) -> list[asyncio.Future[RowResult]]:
        """Queue the rows of one request together: all of them, or none when they do not all fit in the queue.

        Raises:
            OverloadedError: the rows do not all fit below ``max_queue_size``.
            NotReadyError: as `enqueue`.
        """
        if self._queue is not None and not self._closing and self._pending + len(images) > self._max_queue_size:
            raise OverloadedError(
                f"{len(images)} rows do not fit in the queue: {self._pending} of {self._max_queue_size} places are "
                "taken; retry later"
            )
        return [self.enqueue(image, threshold=threshold, max_experts=max_experts) for image in images]

    def _uncount(self, item: _Pending) -> None:
        if item.counted:
            item.counted = False
            self._pending -= 1

    async def stop(self, timeout_s: float) -> None:
        """Refuse new requests, let the accepted ones finish (at most ``timeout_s``), then stop the loop."""
        self._closing = True
        deadline = time.monotonic() + timeout_s
        while (self._pending or self._running_batch) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if self._pending or self._running_batch:
            logger.warning("batcher stopped with %d requests unanswered after %.1f s", self._pending, timeout_s)
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._fail_unanswered(NotReadyError("the server shut down before this request ran"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _loop(self) -> None:
        assert self._queue is not None
        while True:
            self._current = []
            await self._collect(self._queue, self._current)
            batch = [item for item in self._current if self._due(item)]  # again: time passed while it formed
            for item in batch:
                self._uncount(item)
            if batch:
                self._running_batch = True
                try:
                    await self._run(batch)
                finally:
                    self._running_batch = False

    async def _collect(self, queue: asyncio.Queue[_Pending], batch: list[_Pending]) -> None:
        # Fills ``batch`` in place, so that `stop` can answer the rows of a batch cut off while forming. The wait for
        # company starts with the first request still due; cancelled ones are skipped, expired ones dropped.
        while not batch:
            self._take(await queue.get(), batch)
        if queue.empty() and not self._wait_when_idle:
            return  # the fast path: nobody else is waiting
        deadline = batch[0].enqueued_at + self._max_wait_s
        while len(batch) < self._max_batch_size:
            if not queue.empty():
                self._take(queue.get_nowait(), batch)
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                self._take(await asyncio.wait_for(queue.get(), remaining), batch)
            except TimeoutError:
                break

    def _take(self, item: _Pending, batch: list[_Pending]) -> None:
        if self._due(item):
            batch.append(item)

    def _due(self, item: _Pending) -> bool:
        """Whether ``item`` should still run: not cancelled (its client went away), not past its deadline (then it
        is dropped with `OverloadedError`)."""
        if item.future.done():
            return False
        now = time.perf_counter()
        if now <= item.deadline:
            return True
        waited_ms = (now - item.enqueued_at) * 1e3
        bound_ms = (item.deadline - item.enqueued_at) * 1e3
        item.future.set_exception(
            OverloadedError(f"waited {waited_ms:.0f} ms in the queue, above the bound of {bound_ms:.0f} ms")
        )
        return False

    async def _run(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        try:
            result = await self.run_in_worker(self._infer_rows, batch)
        except Exception as error:
            logger.exception("inference failed for a batch of %d", len(batch))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        seconds = time.perf_counter() - started
        previous = self._batch_seconds
        self._batch_seconds = seconds if previous is None else previous + BATCH_TIME_SMOOTHING * (seconds - previous)
        if self._on_batch is not None:
            self._on_batch(len(batch), seconds)
        for row, item in enumerate(batch):
            if item.future.done():
                continue
            item.future.set_result(
                RowResult(
                    probabilities=result.probabilities[row],
                    experts_used=int(result.experts_used[row]),
                    relative_compute=float(result.relative_compute[row]),
                    queue_seconds=started - item.enqueued_at,
                    inference_seconds=seconds,
                    batch_size=len(batch),
                )
            )

    def _infer_rows(self, batch: list[_Pending]) -> CascadeResult:
        # Runs on the inference thread: stacking large images is not free either.
        size = padded_size(len(batch), self._buckets)
        images = np.zeros((size, *batch[0].image.shape), dtype=batch[0].image.dtype)
        images[: len(batch)] = [item.image for item in batch]
        thresholds = np.ones(size, dtype=np.float64)
        thresholds[: len(batch)] = [item.threshold for item in batch]
        max_experts = np.ones(size, dtype=np.int64)  # blank rows stop after the first expert
        max_experts[: len(batch)] = [item.max_experts for item in batch]
        return self._infer(images, thresholds, max_experts)

    def _fail_unanswered(self, error: Exception) -> None:
        leftovers = list(self._current)
        while self._queue is not None and not self._queue.empty():
            leftovers.append(self._queue.get_nowait())
        for item in leftovers:
            if not item.future.done():
                item.future.set_exception(error)
            self._uncount(item)
