"""The images built and the compose stack brought up for real, with a Docker engine (tests/deploy/engine.py).

The `serve` image (CPU onnxruntime) and the `train` image come from the real Dockerfile; only build arguments and a
build secret differ from a user's build. The stack is docker-compose.yml + docker-compose.cpu.yml, as documented,
plus tests/deploy/compose.test.yml (local base image, local Prometheus, Grafana behind a profile, loopback ports).

Skipped, with the reason, where no engine can be set up (not root, no apt-get, RIDE_CONTAINER_TESTS=0).
Cold (packages, base rootfs, builds) this takes a few minutes; warm, well under three.
"""

from __future__ import annotations

import grp
import json
import os
import re
import shutil
import ssl
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.server_process import free_port

from . import REPO_ROOT, recording_rules, unhealthy_rules
from .engine import BASE_IMAGE, Engine, EngineUnavailableError, docker_engine
from .test_live_prometheus import Traffic, has_data, query

pytestmark = [pytest.mark.slow, pytest.mark.containers]

COMPOSE_FILES = (
    REPO_ROOT / "docker-compose.yml",
    REPO_ROOT / "docker-compose.cpu.yml",
    REPO_ROOT / "tests" / "deploy" / "compose.test.yml",
)
PROJECT = "ride-serve-test"
SAMPLES_DIR = REPO_ROOT / "models" / "samples"
SERVE_IMAGE = "ride-serve:cpu"
TRAIN_IMAGE = "ride-serve:train"
UP_TIMEOUT_S = 600
DATA_TIMEOUT_S = 90.0
IN_FLIGHT = 12
# A user who is not root, for the documented training commands.
USER_ID = 4242
WHEELS_PORT = 47863


def ca_bundle() -> Path:
    """The machine's CA store (it holds the TLS-inspecting proxy's CA where there is one)."""
    path = Path(os.environ.get("SSL_CERT_FILE") or ssl.get_default_verify_paths().cafile or "")
    for candidate in (path, Path("/etc/ssl/certs/ca-certificates.crt")):
        if candidate.is_file():
            return candidate
    pytest.skip("no CA bundle found to give pip inside the build")


class Stack:
    """The compose project: one engine, the three files, its own free loopback ports."""

    def __init__(self, engine: Engine, project: str = PROJECT, **env: str) -> None:
        self.engine = engine
        self.project = project
        self.serve_port = free_port()
        self.prometheus_port = free_port()
        self.env = {
            "RIDE_TEST_BASE_IMAGE": BASE_IMAGE,
            "RIDE_TEST_CA_BUNDLE": str(ca_bundle()),
            "RIDE_TEST_SERVE_PORT": str(self.serve_port),
            "RIDE_TEST_PROMETHEUS_PORT": str(self.prometheus_port),
            **env,
        }
        self.serve_url = f"http://127.0.0.1:{self.serve_port}"
        self.prometheus_url = f"http://127.0.0.1:{self.prometheus_port}"

    def compose(self, *args: str, timeout: float = 300, check: bool = True, env: dict[str, str] | None = None):
        files = [arg for path in COMPOSE_FILES for arg in ("-f", str(path))]
        return self.engine.docker(
            "compose", "-p", self.project, *files, *args, timeout=timeout, check=check, env={**self.env, **(env or {})}
        )

    def container(self, service: str) -> str:
        (container_id,) = self.compose("ps", "-a", "-q", service).stdout.split()
        return container_id

    def inspect(self, service: str) -> dict:
        return json.loads(self.engine.docker("inspect", self.container(service)).stdout)[0]

    def logs(self, service: str) -> str:
        result = self.compose("logs", "--no-color", service, check=False)
        return result.stdout + result.stderr


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    try:
        with docker_engine() as running:
            yield running
    except EngineUnavailableError as reason:
        pytest.skip(f"no container engine: {reason}")


