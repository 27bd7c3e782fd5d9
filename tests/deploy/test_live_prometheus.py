"""The deployment's runtime contracts for real, natively (no Docker engine runs here).

The monitoring stack: the service, a real Prometheus with the project's own configuration and rules, real
traffic, then every dashboard query and every recording rule must return data. And the image's start-up: the
server configured by environment variables alone, as the Dockerfile's ENTRYPOINT runs it, probed by the
Dockerfile's own HEALTHCHECK command.

Prometheus runs from the `prometheus` binary (Debian's package, which CI installs) on 127.0.0.1 with
deploy/prometheus/prometheus.yml, its scrape target rewritten to the local server and its intervals shortened to
one second so that the rates fill within seconds; rules.yml is used unchanged. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from itertools import cycle
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from export.manifest import load_manifest

# The server launcher and the real images; the `model_dir` fixture comes from tests/conftest.py.
from tests.server_process import ServerProcess, cifar10_test_images, free_port, start_server

from . import (
    DASHBOARD_FILES,
    PROMETHEUS_CONFIG,
    PROMETHEUS_DIR,
    REPO_ROOT,
    dashboard_queries,
    read_dashboard,
    read_yaml,
    recording_rules,
    unhealthy_rules,
    variable_selectors,
)

pytestmark = pytest.mark.slow

SCRAPE_INTERVAL = "1s"
STARTUP_TIMEOUT_S = 60.0
DATA_TIMEOUT_S = 45.0  # well inside the rules' 1m windows, so the traffic sent is still in every rate
TRAFFIC_LIMIT_S = 120.0
TRAFFIC_MAX_REQUESTS = 5000
TRAFFIC_WORKERS = 4
# Per-request overrides that spread the cascade over 1 expert, the router's choice, and all experts.
REQUEST_PARAMS = ({}, {"max_experts": 1}, {"threshold": 0.0}, {"top_k": 3})
NO_ANSWER = 0  # the status Traffic records for a request that got no HTTP answer at all


def local_prometheus_config(target: str) -> dict[str, Any]:
    """The project's prometheus.yml, scraping ``target`` every second and evaluating rules every second."""
    config = copy.deepcopy(read_yaml(PROMETHEUS_CONFIG))
    config["global"].update(
        scrape_interval=SCRAPE_INTERVAL, scrape_timeout=SCRAPE_INTERVAL, evaluation_interval=SCRAPE_INTERVAL
    )
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "ride"]
    assert [t for static in job["static_configs"] for t in static["targets"]] == ["ride:8000"]
    job["static_configs"] = [{"targets": [target]}]
    for key in ("scrape_interval", "scrape_timeout"):
        job.pop(key, None)
    return config


def start_prometheus(config: dict[str, Any], workdir: Path) -> ServerProcess:
    """Start Prometheus with ``config`` (its rule files copied beside it) and wait until it is ready."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not found: install Debian's `prometheus` package (CI does)")
    for rule_file in config.get("rule_files", []):
        shutil.copy(PROMETHEUS_DIR / rule_file, workdir / rule_file)
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = workdir / "prometheus.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    prometheus = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    return prometheus.wait_ready("/-/ready", STARTUP_TIMEOUT_S, poll_s=0.2, name="prometheus")


class Traffic:
    """Real /classify requests from a few threads until stopped, bounded in count and time."""

    def __init__(self, url: str, images: list[bytes], max_requests: int = TRAFFIC_MAX_REQUESTS) -> None:
        self._url = url
        self._max_requests = max_requests
        self._requests = cycle([(image, params) for params in REQUEST_PARAMS for image in images])
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + TRAFFIC_LIMIT_S
        self.sent = 0
        self.statuses: dict[int, int] = {}
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(TRAFFIC_WORKERS)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30.0)

    def _next(self) -> tuple[bytes, dict[str, Any]] | None:
        with self._lock:
            if self._stop.is_set() or self.sent >= self._max_requests or time.monotonic() > self._deadline:
                return None
            self.sent += 1
            # Every 25th request is an empty body: a 400, so that more than one status shows up.
            return (b"", {}) if self.sent % 25 == 0 else next(self._requests)

    def _run(self) -> None:
        with httpx.Client(base_url=self._url, timeout=10.0) as client:
            while (request := self._next()) is not None:
                image, params = request
                try:
                    response = client.post(
                        "/classify", content=image, params=params, headers={"content-type": "image/jpeg"}
                    )
                    status = response.status_code
                except httpx.TransportError:
                    status = NO_ANSWER  # the server is gone (a test stopped it): counted, and the load goes on
                    time.sleep(0.05)
                with self._lock:
                    self.statuses[status] = self.statuses.get(status, 0) + 1


def has_data(reply: dict[str, Any]) -> bool:
    """True when an instant query's reply holds at least one finite sample (NaN is what an empty rate gives)."""
    data = reply["data"]
    if data["resultType"] == "scalar":
        return math.isfinite(float(data["result"][1]))
    return any(math.isfinite(float(series["value"][1])) for series in data["result"])


