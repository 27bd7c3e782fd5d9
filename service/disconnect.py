"""Noticing that a client went away while its request waits, so that its work is dropped.

uvicorn reports a closed connection only to a request that reads (``http.disconnect``); a classification has read
its whole body by the time it waits in the queue, so `unless_client_leaves` keeps one read pending beside the wait.
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

from starlette.types import Receive

from service.errors import ClientClosedError

T = TypeVar("T")


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass  # the body was read already: nothing else can arrive


async def unless_client_leaves(receive: Receive, future: asyncio.Future[T]) -> T:
    """``future``'s result; if the client disconnects first, ``future`` is cancelled and `ClientClosedError`
    raised."""
    watcher = asyncio.ensure_future(_disconnected(receive))
    left = False
    try:
        await asyncio.wait((future, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not future.done():  # the client left, or this request itself was cancelled
            left = True
            # A gathering future (several rows) is not cancelled at once but once its children are: the client
            # has left all the same.
            future.cancel()
        watcher.cancel()
    if left or future.cancelled():
        raise ClientClosedError("the client disconnected while its request waited")
    return future.result()
