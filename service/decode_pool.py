"""The decoding threads: a bounded pool with its own bounded queue.

Large images decode off the event loop, at most ``threads`` at a time, with at most ``queue_size`` more waiting for
a thread. Beyond that a new one is refused at once (`OverloadedError`, 503) instead of piling up: each decode holds
up to a few tens of megabytes (`service.images`), so an unbounded pool let six large uploads take gigabytes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from service.errors import OverloadedError

T = TypeVar("T")


class DecodePool:
    """``threads`` decoding threads and a queue of ``queue_size``; `run` refuses work beyond both."""

    def __init__(self, *, threads: int, queue_size: int) -> None:
        self.capacity = threads + queue_size
        self._busy = 0
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ride-decode")

    @property
    def busy(self) -> int:
        """Decodes running or waiting for a thread (a cancelled one counts until its thread lets go of it)."""
        return self._busy

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a decoding thread.

        Raises:
            OverloadedError: every thread is busy and the queue is full.
        """
        if self._busy >= self.capacity:
            raise OverloadedError(f"all {self.capacity} decoding slots are taken; retry later")
        loop = asyncio.get_running_loop()
        work = self._executor.submit(fn, *args)
        self._busy += 1
        # Released when the work really ends (or is dropped unstarted), not when the awaiting request goes away.
        work.add_done_callback(lambda _: self._release_from(loop))
        return await asyncio.wrap_future(work)

    def _release_from(self, loop: asyncio.AbstractEventLoop) -> None:
        # Runs on whichever thread ended the work; the count belongs to the event loop's thread.
        with contextlib.suppress(RuntimeError):  # the loop is already closed: nobody counts any more
            loop.call_soon_threadsafe(self._release)

    def _release(self) -> None:
        self._busy -= 1

    def close(self) -> None:
        """Drop queued work and let the threads end after their current decode."""
        self._executor.shutdown(wait=False, cancel_futures=True)
