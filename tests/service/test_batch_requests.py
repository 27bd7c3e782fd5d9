"""Several images in one request, against the real shared server: /classify with repeated ``file`` fields, answered
in order and as each image alone; a bad row fails the whole request with its index; the row limit is a 413; rows
of concurrent requests share the dynamic batcher and keep their own thresholds."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.server_process import ServerProcess, start_server
from tests.service.conftest import NUM_EXPERTS
from tests.service.test_server import expected_rows, metrics, post_image, total


@pytest.fixture
def client(server: ServerProcess):
    with httpx.Client(base_url=server.url, timeout=30.0) as http:
        yield http


def files(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]


def test_several_files_are_answered_in_order_as_alone(
    server: ServerProcess, client: httpx.Client, test_images, loaded_model, model_dir: Path
) -> None:
    images = [data for _, data in test_images[:8]]
    before = metrics(server)
    response = client.post("/classify", files=files(images), params={"top_k": 2})
    after = metrics(server)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    expected = expected_rows(loaded_model, model_dir, images, thresholds=0.5, max_experts=NUM_EXPERTS)
    assert [r["class_id"] for r in results] == expected.probabilities.argmax(1).tolist()
    assert [r["experts_used"] for r in results] == expected.experts_used.tolist()
    assert all(len(r["top_k"]) == 2 for r in results)
    # One observation per row, not per request.
    # (summed over the class groups of the answers: the `group` label)
    assert total(after, "ride_experts_used_count") - total(before, "ride_experts_used_count") == 8


def test_one_bad_row_fails_the_request_naming_it(client: httpx.Client, test_images) -> None:
    images = [test_images[0][1], b"not an image at all", test_images[1][1]]
    response = client.post("/classify", files=files(images))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_image" and error["message"].startswith("row 1:")
    text_part = [*files(images[:1]), ("file", ("notes.txt", b"hello", "text/plain"))]
    mixed = client.post("/classify", files=text_part)
    assert mixed.status_code == 415 and "row 1" in mixed.json()["error"]["message"]


def test_row_limit_is_a_413_with_a_clear_message(client: httpx.Client, test_images) -> None:
    response = client.post("/classify", files=files([test_images[0][1]] * 65))
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "too_many_rows" and "limit of 64" in error["message"]


def test_the_row_limit_is_a_setting(model_dir: Path, tmp_path: Path, test_images) -> None:
    # Its own server: at the default limit, 64 rows make two batches, and on a busy machine the second can wait
    # past the shared server's queue deadline.
    server = start_server(model_dir, tmp_path / "server.log", RIDE_MAX_REQUEST_ROWS="4")
    try:
        with httpx.Client(base_url=server.url, timeout=30.0) as http:
            at_limit = http.post("/classify", files=files([data for _, data in test_images[:4]]))
            above = http.post("/classify", files=files([data for _, data in test_images[:5]]))
    finally:
        server.stop()
    assert at_limit.status_code == 200 and len(at_limit.json()["results"]) == 4
    assert above.status_code == 413 and "5 rows" in above.json()["error"]["message"]
    assert "limit of 4" in above.json()["error"]["message"]


def test_body_limit_still_holds_for_batches(client: httpx.Client, test_images) -> None:
    big = test_images[0][1] * (100 * 1024 // len(test_images[0][1]) + 1)  # ~100 KiB each, 6 of them > 512 KiB
    response = client.post("/classify", files=files([big] * 6))
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"


def test_raw_octet_stream_body_is_an_image(client: httpx.Client, test_images) -> None:
    raw = post_image(client, test_images[0][1], "application/octet-stream")
    typed = post_image(client, test_images[0][1], "image/jpeg")
    assert raw.status_code == 200 and raw.json()["top_k"] == typed.json()["top_k"]


def test_rows_of_concurrent_requests_share_batches_and_keep_their_thresholds(
    server: ServerProcess, test_images, loaded_model, model_dir: Path
) -> None:
    images = [data for _, data in test_images[:6]]  # 18 rows: one or two batches, far from the queue deadline
    thresholds = (0.0, 0.5, 1.0)

    async def concurrently() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as http:
            return await asyncio.gather(
                *(http.post("/classify", files=files(images), params={"threshold": t}) for t in thresholds)
            )

    for response, threshold in zip(asyncio.run(concurrently()), thresholds, strict=True):
        assert response.status_code == 200, response.text
        expected = expected_rows(loaded_model, model_dir, images, thresholds=threshold, max_experts=NUM_EXPERTS)
        assert [r["experts_used"] for r in response.json()["results"]] == expected.experts_used.tolist()
