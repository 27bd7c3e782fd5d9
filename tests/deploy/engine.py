"""A Docker engine for the container tests, set up from Debian packages on a machine that has none running.

Why Docker and not Podman: users run `docker compose up`, and only Docker Compose v2 gives the same merge
rules (`!reset`, `!override`), `depends_on` conditions, build secrets and healthchecks that run by themselves
(Podman runs them only through systemd timers, which these machines lack).

The recipe, each step skipped when its result is already there:

1. Debian 12 packages: ``docker.io`` (dockerd 20.10, its containerd and runc), ``mmdebstrap``, ``iptables``.
2. Compose v2 and buildx as CLI plugins, unpacked from the Debian 13 packages ``docker-compose`` and
   ``docker-buildx`` (Debian 12's compose is v1, which lacks ``!reset``) into a private ``DOCKER_CONFIG``.
3. A private ``dockerd``: its own socket under /run, data root under ``~/.cache`` (so images and the build cache
   survive between runs), overlay2. It is stopped again at the end.
4. The base image, since no registry is reachable: ``mmdebstrap`` makes a Debian 12 rootfs with Python 3.11
   (cached as a tar under ``~/.cache``), ``docker import`` turns it into an image.

Everything is serialised by a lock file, so two test runs on one machine take turns.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "ride-serve-containers"
RUN_DIR = Path("/run/ride-serve-test-docker")
DEBIAN_PACKAGES = ("docker.io", "mmdebstrap", "iptables")
PLUGIN_SUITE = "trixie"
PLUGIN_PACKAGES = ("docker-compose", "docker-buildx")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# What the Dockerfile's stages need from `python:3.11-slim-bookworm`: python (as `python`), venv with pip,
# CA certificates, and groupadd/useradd.
ROOTFS_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates", "passwd")
ROOTFS_SUITE = "bookworm"
BASE_IMAGE = "ride-serve-test/base:bookworm-py311"
IMPORT_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
)
DAEMON_START_TIMEOUT_S = 60.0


class EngineUnavailableError(Exception):
    """No engine can be set up here; the message says why (the tests skip with it)."""


@dataclass
class Engine:
    """A running Docker daemon and the environment that points the docker CLI at it."""

    env: dict[str, str]
    log_path: Path
    timings: dict[str, float] = field(default_factory=dict)

    def docker(
        self, *args: str, timeout: float = 300, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["docker", *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
            )
        return result

    def daemon_log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]


def _run(command: Sequence[str], timeout: float, what: str, **kwargs) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(
            list(command), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kwargs
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise EngineUnavailableError(f"{what}: {error}") from None
    if result.returncode != 0:
        shown = " ".join(command)
        raise EngineUnavailableError(f"{what}: `{shown}` exited {result.returncode}: {result.stderr[-1500:]}")
    return result


def install_debian_packages() -> None:
    if all(shutil.which(tool) for tool in ("dockerd", "mmdebstrap", "iptables")):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise EngineUnavailableError(
            f"no Docker engine here, and installing one ({', '.join(DEBIAN_PACKAGES)}) needs root and apt-get"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-qq"], 300, "apt-get update", env=env)
    _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *DEBIAN_PACKAGES], 600, "install", env=env)


def install_cli_plugins(config_dir: Path) -> None:
    """docker-compose and docker-buildx from Debian 13 into ``config_dir``/cli-plugins (a private apt state)."""
    plugins = config_dir / "cli-plugins"
    if all((plugins / f"docker-{name.removeprefix('docker-')}").exists() for name in PLUGIN_PACKAGES):
        return
    with tempfile.TemporaryDirectory(prefix="ride-apt-") as scratch:
        root = Path(scratch)
        (root / "lists" / "partial").mkdir(parents=True)
        (root / "cache" / "archives" / "partial").mkdir(parents=True)
        (root / "debs").mkdir()
        sources = root / "sources.list"
        keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
        sources.write_text(f"deb [signed-by={keyring}] {DEBIAN_MIRROR} {PLUGIN_SUITE} main\n")
        options = [
            f"-oDir::Etc::SourceList={sources}",
            "-oDir::Etc::SourceParts=/nonexistent",
            f"-oDir::State::Lists={root / 'lists'}",
            f"-oDir::Cache={root / 'cache'}",
            "-oAPT::Sandbox::User=root",
        ]
        _run(["apt-get", *options, "update", "-qq"], 300, f"apt-get update ({PLUGIN_SUITE})")
        _run(["apt-get", *options, "download", *PLUGIN_PACKAGES], 300, "download plugins", cwd=root / "debs")
        unpacked = root / "unpacked"
        for deb in sorted((root / "debs").glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(unpacked)], 120, f"unpack {deb.name}")
        plugins.mkdir(parents=True, exist_ok=True)
        for binary in (unpacked / "usr" / "libexec" / "docker" / "cli-plugins").iterdir():
            shutil.copy2(binary, plugins / binary.name)


def _daemon_alive(env: dict[str, str]) -> bool:
    result = subprocess.run(["docker", "info"], env=env, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    return result.returncode == 0


@contextmanager
def private_daemon(env: dict[str, str]) -> Iterator[Path]:
    """Start dockerd on its own socket; stop it (and the containerd it started) on exit."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    log_path = CACHE_DIR / "dockerd.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                "dockerd",
                f"--data-root={CACHE_DIR / 'docker'}",
                f"--exec-root={RUN_DIR / 'exec'}",
                f"--pidfile={RUN_DIR / 'dockerd.pid'}",
                f"--host=unix://{RUN_DIR / 'docker.sock'}",
                "--storage-driver=overlay2",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
        while not _daemon_alive(env):
            if process.poll() is not None or time.monotonic() > deadline:
                raise EngineUnavailableError(f"dockerd did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield log_path
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(30)


def rootfs_tar() -> Path:
    """The cached Debian rootfs tar (made by mmdebstrap once; its name changes with the package list)."""
    key = hashlib.sha256(" ".join((ROOTFS_SUITE, *ROOTFS_PACKAGES)).encode()).hexdigest()[:12]
    tar = CACHE_DIR / f"rootfs-{ROOTFS_SUITE}-{key}.tar"
    if tar.exists():
        return tar
    partial = tar.with_suffix(".partial.tar")
    _run(
        [
            "mmdebstrap",
            "--quiet",
            "--variant=minbase",
            f"--include={','.join(ROOTFS_PACKAGES)}",
            ROOTFS_SUITE,
            str(partial),
            DEBIAN_MIRROR,
        ],
        900,
        "mmdebstrap",
    )
    partial.rename(tar)
    return tar


def ensure_base_image(engine: Engine) -> None:
    if engine.docker("image", "inspect", BASE_IMAGE, check=False).returncode == 0:
        return
    changes = [arg for change in IMPORT_CHANGES for arg in ("--change", change)]
    engine.docker("import", *changes, str(rootfs_tar()), BASE_IMAGE, timeout=300)


@contextmanager
def docker_engine() -> Iterator[Engine]:
    """Set up (or reuse what is cached of) the engine and the base image; raises EngineUnavailableError."""
    if os.environ.get("RIDE_CONTAINER_TESTS", "1") == "0":
        raise EngineUnavailableError("container tests turned off (RIDE_CONTAINER_TESTS=0)")
    if shutil.which("docker") is None and shutil.which("apt-get") is None:
        raise EngineUnavailableError("no docker CLI and no apt-get to install one")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    with open(CACHE_DIR / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        started = time.monotonic()
        install_debian_packages()
        config_dir = CACHE_DIR / "cli"
        install_cli_plugins(config_dir)
        timings["packages"] = time.monotonic() - started
        env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{RUN_DIR / 'docker.sock'}",
            "DOCKER_CONFIG": str(config_dir),
            "DOCKER_BUILDKIT": "1",
        }
        for inherited in ("COMPOSE_FILE", "COMPOSE_PROJECT_NAME", "COMPOSE_PROFILES", "DOCKER_CONTEXT"):
            env.pop(inherited, None)
        with private_daemon(env) as log_path:
            engine = Engine(env, log_path, timings)
            started = time.monotonic()
            ensure_base_image(engine)
            timings["base image"] = time.monotonic() - started
            try:
                yield engine
            finally:
                # Where the time went, for whoever wonders why this run was slow.
                (CACHE_DIR / "last-timings.json").write_text(json.dumps(timings, indent=1) + "\n")
