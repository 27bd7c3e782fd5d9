"""Limits on connections, enforced where uvicorn reads them: header size, header and body read timeouts, and the
number of open connections.

uvicorn's HTTP protocol (httptools) has none of these: it buffers a request line and headers of any size (five
unfinished 100 MiB headers held 594 MB), never times out a connection that has not finished its headers or its
body (they stay open forever), and accepts connections until the process runs out of file descriptors (then every
request fails). Its ``h11_max_incomplete_event_size`` applies to the slower h11 protocol only, and its
``limit_concurrency`` answers plain-text 503s while still accepting every connection. So the server runs
`GuardedHttpToolsProtocol`, uvicorn's own protocol with these limits added, all of them shared through one
`ConnectionGuard`:

- request line and headers above ``max_header_bytes``: 431, then close;
- headers not complete ``header_timeout_s`` after the connection opened (or after the request's first byte on a
  kept-alive connection): 408 if part of a request arrived, then close;
- a pause longer than ``body_timeout_s`` while a body is arriving (and the server is reading it): close;
- more than ``max_connections`` open: the oldest connection that has sent part of its request headers and not
  the rest (slowloris), or that has been idle between requests for ``IDLE_EVICTION_S``, is closed to make room;
  if there is none, the new one gets 503. A connection whose request the server has not read yet is never
  closed for another: under overload the event loop reads late, and those clients have sent their request;
- parser errors (uvicorn's own plain-text 400) get the service's JSON error body;
- a request the guard's ``refusal`` refuses (a classification while the server is overloaded,
  `service.admission.early_refusal`) is answered as soon as its headers are in, without the application: through
  the application a refusal cost as much CPU as a classification, and at 4x overload goodput fell to half;
- at shutdown, an idle connection is closed only after ``DRAIN_IDLE_GRACE_S`` (uvicorn closes it at once, and
  a request the client had just sent on it was lost).

Every response sent here and every connection closed by a limit is reported to the guard's observer (metrics).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import resource
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from service.schemas import ErrorBody, ErrorDetail

logger = logging.getLogger(__name__)

# File descriptors the process needs besides its connections: model files, logs, event loop, pipes.
RESERVED_DESCRIPTORS = 64
# Why a connection was closed by a limit (the `reason` label of ride_connections_closed_total).
HEADER_TOO_LARGE = "header_too_large"
HEADER_TIMEOUT = "header_timeout"
BODY_TIMEOUT = "body_timeout"
OVER_CAPACITY = "over_capacity"
BAD_REQUEST = "bad_request"
DRAINED = "drained"
CLOSE_REASONS = (HEADER_TOO_LARGE, HEADER_TIMEOUT, BODY_TIMEOUT, OVER_CAPACITY, BAD_REQUEST, DRAINED)
# When the server shuts down, an idle kept-alive connection stays open this long, so that a request already on its
# way is answered (with Connection: close) instead of meeting a closed socket.
DRAIN_IDLE_GRACE_S = 1.0
# An idle kept-alive connection may be closed to make room for a new one once it has been idle this long (a client
# reusing it at that moment would lose its request, as at shutdown).
IDLE_EVICTION_S = 1.0

# (reason, status of the response sent or None when the connection was closed without one)
ClosedObserver = Callable[[str, int | None], None]
# (method, request target) -> a complete response to send instead of running the application, or None
Refusal = Callable[[bytes, bytes], bytes | None]


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float


def fit_to_descriptor_limit(max_connections: int) -> int:
    """``max_connections``, lowered if the file-descriptor limit cannot hold that many connections plus what the
    process needs besides. The soft limit is first raised to the hard one (allowed without privileges)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return max_connections
    room = max(1, soft - RESERVED_DESCRIPTORS)
    if max_connections > room:
        logger.warning(
            "RIDE_MAX_CONNECTIONS %d lowered to %d: the file-descriptor limit is %d (ulimit -n)",
            max_connections,
            room,
            soft,
        )
    return min(max_connections, room)


