"""Helpers for tests that run the real service: ``python -m service`` subprocesses on 127.0.0.1, free ports, and
real CIFAR-10 test images as upload bytes. A plain module (not a conftest) so that any test package can import it.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SERVER_START_TIMEOUT_S = 60.0


def cifar10_test_dir() -> Path:
    """The real CIFAR-10 test images (``RIDE_CIFAR10_DIR`` overrides ``../shared/data/cifar10``)."""
    root = Path(os.environ.get("RIDE_CIFAR10_DIR", REPO_ROOT.parent / "shared" / "data" / "cifar10"))
    return root / "test"


def cifar10_test_images(per_class: int) -> list[tuple[str, bytes]]:
    """(class name, JPEG bytes) of the first ``per_class`` test images of every class, in a fixed order.

    Skips the calling test when the image folder is absent."""
    folder = cifar10_test_dir()
    if not folder.is_dir():
        pytest.skip(f"CIFAR-10 test images not found at {folder} (set RIDE_CIFAR10_DIR)")
    images = []
    for name in CIFAR10_CLASSES:
        for path in sorted((folder / name).glob("*.jpg"))[:per_class]:
            images.append((name, path.read_bytes()))
    return images


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    """A server subprocess on 127.0.0.1: ``python -m service``, or Prometheus in the deploy tests."""

    process: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        """Everything the server wrote so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout)

    def wait_ready(self, path: str, timeout_s: float, *, poll_s: float, name: str) -> ServerProcess:
        """Poll ``path`` until it answers 200; stop the process and raise RuntimeError (with the log) otherwise."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}{path}", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(poll_s)
        self.stop()
        raise RuntimeError(f"{name} not ready after {timeout_s} s:\n{self.log()}")


def spawn_server(
    model_dir: Path,
    log_path: Path,
    *,
    prefix: Sequence[str] = (),
    max_files: int | None = None,
    flag: str = "--model-dir",
    **env: str,
) -> tuple[subprocess.Popen, int]:
    """Start ``python -m service`` on a free port without waiting; ``env`` are extra RIDE_* variables, ``prefix``
    a command that runs it (e.g. ``unshare``), ``max_files`` its file-descriptor limit, ``flag`` the one that
    names ``model_dir`` (``--model-repository`` for a repository)."""
    port = free_port()
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **env}

    def limit_files() -> None:
        if max_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))

    command = [sys.executable, "-m", "service", flag, str(model_dir), "--port", str(port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*prefix, *command],
            cwd=REPO_ROOT,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=limit_files,
        )
    return process, port


def start_server(
    model_dir: Path,
    log_path: Path,
    *,
    prefix: Sequence[str] = (),
    max_files: int | None = None,
    flag: str = "--model-dir",
    **env: str,
) -> ServerProcess:
    """Start a server and wait until /readyz answers 200 (raises RuntimeError, with the log, if it never does)."""
    process, port = spawn_server(model_dir, log_path, prefix=prefix, max_files=max_files, flag=flag, **env)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    return server.wait_ready("/readyz", SERVER_START_TIMEOUT_S, poll_s=0.1, name="server")
