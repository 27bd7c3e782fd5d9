"""Fixtures for the service tests.

The service's contract is the model folder (``export/manifest.py``), so these tests build their own: a
*synthetic model folder for service tests*, with small random-weight torch modules that have exactly the graph
I/O the exporter produces (trunk -> shared; expert -> logits, feature; router(mean_logits, feature) ->
router_logit), exported with the dynamo ONNX exporter. Router biases are set from real CIFAR-10 images so that
about half of the rows stop at each router under the default threshold 0.5: early exit is then exercised
deterministically, which untrained routers (sigmoid near 0.95 everywhere) would not do.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from export.manifest import (
    EXPERT_FEATURE,
    EXPERT_INPUT,
    EXPERT_LOGITS,
    ROUTER_FEATURE,
    ROUTER_MEAN_LOGITS,
    ROUTER_OUTPUT,
    TRUNK_FILE,
    TRUNK_INPUT,
    TRUNK_OUTPUT,
    Cascade,
    ClassInfo,
    EvalMetrics,
    Graphs,
    GraphSpec,
    InputSpec,
    Manifest,
    ModelId,
    SourceCheckpoint,
    TensorSpec,
    ToolVersions,
    expert_file,
    router_file,
    sha256_file,
    write_manifest,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NUM_EXPERTS = 3
IMAGE_SIZE = 32
TOP_Z = 5
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)
SERVER_START_TIMEOUT_S = 60.0


def cifar10_test_dir() -> Path:
    """The real CIFAR-10 test images (``RIDE_CIFAR10_DIR`` overrides ``../shared/data/cifar10``)."""
    root = Path(os.environ.get("RIDE_CIFAR10_DIR", REPO_ROOT.parent / "shared" / "data" / "cifar10"))
    return root / "test"


def cifar10_test_images(per_class: int) -> list[tuple[str, bytes]]:
    """(class name, JPEG bytes) of the first ``per_class`` test images of every class, in a fixed order."""
    folder = cifar10_test_dir()
    if not folder.is_dir():
        pytest.skip(f"CIFAR-10 test images not found at {folder} (set RIDE_CIFAR10_DIR)")
    images = []
    for name in CIFAR10_CLASSES:
        for path in sorted((folder / name).glob("*.jpg"))[:per_class]:
            images.append((name, path.read_bytes()))
    return images


# --------------------------------------------------------------------------------------------------------------
# Synthetic model folder
# --------------------------------------------------------------------------------------------------------------


def _torch_modules(num_classes: int, seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Trunk(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv(image))

    class Expert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 16, 3, padding=1)
            self.fc = nn.Linear(16, num_classes)

        def forward(self, shared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            feature = torch.relu(self.conv(shared)).mean(dim=(2, 3))
            return 5.0 * self.fc(feature), feature

    class Router(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(TOP_Z + 16, 1)

        def forward(self, mean_logits: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
            top = torch.topk(mean_logits, TOP_Z, dim=1).values
            normalised = feature / feature.norm(dim=1, keepdim=True).clamp_min(1e-12)
            return self.fc(torch.cat([top, normalised], dim=1))

    trunk = Trunk().eval()
    experts = [Expert().eval() for _ in range(NUM_EXPERTS)]
    routers = [Router().eval() for _ in range(NUM_EXPERTS - 1)]
    return trunk, experts, routers


def _calibration_batch(count: int) -> np.ndarray:
    from PIL import Image

    images = cifar10_test_images(per_class=max(1, count // len(CIFAR10_CLASSES)))
    rows = []
    for _, data in images:
        from io import BytesIO

        rgb = np.asarray(Image.open(BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0
        rows.append(((rgb - np.array(MEAN, np.float32)) / np.array(STD, np.float32)).transpose(2, 0, 1))
    return np.stack(rows).astype(np.float32)


def _centre_router_biases(trunk, experts, routers) -> None:
    """Shift each router's bias so that its median logit on real images is 0 (half the rows stop at t=0.5)."""
    import torch

    with torch.no_grad():
        shared = trunk(torch.from_numpy(_calibration_batch(200)))
        logits_sum = torch.zeros(shared.shape[0], len(CIFAR10_CLASSES))
        for k, router in enumerate(routers, start=1):
            logits, feature = experts[k - 1](shared)
            logits_sum += logits
            router_logit = router(logits_sum / k, feature)
            router.fc.bias -= router_logit.median()


def _export(module, args: tuple, input_names: list[str], output_names: list[str], path: Path) -> None:
    import warnings

    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():  # the exporter's deprecation chatter is not about this code
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=tuple({0: batch} for _ in args),
            dynamo=True,
            external_data=False,
            optimize=True,
            verbose=False,
        )


def _conv_macs(conv, out_h: int, out_w: int) -> int:
    kernel = conv.kernel_size[0] * conv.kernel_size[1]
    return conv.in_channels * conv.out_channels * kernel * out_h * out_w


