"""SIGHUP rescans the model repository (`service.loader.Loader.rescan`), as it makes many daemons reload."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable

from service.loader import Loader

logger = logging.getLogger(__name__)


def watch_sighup(loader: Loader) -> Callable[[], None]:
    """Rescan on every SIGHUP from now on; returns what stops it. Signals reach only the main thread's event loop:
    elsewhere (an app run in a test's thread) nothing is watched."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
        return lambda: None
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[list[str]]] = set()

    def rescan() -> None:
        logger.info("SIGHUP: rescanning %s", loader.repository.describe())
        task = loop.create_task(loader.rescan(), name="ride-rescan")
        tasks.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGHUP, rescan)

    def stop() -> None:
        loop.remove_signal_handler(signal.SIGHUP)
        for task in tasks:
            task.cancel()

    return stop
