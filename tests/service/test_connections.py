"""Connection limits against a real server, with raw sockets: a header bomb, unfinished headers, a stalled body,
slowloris, and uvicorn's own errors in the service's JSON."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.connections import stop_handshakes
from tests.server_process import ServerProcess, start_server
from tests.service.test_server import metrics, value

HEADER_LIMIT = 8192
SO_LOCK_FILTER = 44  # Linux: once set, attaching a socket filter fails with EPERM


@pytest.fixture(scope="module")
def guarded(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with one-second header and body timeouts and an 8 KiB header limit."""
    log_path = tmp_path_factory.mktemp("guarded") / "server.log"
    running = start_server(
        model_dir,
        log_path,
        RIDE_HEADER_TIMEOUT_S="1",
        RIDE_BODY_TIMEOUT_S="1",
        RIDE_MAX_HEADER_BYTES=str(HEADER_LIMIT),
    )
    yield running
    running.stop()


def connect(server: ServerProcess, timeout: float = 15.0) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout if it never does)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length: its head and its body."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        if not chunk:
            return received
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")
    )
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return head + b"\r\n\r\n" + body


def error_of(reply: bytes) -> tuple[int, str]:
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower(), head
    return int(head.split()[1]), json.loads(body)["error"]["code"]


def closed(server: ServerProcess, reason: str) -> float:
    return value(metrics(server), "ride_connections_closed_total", reason=reason)


def test_a_header_bomb_gets_431_and_is_not_buffered(guarded: ServerProcess) -> None:
    before = closed(guarded, "header_too_large")
    with connect(guarded) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Bomb: " + b"a" * (2 * HEADER_LIMIT))
        assert error_of(read_until_closed(sock)) == (431, "header_too_large")
    # A client that keeps sending header bytes cannot make the server hold them: it stops reading.
    with connect(guarded) as sock, pytest.raises(OSError):  # reset or broken pipe, not a 100 MiB buffer
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Bomb: ")
        for _ in range(100):
            sock.sendall(b"a" * (1 << 20))
    assert closed(guarded, "header_too_large") == before + 2
    assert httpx.get(f"{guarded.url}/healthz").status_code == 200


def test_unfinished_headers_time_out(guarded: ServerProcess) -> None:
    before = closed(guarded, "header_timeout")
    with connect(guarded) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")  # never the blank line
        assert error_of(read_until_closed(sock)) == (408, "request_timeout")
    with connect(guarded) as idle:  # connected, sent nothing: closed without a response
        assert read_until_closed(idle) == b""
    assert closed(guarded, "header_timeout") == before + 2


def test_a_stalled_body_times_out(guarded: ServerProcess) -> None:
    before = closed(guarded, "body_timeout")
    with connect(guarded) as sock:
        head = b"POST /classify HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
        sock.sendall(head + b"\x89PNG\r\n\x1a\n")  # 8 of the 100,000 bytes announced, then nothing
        with contextlib.suppress(ConnectionResetError):
            read_until_closed(sock)
    assert closed(guarded, "body_timeout") == before + 1
    assert httpx.get(f"{guarded.url}/healthz").status_code == 200


def test_uvicorns_own_400s_are_json_and_counted(guarded: ServerProcess) -> None:
    before = value(metrics(guarded), "ride_requests_total", route="unmatched", status="400")
    bad = [
        b"GET /healthz HTTP/1.1\r\nHost: test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
        b"NOT HTTP AT ALL\r\n\r\n",
        # Longer than its Content-Length: the excess is read as a second request, which is not HTTP.
        b"POST /healthz HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n\r\nabcdef\r\n\r\n",
    ]
    for request in bad:
        with connect(guarded) as sock:
            sock.sendall(request)
            reply = read_until_closed(sock)
            last = reply[reply.rfind(b"HTTP/1.1 ") :]
            assert error_of(last) == (400, "bad_request"), reply
    assert value(metrics(guarded), "ride_requests_total", route="unmatched", status="400") == before + len(bad)


def test_slowloris_cannot_starve_the_server(model_dir: Path, tmp_path: Path) -> None:
    """With 128 file descriptors, 200 connections that never finish their headers used to exhaust them: every
    normal request then failed. Now the oldest of them are closed to make room."""
    server = start_server(model_dir, tmp_path / "server.log", max_files=128)
    sockets = []
    try:
        for _ in range(200):
            sock = connect(server)
            with contextlib.suppress(OSError):  # refused while the server had not read the others' yet
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: ")
            sockets.append(sock)
        time.sleep(0.5)  # the server reads what they sent: each one is a request stuck in its headers
        response = httpx.get(f"{server.url}/healthz", timeout=10.0)
        assert response.status_code == 200
        samples = metrics(server)
        capacity = value(samples, "ride_connections_capacity")
        assert 0 < capacity <= 128 - 64
        assert value(samples, "ride_connections_closed_total", reason="over_capacity") >= 200 - capacity
    finally:
        for sock in sockets:
            sock.close()
        server.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="socket filters are Linux only")
def test_a_refused_socket_filter_does_not_break_the_shutdown() -> None:
    """Docker refused the drain's socket filter with EPERM, and the server died at SIGTERM with exit 1 and a
    traceback. A locked filter (SO_LOCK_FILTER) makes the kernel refuse it the same way, here."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setsockopt(socket.SOL_SOCKET, SO_LOCK_FILTER, 1)
        assert stop_handshakes(listener) is False
        with socket.create_connection(listener.getsockname(), timeout=5):
            pass  # new connections still arrive: nothing was attached