@pytest.fixture(scope="module")
def stack(engine: Engine) -> Iterator[Stack]:
    stack = Stack(engine)
    stack.compose("down", "-v", "--remove-orphans", check=False)
    started = time.monotonic()
    try:
        stack.compose("build", timeout=UP_TIMEOUT_S)
        engine.timings["build"] = time.monotonic() - started
        up = stack.compose("up", "-d", "--wait", "--wait-timeout", "300", timeout=UP_TIMEOUT_S, check=False)
        assert up.returncode == 0, (
            f"`docker compose up` failed:\n{up.stderr[-6000:]}\n--- ride ---\n{stack.logs('ride')[-3000:]}"
            f"\n--- prometheus ---\n{stack.logs('prometheus')[-3000:]}"
        )
        engine.timings["build + up"] = time.monotonic() - started
        yield stack
    finally:
        stack.compose("down", "-v", "--remove-orphans", check=False)


def sample_images() -> list[tuple[str, bytes]]:
    return [(path.stem, path.read_bytes()) for path in sorted(SAMPLES_DIR.glob("*.jpg"))]


# --------------------------------------------------------------------------------------------------------------
# The serve image itself
# --------------------------------------------------------------------------------------------------------------


def test_serve_image_is_what_the_dockerfile_promises(stack: Stack) -> None:
    (image,) = json.loads(stack.engine.docker("image", "inspect", SERVE_IMAGE).stdout)
    config = image["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["python", "-m", "service"]
    assert "/readyz" in " ".join(config["Healthcheck"]["Test"]), "HEALTHCHECK kept (BuildKit, Docker format)"
    assert config["Labels"]["io.ride-serve.onnxruntime"] == "cpu"
    probe = stack.engine.docker(
        "run", "--rm", "--entrypoint", "python", SERVE_IMAGE, "-c",
        "import importlib.util as u, onnxruntime as o; print(u.find_spec('torch') is None, o.get_device())",
    )  # fmt: skip
    assert probe.stdout.split() == ["True", "CPU"]


def test_image_alone_serves_its_bundled_model_and_its_healthcheck_passes(stack: Stack) -> None:
    """deploy/README.md's "Without Compose": `docker run` with nothing but a port; the Dockerfile's own HEALTHCHECK
    (compose replaces it with its own) turns healthy, and `docker stop` ends in exit 0."""
    port = free_port()
    name = f"{PROJECT}-alone"
    docker = stack.engine.docker
    docker("rm", "-f", name, check=False)
    docker("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", SERVE_IMAGE)
    try:
        deadline = time.monotonic() + 90
        while (health := docker("inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip()) != "healthy":
            assert health == "starting" and time.monotonic() < deadline, docker("logs", name, check=False).stderr
            time.sleep(1.0)
        name_, data = sample_images()[0]
        reply = httpx.post(f"http://127.0.0.1:{port}/classify", files={"file": (name_, data)}, timeout=30.0)
        assert reply.status_code == 200 and reply.json()["model"]["name"] == "cifar10-lt-ride4", reply.text
        docker("stop", name, timeout=60)
        exit_code = docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip()
        assert exit_code == "0", docker("logs", name, check=False).stderr[-3000:]
    finally:
        docker("rm", "-f", name, check=False)


def _certificates(text: str) -> list[str]:
    return re.findall(r"-----BEGIN CERTIFICATE-----\n(.*?)-----END CERTIFICATE-----", text, flags=re.DOTALL)


def _extra_certificates(stack: Stack) -> list[str]:
    """A distinctive base64 line of each certificate that only the secret brings (the proxy's CA, say): those of
    the bundle given as the secret that neither pip's own roots nor the base image's CA store hold."""
    from pip._vendor import certifi

    base_store = stack.engine.docker("run", "--rm", BASE_IMAGE, "cat", "/etc/ssl/certs/ca-certificates.crt").stdout
    known = set(_certificates(Path(certifi.where()).read_text())) | set(_certificates(base_store))
    bundle = Path(stack.env["RIDE_TEST_CA_BUNDLE"]).read_text()
    return [block.splitlines()[2] for block in _certificates(bundle) if block not in known]


def test_pip_ca_secret_is_in_no_layer_of_the_image(stack: Stack, tmp_path: Path) -> None:
    extra = _extra_certificates(stack)
    saved = tmp_path / "image.tar"
    stack.engine.docker("save", "-o", str(saved), SERVE_IMAGE, timeout=300)
    found = []
    with tarfile.open(saved) as image:
        for member in image:
            if not member.name.endswith("layer.tar"):
                continue
            with tarfile.open(fileobj=image.extractfile(member)) as layer:
                for entry in layer:
                    if entry.name.startswith("run/secrets") or entry.name.endswith("ca.pem"):
                        found.append(f"{member.name}: {entry.name}")
                    elif extra and entry.isfile() and entry.size < 2_000_000:
                        content = layer.extractfile(entry).read().decode("latin-1")
                        found += [f"{member.name}: {entry.name}" for line in extra if line in content]
    assert found == []


# --------------------------------------------------------------------------------------------------------------
# The running stack
# --------------------------------------------------------------------------------------------------------------


def test_services_are_healthy(stack: Stack) -> None:
    for service in ("ride", "prometheus"):
        state = stack.inspect(service)["State"]
        assert state["Health"]["Status"] == "healthy", (service, state["Health"]["Log"][-2:])


def test_classifies_the_bundled_samples_through_the_published_port(stack: Stack) -> None:
    expected = json.loads((SAMPLES_DIR / "expected.json").read_text())["routed_predictions"]
    with ThreadPoolExecutor(len(expected)) as pool:
        responses = dict(
            pool.map(
                lambda sample: (
                    sample[0],
                    httpx.post(f"{stack.serve_url}/classify", files={"file": sample}, timeout=30.0),
                ),
                sample_images(),
            )
        )
    labels = {name: response.json().get("label") for name, response in responses.items()}
    assert labels == expected, {name: r.text[:300] for name, r in responses.items()}
    models = httpx.get(f"{stack.serve_url}/models", timeout=10.0).json()
    assert "CPUExecutionProvider" in json.dumps(models)


def test_thread_default_follows_the_container_cpu_limit(stack: Stack) -> None:
    # compose.test.yml gives the server `cpus: 1` on a host with more cores than that.
    logs = stack.logs("ride")
    assert re.search(r"intra-op threads: 1 \(CPUs this process may use: 1; cgroup CPU quota: 1\)", logs), logs[-2000:]


def test_docs_page_needs_no_cdn(stack: Stack) -> None:
    html = httpx.get(f"{stack.serve_url}/docs", timeout=10.0).text
    (script,) = re.findall(r"""<script src=["']([^"']+)["']""", html)
    assert script.startswith("/") and httpx.get(f"{stack.serve_url}{script}", timeout=10.0).status_code == 200


def test_prometheus_scrapes_ride_and_every_recording_rule_returns_data(stack: Stack) -> None:
    images = [data for _, data in sample_images()]
    names = list(recording_rules())
    missing = ["up", *names]
    with httpx.Client(base_url=stack.prometheus_url, timeout=10.0) as client, Traffic(stack.serve_url, images):
        deadline = time.monotonic() + DATA_TIMEOUT_S
        while missing and time.monotonic() < deadline:
            time.sleep(2.0)
            up = query(client, 'up{job="ride"} == 1')["data"]["result"]
            missing = ([] if up else ["up"]) + [name for name in names if not has_data(query(client, name))]
        rules = client.get("/api/v1/rules").json()["data"]["groups"]
    assert missing == [], f"no data after {DATA_TIMEOUT_S} s for: {missing}\n{stack.logs('prometheus')[-3000:]}"
    assert unhealthy_rules(rules) == []


def test_down_drains_requests_in_flight_and_the_server_exits_0(stack: Stack) -> None:
    """`docker compose down` sends SIGTERM: every request the server accepted gets its answer, then exit 0."""
    container = stack.container("ride")
    waiter = subprocess.Popen(["docker", "wait", container], env=stack.engine.env, stdout=subprocess.PIPE, text=True)
    log_follower = subprocess.Popen(
        ["docker", "logs", "-f", container], env=stack.engine.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    images = [data for _, data in sample_images()]
    metrics_url = f"{stack.serve_url}/metrics"

    def classify(data: bytes) -> httpx.Response:
        headers = {"content-type": "image/jpeg"}
        return httpx.post(f"{stack.serve_url}/classify", content=data, headers=headers, timeout=60)

    def queue_depth() -> float:
        line = next(line for line in httpx.get(metrics_url).text.splitlines() if line.startswith("ride_queue_depth"))
        return float(line.split()[-1])

    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        futures = [pool.submit(classify, images[i % len(images)]) for i in range(IN_FLIGHT)]
        # The 2 s batching window of compose.test.yml (lone requests wait too) holds them in the queue: SIGTERM
        # finds them in flight.
        deadline = time.monotonic() + 10
        while queue_depth() < IN_FLIGHT and time.monotonic() < deadline:
            time.sleep(0.02)
        assert queue_depth() == IN_FLIGHT
        down = stack.compose("down", "-v", timeout=120, check=False)
        responses = [future.result(timeout=60) for future in futures]
    exit_code = waiter.communicate(timeout=60)[0].strip()
    logs = log_follower.communicate(timeout=60)[0]
    assert down.returncode == 0, down.stderr
    assert [r.status_code for r in responses] == [200] * IN_FLIGHT, [r.text[:200] for r in responses]
    assert all(r.json()["timing_ms"]["queue"] > 100 for r in responses), "they waited in the queue"
    assert exit_code == "0", logs[-3000:]
    assert "shutdown after signal 15 complete" in logs


# --------------------------------------------------------------------------------------------------------------
# A GPU asked for where none runs: the failure is in the logs and the restarts stop
# --------------------------------------------------------------------------------------------------------------


def test_cuda_without_a_usable_gpu_fails_visibly_and_stops_restarting(engine: Engine, stack: Stack) -> None:
    failing = Stack(engine, project=f"{PROJECT}-cuda", RIDE_TEST_PROVIDER="cuda")
    try:
        failing.compose("up", "-d", "--no-build", "ride", timeout=120)
        deadline = time.monotonic() + 120
        while (state := failing.inspect("ride")["State"])["Status"] != "exited" and time.monotonic() < deadline:
            time.sleep(1.0)
        details = failing.inspect("ride")
        logs = failing.logs("ride")
        assert state["Status"] == "exited" and state["ExitCode"] == 1, (state, logs[-3000:])
        assert details["RestartCount"] == 3, "restart: on-failure:3 gives up, so `docker compose ps` shows the exit"
        errors = [line for line in logs.splitlines() if "error:" in line]
        assert errors, logs[-3000:]
        assert "CUDA" in errors[-1] and "R580" in errors[-1] and "7.5" in errors[-1], errors[-1]
    finally:
        failing.compose("down", "-v", check=False)


# --------------------------------------------------------------------------------------------------------------
# The train image, and the documented training commands run by a user who is not root
# --------------------------------------------------------------------------------------------------------------


def local_torch_wheels() -> Path:
    """The folder holding a CPU build of torch on this machine (PyPI's Linux torch is the multi-GB CUDA build)."""
    for folder in filter(None, [*os.environ.get("PIP_FIND_LINKS", "").split(), "/opt/wheels"]):
        if list(Path(folder).glob("torch-2.13.0*cpu*.whl")):
            return Path(folder)
    pytest.skip("no local CPU torch wheel (torch-2.13.0+cpu) to build the train image with")


def bridge_address() -> str:
    """The host's address on Docker's default bridge, which build containers reach."""
    shown = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", "docker0"], capture_output=True, text=True)
    match = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", shown.stdout)
    return match.group(1) if match else "172.17.0.1"


@pytest.fixture(scope="module")
def train_image(engine: Engine) -> str:
    """`ride-serve:train`, built with the CPU torch wheel offered to pip as PIP_FIND_LINKS over HTTP."""
    wheels = local_torch_wheels()
    handler = partial(SimpleHTTPRequestHandler, directory=str(wheels))
    try:  # a fixed port keeps the build arguments, and so the build cache, the same from run to run
        server = ThreadingHTTPServer((bridge_address(), WHEELS_PORT), handler)
    except OSError:
        server = ThreadingHTTPServer((bridge_address(), 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    started = time.monotonic()
    try:
        Stack(engine).compose(
            "--profile", "train", "build", "--build-arg", f"PIP_FIND_LINKS=http://{host}:{port}/",
            "--build-arg", f"PIP_TRUSTED_HOST={host}", "train", timeout=900,
        )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    engine.timings["train image"] = time.monotonic() - started
    torch = engine.docker("run", "--rm", TRAIN_IMAGE, "python", "-c", "import torch; print(torch.__version__)")
    assert torch.stdout.strip().endswith("+cpu"), f"the CPU wheel offered, not PyPI's CUDA build: {torch.stdout}"
    return TRAIN_IMAGE


def copy_working_tree(destination: Path) -> None:
    """The repository's files as a user's clone has them (tracked and untracked, not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, capture_output=True, check=True,
    )  # fmt: skip
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = REPO_ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def tiny_image_folder(destination: Path, cifar10: Path, train: int = 12, test: int = 3) -> None:
    for split, count in (("train", train), ("test", test)):
        for folder in sorted(p for p in (cifar10 / split).iterdir() if p.is_dir()):
            (destination / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:count]:
                shutil.copy(image, destination / split / folder.name / image.name)


def chown_tree(root: Path, uid: int) -> None:
    for path in [root, *root.rglob("*")]:
        os.chown(path, uid, uid, follow_symlinks=False)


@pytest.fixture
def user_workdir() -> Iterator[Path]:
    """A folder that uid 4242 can reach (pytest's tmp_path sits below a 0700 folder of root's)."""
    folder = Path(tempfile.mkdtemp(prefix="ride-user-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_train_image_runs_the_documented_commands_as_a_user_who_is_not_root(
    engine: Engine, train_image: str, user_workdir: Path
) -> None:
    """deploy/README.md's training commands, run in a fresh copy of the repository by uid 4242 (in the docker
    group), with only docker-compose.yml and the CPU override: help, then a one-epoch run on a tiny image folder."""
    cifar10 = Path(os.environ.get("RIDE_CIFAR10_DIR", REPO_ROOT.parent / "shared" / "data" / "cifar10"))
    if not (cifar10 / "train").is_dir():
        pytest.skip(f"CIFAR-10 image folder not found at {cifar10}")
    repo, data, home = user_workdir / "repo", user_workdir / "data", user_workdir / "home"
    copy_working_tree(repo)
    tiny_image_folder(data / "tiny", cifar10)
    plugins = home / ".docker" / "cli-plugins"
    shutil.copytree(Path(engine.env["DOCKER_CONFIG"]) / "cli-plugins", plugins)
    for root in (repo, data, home):
        chown_tree(root, USER_ID)
    docker_group = grp.getgrnam("docker").gr_gid  # the docker.io package's group, which owns the socket
    script = """
        set -e
        # Forgetting the folders: an error that names them, not root-owned folders the user cannot write.
        if RIDE_UID=$(id -u) RIDE_GID=$(id -g) RIDE_DATA_DIR=$DATA docker compose run --rm train true; then
            echo "UNEXPECTED: ran without runs/ and cache/"; ls -ld runs cache; exit 1
        fi
        test ! -e runs && test ! -e cache
        mkdir -p runs cache
        export RIDE_UID=$(id -u) RIDE_GID=$(id -g) RIDE_DATA_DIR=$DATA
        docker compose run --rm train python -m training.run --help
        docker compose run --rm train python -m training.run train --config configs/cifar10_lt_ride2.toml \\
            --data-dir /data/tiny --out runs/tiny \\
            --set schedule.epochs=1 --set data.imbalance_factor=2 --set data.val_per_class=2 --set optim.batch_size=16
    """
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "DOCKER_HOST": engine.env["DOCKER_HOST"],
        "COMPOSE_FILE": "docker-compose.yml:docker-compose.cpu.yml",
        "DATA": str(data),
    }
    command = ["setpriv", f"--reuid={USER_ID}", f"--regid={USER_ID}", f"--groups={docker_group}", "bash", "-c", script]
    try:
        result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run(["docker", "compose", "down"], cwd=repo, env={**engine.env, **env}, capture_output=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "usage:" in output and "train" in output
    checkpoint = repo / "runs" / "tiny" / "checkpoint.json"
    assert checkpoint.is_file(), output[-3000:]
    written = [path for path in (repo / "runs", repo / "cache") for path in path.rglob("*")]
    assert written and {path.stat().st_uid for path in written} == {USER_ID}, "files stay the user's"
