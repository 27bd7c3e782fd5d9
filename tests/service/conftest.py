"""Fixtures for the service tests.

The service serves what the exporter writes, so these tests serve a real export: ``model_dir`` (tests/conftest.py)
is ``early_exit_model_dir``, the tiny RIDE checkpoint trained for a few steps on real CIFAR-10 images, its routers
centred so that the cascade really mixes 1, 2 and 3 experts at the default threshold 0.5, exported and verified
by ``export.build.export_checkpoint``. Expectations about exits are derived from that model (in-process
`cascade.run_cascade` or raw onnxruntime sessions), never assumed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server_process import ServerProcess, cifar10_test_images, start_server

NUM_EXPERTS = 3  # the tiny checkpoint's (tests/conftest.py); the `loaded_model` fixture checks it


@pytest.fixture(scope="session")
def loaded_model(model_dir: Path):
    """The early-exit model folder loaded into onnxruntime sessions (a `service.model.OnnxModel`)."""
    from service.model import load_model

    model = load_model(model_dir, provider="cpu", shared_thread_pool=False)
    assert model.num_experts == NUM_EXPERTS and model.has_routers
    return model


@pytest.fixture(scope="session")
def test_images() -> list[tuple[str, bytes]]:
    """64 real CIFAR-10 test images (JPEG bytes) with their class names."""
    return cifar10_test_images(per_class=7)[:64]


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels and holds no pixel data (a decompression-bomb probe)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="session")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The shared test server, with a small body limit (512 KiB) so that the 413 path is cheap to hit, and a long
    queue-wait bound (10 s): its tests check answers, batching and errors, and on a busy CPU 64 concurrent images
    can wait longer than the default 500 ms and be shed with 503. Shedding is tested on servers of its own
    (test_overload, test_server's overload test)."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    running = start_server(model_dir, log_path, RIDE_MAX_BODY_BYTES=str(512 * 1024), RIDE_MAX_QUEUE_WAIT_MS=str(10_000))
    yield running
    running.stop()
