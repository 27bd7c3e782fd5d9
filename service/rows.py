"""A request's rows (one image each) through the shared dynamic batcher: decoded one by one, with the row's index
in any error; queued together (all of them or none); answered together, or not at all.

Every protocol uses it (`/classify` with several files, KServe v1 instances, Open Inference Protocol v2 rows), so
that a row from any of them shares batches with the others and keeps its own threshold and answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from starlette.types import Receive

from service.batcher import RowResult
from service.decode_pool import DecodePool
from service.disconnect import unless_client_leaves
from service.errors import ImageTooLargeError, InvalidImageError, InvalidInputError, ServiceError, TooManyRowsError
from service.images import ImageDecoder
from service.model_version import ModelVersion

# Images up to this size decode on the event loop (~0.1 ms); larger ones go to a thread so the loop stays free.
INLINE_DECODE_PIXELS = 128 * 128


def check_row_count(rows: int, limit: int) -> None:
    """
    Raises:
        InvalidInputError: no row at all.
        TooManyRowsError: more than ``limit`` rows.
    """
    if rows < 1:
        raise InvalidInputError("the request has no image: send at least one row")
    if rows > limit:
        raise TooManyRowsError(
            f"the request has {rows} rows (images), above the limit of {limit} per request (RIDE_MAX_REQUEST_ROWS): "
            "split it into several requests"
        )


async def decode_image(data: bytes, decoder: ImageDecoder, pool: DecodePool) -> np.ndarray:
    """``data`` as the model's normalised ``[3, H, W]`` input; the size is checked from the header before any pixel
    is decoded, and a large image waits for one of the ``pool``'s threads (503 when it is full)."""
    image = decoder.open(data)
    width, height = image.size
    if width * height <= INLINE_DECODE_PIXELS:
        return decoder.to_array(image)
    return await pool.run(decoder.to_array, image)


def _in_row(error: ServiceError, row: int) -> ServiceError:
    return type(error)(f"row {row}: {error}")


async def decode_rows(images: Sequence[bytes], decoder: ImageDecoder, pool: DecodePool) -> list[np.ndarray]:
    """Every image decoded, one after another (a burst of large images would otherwise fill the pool by itself).

    Raises:
        InvalidImageError, ImageTooLargeError: for the first bad row, its index in the message.
    """
    decoded = []
    for row, data in enumerate(images):
        try:
            decoded.append(await decode_image(data, decoder, pool))
        except (InvalidImageError, ImageTooLargeError) as error:
            raise _in_row(error, row) from None
    return decoded


@dataclass
class QueuedRows:
    """A request's rows in the batcher's queue."""

    futures: list[asyncio.Future[RowResult]]

    async def results(self, receive: Receive) -> list[RowResult]:
        """Every row's result, in order. When one row fails (its deadline passed) or the client leaves, the rows
        still waiting are taken out of the queue: nothing of the request runs on for nobody."""
        gathered = asyncio.gather(*self.futures)
        try:
            return await unless_client_leaves(receive, gathered)
        finally:
            for future in self.futures:
                if not future.done():
                    future.cancel()


def queue_rows(served: ModelVersion, images: Sequence[np.ndarray], *, threshold: float, max_experts: int) -> QueuedRows:
    """Queue ``images`` (decoded rows) in the batcher, all with the same cascade settings."""
    return QueuedRows(served.batcher.enqueue_rows(images, threshold=threshold, max_experts=max_experts))


def observe_rows(
    served: ModelVersion, rows: Sequence[RowResult], images: Sequence[np.ndarray], threshold: float
) -> None:
    """One observation per row answered at ``threshold``: the classification metrics (by the class group of the
    answer), the adaptive controller's queue wait when the row ran at the serving point, and the shadow's sample."""
    at_serving_point = threshold == served.default_threshold
    for row, image in zip(rows, images, strict=True):
        class_id = int(np.argmax(row.probabilities))  # the answer: the first most probable class
        group = served.groups[class_id]
        served.metrics.observe_classification(
            queue_seconds=row.queue_seconds,
            experts_used=row.experts_used,
            relative_compute=row.relative_compute,
            group=group,
        )
        if at_serving_point:
            served.observe_wait(row.queue_seconds)
        served.shadow.offer(image, class_id, group)
