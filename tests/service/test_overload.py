"""Overload and abandoned work: shedding before the body is read, deadlines in the queue, clients that leave
while queued or in the middle of their upload. Batcher tests run the real cascade; server tests a real server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from cascade import run_cascade
from service.admission import Admission
from service.batcher import Batcher
from service.errors import OverloadedError
from tests.server_process import ServerProcess, start_server
from tests.service.conftest import NUM_EXPERTS
from tests.service.test_batcher import images  # noqa: F401  (fixture)
from tests.service.test_connections import connect, read_response
from tests.service.test_server import metrics, value

# Batches wait up to 2 s for company, so requests stay queued long enough to be refused or abandoned.
QUEUE_SIZE = 6


def slow_batcher(model, seconds_per_batch: float, **options: float) -> Batcher:
    """The real cascade, plus ``seconds_per_batch`` of waiting: a model that is slow on purpose."""

    def infer(batch: np.ndarray, thresholds: np.ndarray, max_experts: np.ndarray):
        time.sleep(seconds_per_batch)
        return run_cascade(model, batch, thresholds=thresholds, max_experts=max_experts)

    settings = {"max_batch_size": 1, "max_wait_s": 0.0, "max_queue_size": 64, **options}
    return Batcher(infer, **settings)


def test_a_request_still_queued_at_its_deadline_is_dropped(loaded_model, images: np.ndarray) -> None:  # noqa: F811
    async def scenario() -> list[object]:
        batcher = slow_batcher(loaded_model, 0.3, max_queue_wait_s=0.1)
        await batcher.start()
        outcomes = await asyncio.gather(
            *(batcher.submit(image, threshold=0.5, max_experts=NUM_EXPERTS) for image in images[:3]),
            return_exceptions=True,
        )
        assert batcher.pending == 0
        await batcher.stop(1.0)
        return outcomes

    first, *late = asyncio.run(scenario())
    assert not isinstance(first, Exception)
    for outcome in late:
        assert isinstance(outcome, OverloadedError) and "above the bound of 100 ms" in str(outcome)


def test_admission_refuses_when_the_expected_wait_is_above_the_bound(loaded_model, images: np.ndarray) -> None:  # noqa: F811
    async def scenario() -> None:
        batcher = slow_batcher(loaded_model, 0.1, max_wait_s=5.0)
        await batcher.start()
        assert batcher.expected_wait_s(100) == 0  # nothing is known before the first batch
        # One batch teaches the batcher the time of a batch (0.1 s and the cascade); batches hold one row here.
        await batcher.submit(images[0], threshold=0.5, max_experts=1)
        batch_s = batcher.expected_wait_s(1)
        assert batch_s >= 0.1
        admission = Admission(batcher, max_queue_size=64, max_queue_wait_s=2.5 * batch_s)
        queued = [batcher.enqueue(image, threshold=0.5, max_experts=1) for image in images[:2]]
        with admission.admit():  # 2 rows ahead
            queued.append(batcher.enqueue(images[2], threshold=0.5, max_experts=1))
        with pytest.raises(OverloadedError, match="expected wait"), admission.admit():  # 3 rows ahead
            pass
        queued[0].cancel()  # a client that leaves takes its row out of the estimate at once
        await asyncio.sleep(0)
        with admission.admit():
            pass
        for future in queued:
            future.cancel()
        await batcher.stop(0.01)

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def slow_batches(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log_path = tmp_path_factory.mktemp("slow-batches") / "server.log"
    running = start_server(
        model_dir,
        log_path,
        RIDE_MAX_WAIT_MS="2000",
        RIDE_WAIT_WHEN_IDLE="true",
        RIDE_MAX_QUEUE_WAIT_MS="10000",
        RIDE_MAX_BATCH_SIZE="64",
        RIDE_MAX_QUEUE_SIZE=str(QUEUE_SIZE),
    )
    yield running
    running.stop()


def request_bytes(data: bytes) -> bytes:
    head = f"POST /classify HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\nContent-Length: {len(data)}\r\n\r\n"
    return head.encode() + data


def wait_for_queue_depth(server: ServerProcess, depth: int) -> None:
    deadline = time.monotonic() + 10
    while value(metrics(server), "ride_queue_depth") != depth and time.monotonic() < deadline:
        time.sleep(0.02)
    assert value(metrics(server), "ride_queue_depth") == depth


def test_overload_is_refused_before_the_body_is_read(slow_batches: ServerProcess, test_images) -> None:
    queued = [connect(slow_batches) for _ in range(QUEUE_SIZE)]
    try:
        for sock, (_, data) in zip(queued, test_images, strict=False):
            sock.sendall(request_bytes(data))
        wait_for_queue_depth(slow_batches, QUEUE_SIZE)
        before = metrics(slow_batches)
        with connect(slow_batches, timeout=5.0) as late:
            # Headers announcing 100 kB, and no body yet: the answer must not wait for it.
            late.sendall(
                b"POST /classify HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
            )
            reply = read_response(late)
            assert reply.startswith(b"HTTP/1.1 503"), reply
            assert b"retry-after: 1" in reply.lower() and b'"overloaded"' in reply
            # The connection stays usable: the refused body is read and dropped, then the next request answered.
            late.sendall(b"\0" * 100000 + b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            assert read_response(late).startswith(b"HTTP/1.1 200")
        after = metrics(slow_batches)
        assert value(after, "ride_requests_total", route="/classify", status="503") == (
            value(before, "ride_requests_total", route="/classify", status="503") + 1
        )
        for sock in queued:
            assert read_response(sock).startswith(b"HTTP/1.1 200")
    finally:
        for sock in queued:
            sock.close()


def test_clients_that_leave_are_dropped_and_counted_as_499(slow_batches: ServerProcess, test_images) -> None:
    before = metrics(slow_batches)
    leaving = [connect(slow_batches) for _ in range(QUEUE_SIZE)]
    for sock, (_, data) in zip(leaving, test_images, strict=False):
        sock.sendall(request_bytes(data))
    wait_for_queue_depth(slow_batches, QUEUE_SIZE)
    for sock in leaving:
        sock.close()
    wait_for_queue_depth(slow_batches, 0)  # out of the queue at once, not when their batch would have run
    time.sleep(2.5)  # past the batch's 2 s wait for company
    after = metrics(slow_batches)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("ride_requests_total", route="/classify", status="499") == QUEUE_SIZE
    assert delta("ride_requests_total", route="/classify", status="200") == 0
    assert delta("ride_batch_size_count") == 0  # nothing ran for them


def test_a_client_that_leaves_mid_upload_is_a_499_not_a_500(slow_batches: ServerProcess) -> None:
    before = metrics(slow_batches)
    with connect(slow_batches) as sock:
        sock.sendall(
            b"POST /classify HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
        )
        sock.sendall(b"\x89PNG\r\n\x1a\n" + b"\0" * 1000)
        time.sleep(0.2)  # the server is reading the body
    answered = before
    deadline = time.monotonic() + 10
    while answered == before and time.monotonic() < deadline:
        time.sleep(0.05)
        after = metrics(slow_batches)
        if value(after, "ride_request_duration_seconds_count", route="/classify") > value(
            before, "ride_request_duration_seconds_count", route="/classify"
        ):
            answered = after
    assert value(answered, "ride_requests_total", route="/classify", status="499") == (
        value(before, "ride_requests_total", route="/classify", status="499") + 1
    )
    assert value(answered, "ride_requests_total", route="/classify", status="500") == 0
    assert "Traceback" not in slow_batches.log()


def test_a_batch_request_whose_client_leaves_is_dropped_whole(slow_batches: ServerProcess, test_images) -> None:
    """All rows of a several-file request leave the queue with their client, counted once as a 499."""
    files = [("file", (f"{i}.jpg", data, "image/jpeg")) for i, (_, data) in enumerate(test_images[:3])]
    upload = httpx.Request("POST", f"{slow_batches.url}/classify", files=files)
    body = upload.read()
    head = (
        f"POST /classify HTTP/1.1\r\nHost: test\r\nContent-Type: {upload.headers['content-type']}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    before = metrics(slow_batches)
    with connect(slow_batches) as sock:
        sock.sendall(head.encode() + body)
        wait_for_queue_depth(slow_batches, 3)
    wait_for_queue_depth(slow_batches, 0)
    time.sleep(0.5)
    after = metrics(slow_batches)
    assert value(after, "ride_requests_total", route="/classify", status="499") == (
        value(before, "ride_requests_total", route="/classify", status="499") + 1
    )
    assert value(after, "ride_requests_total", route="/classify", status="500") == value(
        before, "ride_requests_total", route="/classify", status="500"
    )
    assert value(after, "ride_batch_size_count") == value(before, "ride_batch_size_count")
