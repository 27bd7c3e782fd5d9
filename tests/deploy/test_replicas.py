"""Several replicas on one machine, as Kubernetes or a scaled Compose service runs them: two real servers and one
real Prometheus on 127.0.0.1, with the project's prometheus.yml (both servers as targets of job `ride`, intervals
shortened to one second) and its recording and alerting rules unchanged.

Under traffic to both servers, the dashboard's queries must give one series per instance where they split by
instance, and where they aggregate, the same value as the two instances' parts combined. Then one server is
stopped while traffic still reaches it: `up` must show it down, and RideTargetDown must go pending for it alone.
The servers, Prometheus and the load come from tests/server_process.py and test_live_prometheus.py.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server_process import ServerProcess, cifar10_test_images, start_server

from . import DASHBOARD_FILES, dashboard_queries, read_dashboard, variable_selectors
from .test_live_prometheus import NO_ANSWER, Traffic, has_data, local_prometheus_config, query, start_prometheus

pytestmark = pytest.mark.slow

DATA_TIMEOUT_S = 45.0
ALERT_TIMEOUT_S = 30.0
# The dashboard's one query that aggregates over instances: the share of images by experts used.
SHARE_OF_EXPERTS = "Share of images by number of experts used"


@pytest.fixture(scope="module")
def replicas(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    folder = tmp_path_factory.mktemp("replicas")
    started: list[ServerProcess] = []
    try:
        for name in ("a", "b"):
            started.append(start_server(model_dir, folder / f"server-{name}.log"))
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def prometheus(replicas: list[ServerProcess], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    targets = [server.url.removeprefix("http://") for server in replicas]
    config = local_prometheus_config(targets[0])
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": targets}]
    running = start_prometheus(config, tmp_path_factory.mktemp("prometheus-replicas"))
    yield running
    running.stop()


def instant(client: httpx.Client, expr: str, at: float) -> list[dict[str, Any]]:
    """The series of an instant query at time ``at`` (one time for every query, so that they see the same data)."""
    reply = client.post("/api/v1/query", data={"query": expr, "time": f"{at:.3f}"}).json()
    assert reply["status"] == "success", f"{expr}: {reply}"
    return reply["data"]["result"]


def by_label(series: list[dict[str, Any]], label: str) -> dict[str, float]:
    return {s["metric"].get(label, ""): float(s["value"][1]) for s in series}


def alerts(client: httpx.Client, name: str) -> list[dict[str, Any]]:
    return [a for a in client.get("/api/v1/alerts").json()["data"]["alerts"] if a["labels"]["alertname"] == name]


def test_dashboard_splits_by_instance_and_aggregates_then_a_stopped_replica_alerts(
    replicas: list[ServerProcess], prometheus: ServerProcess
) -> None:
    images = [data for _, data in cifar10_test_images(per_class=4)]
    instances = sorted(server.url.removeprefix("http://") for server in replicas)
    stopped = replicas[1].url.removeprefix("http://")
    queries = dashboard_queries()
    with (
        httpx.Client(base_url=prometheus.url, timeout=10.0) as client,
        Traffic(replicas[0].url, images) as traffic_a,
        # Bounded by time only: on an idle machine replica b answers the count bound before the test stops it.
        Traffic(replicas[1].url, images, max_requests=sys.maxsize) as traffic_b,
    ):
        # Both instances in every per-instance series of the dashboard.
        deadline = time.monotonic() + DATA_TIMEOUT_S
        while time.monotonic() < deadline:
            time.sleep(1.0)
            at = time.time()
            results = {str(q): instant(client, q.expr, at) for q in queries}
            split = [r for r in results.values() if r and "instance" in r[0]["metric"]]
            if all(has_data({"data": {"resultType": "vector", "result": r}}) for r in results.values()) and all(
                {s["metric"]["instance"] for s in r} == set(instances) for r in split
            ):
                break
        missing = {label: r for label, r in results.items() if not r}
        assert missing == {}, f"no data after {traffic_a.sent + traffic_b.sent} requests: {list(missing)}"
        for label, series in results.items():
            if series and "instance" in series[0]["metric"]:
                assert {s["metric"]["instance"] for s in series} == set(instances), label

        # The dashboard's Instance variable offers both replicas.
        (dashboard,) = [read_dashboard(path) for path in DASHBOARD_FILES]
        selector, label = variable_selectors(dashboard)["instance"]
        assert sorted(by_label(query(client, selector)["data"]["result"], label)) == instances

        # The aggregated query is the two instances' parts combined, not one replica's view. Each instance's part
        # sums over the class groups of its answers (the `group` label).
        (share,) = [q for q in queries if q.panel == SHARE_OF_EXPERTS]
        combined = by_label(instant(client, share.expr, at), "le")

        def part(metric: str, instance: str, by: str = "") -> list:
            return instant(client, f'sum {by} (increase({metric}{{instance="{instance}"}}[1m]))', at)

        parts = {
            instance: (
                by_label(part("ride_experts_used_bucket", instance, "by (le)"), "le"),
                part("ride_experts_used_count", instance),
            )
            for instance in instances
        }
        total = sum(float(count[0]["value"][1]) for _, count in parts.values())
        assert total > 0
        for le, value in combined.items():
            expected = sum(buckets[le] for buckets, _ in parts.values()) / total
            assert math.isclose(value, expected, rel_tol=1e-9), (le, value, expected)
        assert combined["+Inf"] == pytest.approx(1.0)

        # Stop replica b while its traffic goes on: a clean drain, then `up` and the alert see it.
        assert replicas[1].stop() == 0, replicas[1].log()[-2000:]
        deadline = time.monotonic() + ALERT_TIMEOUT_S
        up: dict[str, float] = {}
        pending: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not (up.get(stopped) == 0 and pending):
            time.sleep(1.0)
            up = by_label(query(client, 'up{job="ride"}')["data"]["result"], "instance")
            pending = alerts(client, "RideTargetDown")
        assert up == {instance: 0.0 if instance == stopped else 1.0 for instance in instances}, up
        assert [(a["labels"]["instance"], a["state"]) for a in pending] == [(stopped, "pending")], pending
        assert alerts(client, "RideTargetsMissing") == []
        sent_after_stop = traffic_b.statuses.get(NO_ANSWER, 0)

    assert traffic_a.statuses.get(200, 0) > 0 and traffic_b.statuses.get(200, 0) > 0
    assert sent_after_stop > 0, f"replica b was stopped under traffic: {traffic_b.statuses}"
    assert NO_ANSWER not in traffic_a.statuses, traffic_a.statuses
