"""Early shedding: a classification is refused before its body is read when the server cannot answer it in time.

Shedding only in the batcher, after the body was read and the image decoded on the same CPU, spent the work it
was meant to save: at 4x overload, goodput fell to half of capacity. Here a request is admitted only while the
requests ahead of it (in the batcher's queue, or admitted and still reading or decoding their image) are fewer
than ``max_queue_size`` and would take at most ``max_queue_wait_s`` to serve at the recent time of a batch
(`Batcher.expected_wait_s`). Otherwise it gets 503 + Retry-After at once, for the cost of its headers.

The refusal must cost far less than the work it saves: through FastAPI (routing, parameter validation, exception
handlers) it took about 0.5 ms of CPU, as much as classifying a 32x32 image, and at 4x overload goodput fell to
half of capacity. `early_refusal` is therefore answered by the connection itself (`service.connections`) as soon as
a request's headers are in, before any application code; the endpoint checks again when it takes its admission
(`Admission.admit`), which that check does not hold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from service.batcher import Batcher
from service.connections import Refusal
from service.errors import OverloadedError
from service.schemas import ErrorBody, ErrorDetail


class Admission:
    """Admits classifications while the queue ahead can be served within the bound."""

    def __init__(self, batcher: Batcher, *, max_queue_size: int, max_queue_wait_s: float) -> None:
        self._batcher = batcher
        self._max_queue_size = max_queue_size
        self._max_queue_wait_s = max_queue_wait_s
        self.wait_bound_s = max_queue_wait_s  # lowered by load-adaptive early exit at its floor (`service.adaptive`)
        self.in_progress = 0  # admitted, still reading or decoding: not yet in the batcher's queue

    def check(self) -> None:
        """Whether a new classification would be admitted now.

        Raises:
            OverloadedError: the queue ahead is full, or would take longer than the bound.
        """
        ahead = self._batcher.pending + self.in_progress
        if ahead >= self._max_queue_size:
            raise OverloadedError(f"{ahead} requests are already waiting; retry later")
        wait_s = self._batcher.expected_wait_s(ahead)
        if wait_s > self.wait_bound_s:
            raise OverloadedError(
                f"the expected wait for the {ahead} requests ahead is {wait_s * 1e3:.0f} ms, above the bound of "
                f"{self.wait_bound_s * 1e3:.0f} ms; retry later"
            )

    def bound_wait(self, seconds: float | None) -> None:
        """Admit only requests expected to wait at most ``seconds`` (at most the configured bound); None: the
        configured bound again."""
        self.wait_bound_s = self._max_queue_wait_s if seconds is None else min(seconds, self._max_queue_wait_s)

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold an admission while the request reads and decodes its image (until it is queued).

        Raises:
            OverloadedError: as `check`.
        """
        self.check()
        self.in_progress += 1
        try:
            yield
        finally:
            self.in_progress -= 1


def early_refusal(
    check: Callable[[str], None],
    path: str,
    retry_after_s: int,
    *,
    on_refused: Callable[[int], None],
    draining: Callable[[], bool],
) -> Refusal:
    """The connection guard's refusal (`service.connections`): ``POST path`` gets a complete 503 response while
    ``check`` (given the query string: the `Admission.check` of the model it names) refuses, reported to
    ``on_refused``; None lets the request through (always while ``draining``: the application then adds
    ``Connection: close``)."""
    target = path.encode()

    def refuse(method: bytes, url: bytes) -> bytes | None:
        route, _, query = url.partition(b"?")
        if method != b"POST" or route != target or draining():
            return None
        try:
            check(query.decode("latin-1"))
        except OverloadedError as error:
            on_refused(503)
            body = (
                ErrorBody(error=ErrorDetail(code=error.code, message=str(error)))
                .model_dump_json(exclude_none=True)
                .encode()
            )
            head = (
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                f"retry-after: {retry_after_s}\r\ncontent-length: {len(body)}\r\n\r\n"
            )
            return head.encode("ascii") + body
        return None

    return refuse