# Classic BPF "return 0": a socket filter that drops every packet it sees.
_DROP_ALL = struct.pack("HBBI", 0x06, 0, 0, 0)
_SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)


def stop_handshakes(listener: socket.socket) -> bool:
    """Make the kernel drop new connection attempts (SYNs) to ``listener``, a listening socket, while the
    connections it has already queued can still be accepted. Linux only; False elsewhere.

    Closing a listening socket resets the connections still in its accept queue: clients that had connected and sent
    their request lose it. Dropped SYNs instead make a client retry about a second later, when the socket is gone
    and the connection is refused: a clean error, and nothing was sent.
    """
    if not sys.platform.startswith("linux"):
        return False
    program = ctypes.create_string_buffer(_DROP_ALL)
    try:
        listener.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, struct.pack("@HP", 1, ctypes.addressof(program)))
    except OSError as error:
        # Container runtimes may refuse socket filters (EPERM under Docker here). Shutdown then goes on without
        # this refinement: the listener closes as uvicorn closes it, and the exit status stays honest.
        logger.warning("new connections are not held off during the drain: socket filter refused (%s)", error)
        return False
    return True  # the kernel copied the program: the buffer may go


def _error_response(status: int, reason: str, code: str, message: str) -> bytes:
    body = ErrorBody(error=ErrorDetail(code=code, message=message)).model_dump_json(exclude_none=True).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class ConnectionGuard:
    """The limits, the open connections (oldest first) and the observer, shared by every connection of a server."""

    def __init__(
        self, limits: ConnectionLimits, on_closed: ClosedObserver | None = None, refusal: Refusal | None = None
    ) -> None:
        self.limits = limits
        self.on_closed = on_closed
        self.refusal = refusal
        self._open: dict[GuardedHttpToolsProtocol, None] = {}  # insertion order: oldest first

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def admit(self, connection: GuardedHttpToolsProtocol) -> bool:
        """Register ``connection``; at capacity, close the oldest evictable one to make room (see the module
        docstring). False when none is."""
        if len(self._open) >= self.limits.max_connections:
            now = connection.loop.time()
            victim = next((c for c in self._open if c.evictable(now)), None)
            if victim is None:
                return False
            victim.close_for(OVER_CAPACITY)
            self._open.pop(victim, None)
        self._open[connection] = None
        return True

    def forget(self, connection: GuardedHttpToolsProtocol) -> None:
        self._open.pop(connection, None)

    def closed(self, reason: str, status: int | None) -> None:
        if self.on_closed is not None:
            self.on_closed(reason, status)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of a `ConnectionGuard` (see the module docstring).

    uvicorn creates one per connection; pass ``functools.partial(GuardedHttpToolsProtocol, guard=guard)`` as
    ``uvicorn.Config(http=...)``.
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        guard: ConnectionGuard,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard = guard
        self._waiting_for_headers = True  # from the connection's start, and from each request's first byte
        self._header_bytes = 0
        self._request_started = False  # a byte of the current request has arrived
        self._in_body = False
        self._timer: asyncio.TimerHandle | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0  # when the last response ended
        self._discarding = False  # reading the body of a request refused early

    # -- the connection -------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.guard.admit(self):
            message = f"{self.guard.limits.max_connections} connections are open and busy; retry later"
            self._respond_and_close(503, "Service Unavailable", OVER_CAPACITY, "overloaded", message)
            return
        self._arm(self.guard.limits.header_timeout_s, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        self.guard.forget(self)
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """The server is stopping: a request in progress ends with ``Connection: close`` (uvicorn's own rule); an
        idle connection closes after a grace rather than at once."""
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
            return
        self._drain_timer = self.loop.call_later(DRAIN_IDLE_GRACE_S, self._close_if_idle)

    def _close_if_idle(self) -> None:
        self._drain_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # a request arrived during the grace: closed after its response
        elif not self._in_body:
            self.close_for(DRAINED)

    def evictable(self, now: float) -> bool:
        """Stuck in the middle of its request headers, or idle between requests for `IDLE_EVICTION_S`."""
        if self._waiting_for_headers:
            return self._request_started
        idle = not self._in_body and self.cycle is not None and self.cycle.response_complete
        return idle and now - self._idle_since >= IDLE_EVICTION_S

    def on_response_complete(self) -> None:
        self._idle_since = self.loop.time()
        super().on_response_complete()

    def close_for(self, reason: str) -> None:
        """Close at once (no response), reporting ``reason``."""
        if not self.transport.is_closing():
            self.guard.closed(reason, None)
            self.transport.close()

    # -- reading ----------------------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        was_waiting = self._waiting_for_headers
        if self._in_body:
            self._arm(self.guard.limits.body_timeout_s, self._body_timeout)
        super().data_received(data)
        if was_waiting and self._waiting_for_headers and not self.transport.is_closing():
            # Counted per chunk read: the parser holds at most the limit plus one read (uvloop reads <= 256 KiB).
            self._header_bytes += len(data)
            limit = self.guard.limits.max_header_bytes
            if self._header_bytes > limit:
                message = f"request line and headers are above the limit of {limit} bytes"
                self._respond_and_close(
                    431, "Request Header Fields Too Large", HEADER_TOO_LARGE, "header_too_large", message
                )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._waiting_for_headers = True
        self._request_started = True
        self._header_bytes = 0
        if self._timer is None:  # a kept-alive connection: its request's headers are timed from its first byte
            self._arm(self.guard.limits.header_timeout_s, self._header_timeout)

    def on_headers_complete(self) -> None:
        self._waiting_for_headers = False
        self._disarm()
        self._in_body = self._has_body()
        if self._in_body:
            self._arm(self.guard.limits.body_timeout_s, self._body_timeout)
        if self._refused_early():
            return
        super().on_headers_complete()
        if self._drain_timer is not None and self.cycle is not None:
            self.cycle.keep_alive = False  # arrived during the shutdown grace: answered, then closed

    def _refused_early(self) -> bool:
        """Answer the request here if the guard's refusal says so (an overloaded server refusing a
        classification), without the application; its body is then read and dropped, and the connection kept."""
        refusal = self.guard.refusal
        busy = self.cycle is not None and not self.cycle.response_complete  # pipelined: answers keep their order
        if refusal is None or busy:
            return False
        response = refusal(self.parser.get_method(), self.url)
        if response is None:
            return False
        if self.expect_100_continue:  # the client sends no body now: the connection cannot be reused
            self.transport.write(response.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1))
            self.transport.close()
            return True
        self.transport.write(response)
        self._discarding = True
        return True

    def on_body(self, body: bytes) -> None:
        if not self._discarding:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_body = False
        self._request_started = False
        self._disarm()
        if self._discarding:  # the request refused early is over: on to the next one
            self._discarding = False
            self.on_response_complete()
            return
        super().on_message_complete()

    def _has_body(self) -> bool:
        for name, value in self.headers:
            if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"0", b"")):
                return True
        return False

    # -- timeouts ---------------------------------------------------------------------------------------------------

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _header_timeout(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if not self._request_started:
            self.close_for(HEADER_TIMEOUT)  # connected and sent nothing
            return
        message = f"request headers not complete within {self.guard.limits.header_timeout_s:g} s"
        self._respond_and_close(408, "Request Timeout", HEADER_TIMEOUT, "request_timeout", message)

    def _body_timeout(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self.flow.read_paused:  # the server is not reading: the pause is not the client's
            self._arm(self.guard.limits.body_timeout_s, self._body_timeout)
            return
        # The application owns the response; it sees the disconnect on its next read.
        self.close_for(BODY_TIMEOUT)

    # -- responses sent by the protocol itself ----------------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        detail = msg.rstrip(".")
        self._respond_and_close(400, "Bad Request", BAD_REQUEST, "bad_request", f"{detail[:1].lower()}{detail[1:]}")

    def _respond_and_close(self, status: int, phrase: str, reason: str, code: str, message: str) -> None:
        self._disarm()
        if self.transport.is_closing():
            return
        self.guard.closed(reason, status)
        self.transport.write(_error_response(status, phrase, code, message))
        self.transport.close()