def query(client: httpx.Client, expr: str) -> dict[str, Any]:
    reply = client.post("/api/v1/query", data={"query": expr}).json()
    assert reply["status"] == "success", f"{expr}: {reply}"
    return reply


@pytest.fixture(scope="module")
def ride_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # The shadow on, so that its series (and the dashboard's agreement row) have data too.
    running = start_server(model_dir, tmp_path_factory.mktemp("ride") / "server.log", RIDE_SHADOW_RATE="0.5")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def prometheus(ride_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    target = ride_server.url.removeprefix("http://")
    running = start_prometheus(local_prometheus_config(target), tmp_path_factory.mktemp("prometheus"))
    yield running
    running.stop()


def test_every_dashboard_query_and_recording_rule_returns_data(
    ride_server: ServerProcess, prometheus: ServerProcess, model_dir: Path
) -> None:
    images = [data for _, data in cifar10_test_images(per_class=4)]
    expressions = {str(q): q.expr for q in dashboard_queries()}
    expressions.update({f"rule {name}: {expr}": expr for name, expr in recording_rules().items()})
    expressions.update({f"recorded series {name}": name for name in recording_rules()})
    missing = list(expressions)
    with httpx.Client(base_url=prometheus.url, timeout=10.0) as client, Traffic(ride_server.url, images) as traffic:
        deadline = time.monotonic() + DATA_TIMEOUT_S
        while missing and time.monotonic() < deadline:
            time.sleep(1.0)
            missing = [label for label in missing if not has_data(query(client, expressions[label]))]
        targets = client.get("/api/v1/targets").json()["data"]["activeTargets"]
        rules = client.get("/api/v1/rules").json()["data"]["groups"]
        variable_values = {
            name: sorted({series["metric"].get(label, "") for series in query(client, selector)["data"]["result"]})
            for path in DASHBOARD_FILES
            for name, (selector, label) in variable_selectors(read_dashboard(path)).items()
        }

    assert [t["health"] for t in targets] == ["up"], targets
    # The dashboard's job / model / instance variables each find this one server.
    target = ride_server.url.removeprefix("http://")
    assert variable_values == {"job": ["ride"], "model": [load_manifest(model_dir).model.name], "instance": [target]}
    rule_errors = unhealthy_rules(rules)
    assert rule_errors == [], rule_errors
    assert traffic.statuses.get(200, 0) > 0 and traffic.statuses.get(400, 0) > 0, traffic.statuses
    assert missing == [], (
        f"{len(missing)} of {len(expressions)} queries returned no data after {traffic.sent} requests "
        f"({traffic.statuses}):\n" + "\n".join(missing) + f"\n--- prometheus log ---\n{prometheus.log()[-3000:]}"
    )


def dockerfile_healthcheck() -> list[str]:
    """The exec-form command of the Dockerfile's HEALTHCHECK, with `python` as this interpreter."""
    text = re.sub(r"\\\n", " ", (REPO_ROOT / "Dockerfile").read_text())
    (command,) = re.findall(r"^HEALTHCHECK .*? CMD (\[.*\])$", text, flags=re.MULTILINE)
    argv = json.loads(command)
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


def healthcheck_status(env: dict[str, str]) -> int:
    return subprocess.run(dockerfile_healthcheck(), env=env, capture_output=True, timeout=10).returncode


def test_entrypoint_configured_by_environment_passes_the_healthcheck(model_dir: Path, tmp_path: Path) -> None:
    """What the image does: `python -m service` with no flags, RIDE_* from ENV, healthy only once ready."""
    env = {
        **os.environ,
        "RIDE_MODEL_DIR": str(model_dir),
        "RIDE_HOST": "127.0.0.1",  # the image listens on 0.0.0.0; a test stays on loopback
        "RIDE_PORT": str(free_port()),
        "RIDE_PROVIDER": "cpu",
        # The image runs the installed package from WORKDIR /opt/ride: here, the source tree from elsewhere.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    assert healthcheck_status(env) != 0, "nothing listens yet: the probe must fail"
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    server = ServerProcess(process, f"http://127.0.0.1:{env['RIDE_PORT']}", log_path)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while healthcheck_status(env) != 0:
            assert process.poll() is None, f"server exited with {process.returncode}:\n{server.log()}"
            assert time.monotonic() < deadline, f"never healthy:\n{server.log()}"
            time.sleep(0.5)
        info = httpx.get(f"{server.url}/models", timeout=5.0)
        assert info.status_code == 200 and load_manifest(model_dir).model.name in info.text
    finally:
        status = server.stop()
    assert status == 0, f"SIGTERM must end in a clean exit:\n{server.log()}"
    assert healthcheck_status(env) != 0