def build_synthetic_model_folder(folder: Path, *, seed: int = 0, precision: str = "float32") -> Path:
    """Write a synthetic model folder for service tests (3 experts with routers) into ``folder``.

    The same ``seed`` gives the same weights at either precision (float16 graphs take float16 inputs).
    """
    import onnx
    import onnxruntime
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    num_classes = len(CIFAR10_CLASSES)
    trunk, experts, routers = _torch_modules(num_classes, seed)
    _centre_router_biases(trunk, experts, routers)
    dtype = torch.float16 if precision == "float16" else torch.float32
    for module in (trunk, *experts, *routers):
        module.to(dtype)

    image = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=dtype)
    with torch.no_grad():
        shared = trunk(image)
        logits, feature = experts[0](shared)
    shared_shape = ["N", *shared.shape[1:]]
    half = IMAGE_SIZE // 2

    def spec(file: str, inputs: list[TensorSpec], outputs: list[TensorSpec], macs: int) -> GraphSpec:
        return GraphSpec(
            file=file, sha256=sha256_file(folder / file), inputs=inputs, outputs=outputs, macs_per_image=macs
        )

    def tensor(name: str, shape: list) -> TensorSpec:
        return TensorSpec(name=name, shape=list(shape), dtype=precision)

    _export(trunk, (image,), [TRUNK_INPUT], [TRUNK_OUTPUT], folder / TRUNK_FILE)
    trunk_spec = spec(
        TRUNK_FILE,
        [tensor(TRUNK_INPUT, ["N", 3, IMAGE_SIZE, IMAGE_SIZE])],
        [tensor(TRUNK_OUTPUT, shared_shape)],
        _conv_macs(trunk.conv, half, half),
    )
    expert_specs, router_specs = [], []
    for k, expert in enumerate(experts, start=1):
        _export(expert, (shared,), [EXPERT_INPUT], [EXPERT_LOGITS, EXPERT_FEATURE], folder / expert_file(k))
        macs = _conv_macs(expert.conv, half, half) + expert.fc.in_features * expert.fc.out_features
        expert_specs.append(
            spec(
                expert_file(k),
                [tensor(EXPERT_INPUT, shared_shape)],
                [tensor(EXPERT_LOGITS, ["N", num_classes]), tensor(EXPERT_FEATURE, ["N", feature.shape[1]])],
                macs,
            )
        )
    for k, router in enumerate(routers, start=1):
        _export(
            router, (logits, feature), [ROUTER_MEAN_LOGITS, ROUTER_FEATURE], [ROUTER_OUTPUT], folder / router_file(k)
        )
        router_specs.append(
            spec(
                router_file(k),
                [tensor(ROUTER_MEAN_LOGITS, ["N", num_classes]), tensor(ROUTER_FEATURE, ["N", feature.shape[1]])],
                [tensor(ROUTER_OUTPUT, ["N", 1])],
                router.fc.in_features,
            )
        )

    counts = [5000 // (2**i) for i in range(num_classes)]
    manifest = Manifest(
        model=ModelId(name="synthetic-ride3", version="0.0.1-test"),
        source_checkpoint=SourceCheckpoint(path="synthetic (random weights)", sha256="0" * 64),
        precision=precision,
        classes=[
            ClassInfo(id=i, name=name, train_count=n, group="many" if n > 100 else "medium" if n >= 20 else "few")
            for i, (name, n) in enumerate(zip(CIFAR10_CLASSES, counts, strict=True))
        ],
        input=InputSpec(height=IMAGE_SIZE, width=IMAGE_SIZE, mean=MEAN, std=STD, dtype=precision),
        graphs=Graphs(trunk=trunk_spec, experts=expert_specs, routers=router_specs),
        cascade=Cascade(
            num_experts=NUM_EXPERTS,
            has_routers=True,
            default_threshold=0.5,
            top_z=TOP_Z,
            all_experts_without_routers=False,
        ),
        metrics=EvalMetrics(),
        exported_with=ToolVersions(
            ride_serve="test",
            python=sys.version.split()[0],
            torch=torch.__version__,
            onnx=onnx.__version__,
            onnxruntime=onnxruntime.__version__,
            opset=max(18, onnx.load(folder / TRUNK_FILE).opset_import[0].version),
        ),
    )
    write_manifest(manifest, folder)
    return folder


def without_routers(source: Path, folder: Path) -> Path:
    """A copy of ``source`` whose manifest has no routers (every request runs all experts)."""
    from export.manifest import load_manifest

    manifest = load_manifest(source)
    folder.mkdir(parents=True, exist_ok=True)
    for graph in (manifest.graphs.trunk, *manifest.graphs.experts):
        shutil.copy(source / graph.file, folder / graph.file)
    changed = manifest.model_copy(
        update={
            "graphs": manifest.graphs.model_copy(update={"routers": []}),
            "cascade": manifest.cascade.model_copy(update={"has_routers": False, "all_experts_without_routers": True}),
        }
    )
    write_manifest(changed, folder)
    return folder


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic model folder for service tests, built once per test session."""
    return build_synthetic_model_folder(tmp_path_factory.mktemp("synthetic-model"))


@pytest.fixture(scope="session")
def loaded_model(model_dir: Path):
    """The synthetic model folder loaded into onnxruntime sessions (a `service.model.OnnxModel`)."""
    from service.model import load_model

    return load_model(model_dir, provider="cpu", shared_thread_pool=False)


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


# --------------------------------------------------------------------------------------------------------------
# A real server process
# --------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    """A ``python -m service`` subprocess on 127.0.0.1."""

    process: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout)


def spawn_server(model_dir: Path, log_path: Path, **env: str) -> tuple[subprocess.Popen, int]:
    """Start ``python -m service`` on a free port; ``env`` are extra RIDE_* variables."""
    port = free_port()
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "--model-dir", str(model_dir), "--port", str(port)],
            cwd=REPO_ROOT,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return process, port


def start_server(model_dir: Path, log_path: Path, **env: str) -> ServerProcess:
    """Start a server and wait until /readyz answers 200."""
    import httpx

    process, port = spawn_server(model_dir, log_path, **env)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=1.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server not ready after {SERVER_START_TIMEOUT_S} s:\n{server.log()}")


@pytest.fixture(scope="session")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The shared test server, with a small body limit (512 KiB) so that the 413 path is cheap to hit."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    running = start_server(model_dir, log_path, RIDE_MAX_BODY_BYTES=str(512 * 1024))
    yield running
    running.stop()
