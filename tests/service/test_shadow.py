"""Shadow agreement (RIDE_SHADOW_RATE): sampled classifications run again through every expert, off the hot path;
ride_shadow_total counts agreement by the class group of the routed answer. On the bundled model and real
CIFAR-10 test images; the live-against-offline check runs a real server."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cascade import run_cascade
from service.api import create_app
from service.images import ImageDecoder
from service.model import load_model
from service.settings import Settings
from tests.server_process import cifar10_test_images, start_server

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "models" / "cifar10-lt-ride4"
JPEG = {"content-type": "image/jpeg"}
SHADOW_WAIT_S = 120.0  # a bound on waiting for the shadow to finish, not a speed requirement


def shadow_counts(metrics_text: str) -> Counter:
    """(outcome, group) -> count of ride_shadow_total, plus the dropped samples and the shadow's compute."""
    counts: Counter = Counter()
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "ride_shadow_total":
                counts[(sample.labels["outcome"], sample.labels["group"])] += int(sample.value)
            elif sample.name in ("ride_shadow_dropped_total", "ride_shadow_relative_compute_total"):
                counts[sample.name] += sample.value
    return counts


def checked(counts: Counter) -> int:
    return sum(v for k, v in counts.items() if isinstance(k, tuple))


@pytest.fixture(scope="module")
def bundled():
    return load_model(DEFAULT_MODEL, provider="cpu", shared_thread_pool=False)


def test_threshold_0_agrees_exactly_always(bundled) -> None:
    """Every expert runs on the routed path too, so the shadow must agree on every image (exactly 100 %)."""
    images = cifar10_test_images(3)
    app = create_app(Settings(model_dir=DEFAULT_MODEL, shadow_rate=1.0, default_threshold=0.0), model=bundled)
    state = app.state.service

    async def scenario() -> str:
        await state.start()
        await state.warm_up()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                for _, data in images:
                    assert (await client.post("/classify", content=data, headers=JPEG)).status_code == 200
                deadline = time.monotonic() + SHADOW_WAIT_S
                while checked(shadow_counts((await client.get("/metrics")).text)) < len(images):
                    assert time.monotonic() < deadline, "the shadow never caught up"
                    await asyncio.sleep(0.01)
                return (await client.get("/metrics")).text
        finally:
            await state.stop()

    counts = shadow_counts(asyncio.run(scenario()))
    agree = sum(v for k, v in counts.items() if isinstance(k, tuple) and k[0] == "agree")
    assert agree == checked(counts) == len(images)
    assert counts["ride_shadow_dropped_total"] == 0
    assert counts["ride_shadow_relative_compute_total"] == pytest.approx(len(images))


def test_a_full_shadow_queue_drops_instead_of_waiting(bundled) -> None:
    """While requests keep the batcher busy, the shadow waits; its queue is bounded and further samples are
    dropped (counted), never queued without bound."""
    app = create_app(Settings(model_dir=DEFAULT_MODEL, shadow_rate=1.0, shadow_queue_size=1), model=bundled)
    state = app.state.service.default_model()
    pixels = np.zeros((3, 32, 32), dtype=np.float32)

    async def scenario() -> None:
        await state.batcher.start()
        await state.shadow.start()
        busy = state.batcher.enqueue(pixels, threshold=0.0, max_experts=4)  # not idle until it has run
        state.shadow.offer(pixels, 0, "many")
        await asyncio.sleep(0)  # the shadow takes the first sample and waits for the batcher to be idle
        state.shadow.offer(pixels, 0, "many")  # queued (the queue holds one)
        state.shadow.offer(pixels, 0, "many")  # dropped
        await busy
        await state.shadow.stop()
        await state.batcher.stop(1.0)

    asyncio.run(scenario())
    assert shadow_counts(state.metrics.exposition().decode())["ride_shadow_dropped_total"] == 1


def offline_agreement(images: list[tuple[str, bytes]], threshold: float) -> Counter:
    """(outcome, group) counts computed without the server: each image decoded as the server decodes it, routed at
    ``threshold`` and run through every expert, one image at a time as the live requests ran."""
    model = load_model(DEFAULT_MODEL, provider="cpu", shared_thread_pool=False)
    manifest = model.manifest
    decoder = ImageDecoder(manifest.input, max_pixels=25_000_000)
    counts: Counter = Counter()
    for _, data in images:
        batch = decoder.decode(data)[None]
        routed = run_cascade(model, batch, thresholds=threshold, max_experts=4).probabilities.argmax(axis=1)[0]
        full = run_cascade(model, batch, thresholds=0.0, max_experts=4).probabilities.argmax(axis=1)[0]
        counts[("agree" if routed == full else "disagree", manifest.classes[routed].group)] += 1
    return counts


def test_live_agreement_equals_offline_agreement(bundled, tmp_path: Path) -> None:
    """The bundled model at its default threshold, every request shadowed by a real server: the agreement its
    metrics report, per group, equals the one computed offline on the same 200 real test images."""
    images = cifar10_test_images(20)
    server = start_server(DEFAULT_MODEL, tmp_path / "server.log", RIDE_SHADOW_RATE="1")
    try:
        with httpx.Client(base_url=server.url, timeout=30.0) as client:
            for _, data in images:
                assert client.post("/classify", content=data, headers=JPEG).status_code == 200
            deadline = time.monotonic() + SHADOW_WAIT_S
            while checked(live := shadow_counts(client.get("/metrics").text)) < len(images):
                assert time.monotonic() < deadline, "the shadow never caught up"
                time.sleep(0.05)
    finally:
        server.stop()
    offline = offline_agreement(images, bundled.manifest.cascade.default_threshold)
    assert live["ride_shadow_dropped_total"] == 0
    assert {k: v for k, v in live.items() if isinstance(k, tuple) and v} == dict(offline)
    # Early exit really changes some answers on these images: the check compares something.
    assert 0 < sum(v for k, v in offline.items() if k[0] == "disagree") < len(images)
