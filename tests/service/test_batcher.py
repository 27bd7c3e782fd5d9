"""Dynamic batching with the real cascade: batch formation, bounds, draining, and a free event loop."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from cascade import run_cascade
from export.manifest import load_manifest
from service.batcher import Batcher, batch_buckets, padded_size
from service.errors import NotReadyError, OverloadedError
from service.images import ImageDecoder
from tests.service.conftest import NUM_EXPERTS


@pytest.fixture(scope="module")
def images(model_dir: Path, test_images: list[tuple[str, bytes]]) -> np.ndarray:
    decoder = ImageDecoder(load_manifest(model_dir).input, max_pixels=10**6)
    return np.stack([decoder.decode(data) for _, data in test_images])


def make_batcher(model, sizes: list[int], **options: float) -> Batcher:
    def infer(images: np.ndarray, thresholds: np.ndarray, max_experts: np.ndarray):
        return run_cascade(model, images, thresholds=thresholds, max_experts=max_experts)

    settings = {"max_batch_size": 32, "max_wait_s": 0.2, "max_queue_size": 256, **options}
    return Batcher(infer, on_batch=lambda size, seconds: sizes.append(size), **settings)


def test_concurrent_requests_share_a_batch_and_get_their_own_rows(loaded_model, images: np.ndarray) -> None:
    sizes: list[int] = []
    thresholds = np.linspace(0.2, 0.8, 20)

    async def scenario():
        batcher = make_batcher(loaded_model, sizes)
        await batcher.start()
        results = await asyncio.gather(
            *(batcher.submit(images[i], threshold=float(thresholds[i]), max_experts=NUM_EXPERTS) for i in range(20))
        )
        await batcher.stop(1.0)
        return results

    results = asyncio.run(scenario())
    assert sizes == [20]
    expected = run_cascade(loaded_model, images[:20], thresholds=thresholds, max_experts=NUM_EXPERTS)
    np.testing.assert_array_equal([r.experts_used for r in results], expected.experts_used)
    np.testing.assert_allclose(np.stack([r.probabilities for r in results]), expected.probabilities, atol=1e-6)
    assert all(r.batch_size == 20 and 0 <= r.queue_seconds < 5 for r in results)


def test_a_lone_request_runs_without_waiting_for_company(loaded_model, images: np.ndarray) -> None:
    """With an hour of batching wait, a request that finds the queue empty still runs at once (it would hang
    here without the fast path); requests that are queued together still share a batch."""
    sizes: list[int] = []

    async def scenario():
        batcher = make_batcher(loaded_model, sizes, max_wait_s=3600.0)
        await batcher.start()
        alone = await asyncio.wait_for(batcher.submit(images[0], threshold=0.5, max_experts=1), 60)
        again = await asyncio.wait_for(batcher.submit(images[1], threshold=0.5, max_experts=1), 60)
        await batcher.stop(1.0)
        return alone, again

    alone, again = asyncio.run(scenario())
    assert sizes == [1, 1] and alone.batch_size == again.batch_size == 1


def test_batches_never_exceed_the_maximum(loaded_model, images: np.ndarray) -> None:
    sizes: list[int] = []

    async def scenario():
        batcher = make_batcher(loaded_model, sizes, max_batch_size=16)
        await batcher.start()
        await asyncio.gather(*(batcher.submit(image, threshold=0.5, max_experts=1) for image in images[:40]))
        await batcher.stop(1.0)

    asyncio.run(scenario())
    assert sizes == [16, 16, 8]


def test_full_queue_refuses_at_once(loaded_model, images: np.ndarray) -> None:
    sizes: list[int] = []

    async def scenario():
        batcher = make_batcher(loaded_model, sizes, max_queue_size=3)
        await batcher.start()
        outcomes = await asyncio.gather(
            *(batcher.submit(image, threshold=0.5, max_experts=1) for image in images[:5]), return_exceptions=True
        )
        await batcher.stop(1.0)
        return outcomes

    outcomes = asyncio.run(scenario())
    assert [type(o) for o in outcomes[3:]] == [OverloadedError, OverloadedError]
    assert all(not isinstance(o, Exception) for o in outcomes[:3])
    assert sizes == [3]


def test_stop_drains_accepted_requests_then_refuses(loaded_model, images: np.ndarray) -> None:
    sizes: list[int] = []

    async def scenario():
        batcher = make_batcher(loaded_model, sizes, max_wait_s=0.3)
        await batcher.start()
        tasks = [asyncio.create_task(batcher.submit(image, threshold=0.5, max_experts=2)) for image in images[:5]]
        await asyncio.sleep(0.02)
        assert batcher.pending == 5
        await batcher.stop(5.0)
        with pytest.raises(NotReadyError):
            await batcher.submit(images[0], threshold=0.5, max_experts=2)
        return await asyncio.gather(*tasks)

    results = asyncio.run(scenario())
    assert len(results) == 5 and sizes == [5]


def test_stop_timeout_answers_instead_of_hanging(loaded_model, images: np.ndarray) -> None:
    async def scenario():
        batcher = make_batcher(loaded_model, [], max_wait_s=30.0)
        await batcher.start()
        tasks = [asyncio.create_task(batcher.submit(image, threshold=0.5, max_experts=2)) for image in images[:3]]
        await asyncio.sleep(0.02)
        await batcher.stop(0.05)
        return await asyncio.gather(*tasks, return_exceptions=True)

    started = time.monotonic()
    outcomes = asyncio.run(scenario())
    assert [type(o) for o in outcomes] == [NotReadyError] * 3
    assert time.monotonic() - started < 5


def test_event_loop_stays_free_while_a_batch_computes(loaded_model, images: np.ndarray) -> None:
    big = np.concatenate([images] * 4)

    def slow_infer(batch: np.ndarray, thresholds: np.ndarray, max_experts: np.ndarray):
        deadline = time.perf_counter() + 0.15  # real inference, repeated for 150 ms
        while time.perf_counter() < deadline:
            run_cascade(loaded_model, big, thresholds=0.0, max_experts=NUM_EXPERTS)
        return run_cascade(loaded_model, batch, thresholds=thresholds, max_experts=max_experts)

    async def scenario() -> int:
        batcher = Batcher(slow_infer, max_batch_size=4, max_wait_s=0.0, max_queue_size=8)
        await batcher.start()
        ticks = 0
        submitted = asyncio.create_task(batcher.submit(images[0], threshold=0.5, max_experts=NUM_EXPERTS))
        while not submitted.done():
            await asyncio.sleep(0.002)
            ticks += 1
        await batcher.stop(1.0)
        return ticks

    # A loop blocked by the batch would tick once or twice; a free one ticks every few milliseconds.
    assert asyncio.run(scenario()) >= 10


def test_buckets_are_powers_of_two_up_to_the_maximum() -> None:
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(24) == [1, 2, 4, 8, 16, 24]
    assert batch_buckets(1) == [1]
    assert [padded_size(rows, batch_buckets(24)) for rows in (1, 3, 9, 17, 24)] == [1, 4, 16, 24, 24]
    assert padded_size(5, ()) == 5


def test_padded_batches_reach_the_model_at_bucket_sizes_with_unchanged_answers(
    loaded_model, images: np.ndarray
) -> None:
    """CUDA's batcher: 20 requests run as a batch of 32 (12 blank rows stopping after expert 1); each request
    gets exactly the row it would get unpadded."""
    shapes: list[tuple[int, int]] = []

    def infer(batch: np.ndarray, thresholds: np.ndarray, max_experts: np.ndarray):
        shapes.append((len(batch), int((max_experts == 1).sum())))
        return run_cascade(loaded_model, batch, thresholds=thresholds, max_experts=max_experts)

    thresholds = np.linspace(0.2, 0.8, 20)

    async def scenario():
        batcher = Batcher(infer, max_batch_size=32, max_wait_s=0.2, max_queue_size=256, buckets=batch_buckets(32))
        await batcher.start()
        results = await asyncio.gather(
            *(batcher.submit(images[i], threshold=float(thresholds[i]), max_experts=NUM_EXPERTS) for i in range(20))
        )
        await batcher.stop(1.0)
        return results

    results = asyncio.run(scenario())
    assert shapes == [(32, 12)]
    expected = run_cascade(loaded_model, images[:20], thresholds=thresholds, max_experts=NUM_EXPERTS)
    np.testing.assert_array_equal([r.experts_used for r in results], expected.experts_used)
    np.testing.assert_allclose(np.stack([r.probabilities for r in results]), expected.probabilities, atol=1e-6)
    assert all(r.batch_size == 20 for r in results)


def test_a_requests_rows_are_queued_all_or_none(loaded_model, images: np.ndarray) -> None:
    """Rows that do not all fit are refused together: none of them waits in the queue for nothing."""
    sizes: list[int] = []

    async def scenario():
        batcher = make_batcher(loaded_model, sizes, max_queue_size=4)
        await batcher.start()
        first = batcher.enqueue_rows(list(images[:3]), threshold=0.5, max_experts=NUM_EXPERTS)
        with pytest.raises(OverloadedError, match="2 rows do not fit"):
            batcher.enqueue_rows(list(images[3:5]), threshold=0.5, max_experts=NUM_EXPERTS)
        pending = batcher.pending
        results = await asyncio.gather(*first)
        await batcher.stop(1.0)
        return pending, results

    pending, results = asyncio.run(scenario())
    assert pending == 3 and len(results) == 3 and sum(sizes) == 3
