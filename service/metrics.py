"""Prometheus metrics of one app, in the app's own registry (never the process-global default one).

Names follow the Prometheus conventions: ``ride_`` prefix, base units (seconds), ``_total`` on counters, histograms
for everything worth a percentile. Labelled series are created up front so that dashboards show zeros, not gaps.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from service.operating_points import ServingPoint

# Sub-millisecond resolution where this model lives (a batch takes ~0.3-5 ms on CPU), up to 10 s for stragglers.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.004,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
RELATIVE_COMPUTE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
EXPOSITION_CONTENT_TYPE = CONTENT_TYPE_LATEST
UNMATCHED_ROUTE = "unmatched"


def power_of_two_buckets(largest: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to the first power of two >= ``largest``."""
    buckets = [1]
    while buckets[-1] < largest:
        buckets.append(buckets[-1] * 2)
    return tuple(buckets)


class Metrics:
    """Every metric the service exports, registered in a fresh `CollectorRegistry`."""

    def __init__(
        self,
        *,
        num_experts: int,
        max_batch_size: int,
        groups: Sequence[str] = ("many", "medium", "few"),
    ) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        # The process's CPU, memory and descriptors (process_*, Linux only), Python's garbage collector (python_gc_*)
        # and version (python_info): what the default registry would have, in this app's own.
        ProcessCollector(registry=registry)
        GCCollector(registry=registry)
        PlatformCollector(registry=registry)
        self.requests_total = Counter(
            "ride_requests_total",
            "HTTP requests answered, by route template and status code.",
            ["route", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "ride_request_duration_seconds",
            "Time from request start to response end, by route template.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "ride_queue_wait_seconds",
            "Time a classification waited for its batch to start.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference_duration = Histogram(
            "ride_inference_duration_seconds",
            "Wall time of one batch through the cascade.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.experts_used = Histogram(
            "ride_experts_used",
            "Experts run per successful classification, by the class group (many, medium, few) of its answer.",
            ["group"],
            buckets=tuple(range(1, num_experts + 1)),
            registry=registry,
        )
        self.exits_total = Counter(
            "ride_exits_total",
            "Successful classifications by the expert they stopped after and the class group of their answer.",
            ["expert", "group"],
            registry=registry,
        )
        self.shadow_total = Counter(
            "ride_shadow_total",
            "Shadow-checked classifications (RIDE_SHADOW_RATE): whether running every expert gives the same top-1 "
            "class (agree) or not (disagree), by the class group of the routed answer.",
            ["outcome", "group"],
            registry=registry,
        )
        self.shadow_dropped = Counter(
            "ride_shadow_dropped_total",
            "Classifications sampled for the shadow but dropped: its queue was full.",
            registry=registry,
        )
        self.shadow_compute = Counter(
            "ride_shadow_relative_compute_total",
            "Compute the shadow spent, in full-ensemble units (1 = every expert and router on one image).",
            registry=registry,
        )
        self.relative_compute = Histogram(
            "ride_relative_compute",
            "MACs spent per classification / MACs of the full ensemble (0-1].",
            buckets=RELATIVE_COMPUTE_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "ride_batch_size",
            "Rows per batch sent to the cascade.",
            buckets=power_of_two_buckets(max_batch_size),
            registry=registry,
        )
        self.queue_depth = Gauge(
            "ride_queue_depth", "Classifications accepted and waiting for inference.", registry=registry
        )
        self.queue_capacity = Gauge(
            "ride_queue_capacity",
            "Classifications the queue holds; beyond it new ones get 503 (RIDE_MAX_QUEUE_SIZE).",
            registry=registry,
        )
        self.ready = Gauge(
            "ride_ready", "1 while /readyz answers 200 (model loaded and warm), else 0.", registry=registry
        )
        self.connections = Gauge("ride_connections", "Open client connections.", registry=registry)
        self.connections_capacity = Gauge(
            "ride_connections_capacity",
            "Open connections at most (RIDE_MAX_CONNECTIONS, kept below the file-descriptor limit).",
            registry=registry,
        )
        self.connections_closed = Counter(
            "ride_connections_closed_total",
            "Connections closed by a limit: header_too_large, header_timeout, body_timeout, over_capacity, "
            "bad_request; or idle at shutdown: drained.",
            ["reason"],
            registry=registry,
        )
        self.operating_threshold = Gauge(
            "ride_operating_threshold",
            "Router threshold of a request that names none (the serving operating point).",
            registry=registry,
        )
        self.operating_relative_compute = Gauge(
            "ride_operating_expected_relative_compute",
            "Validation relative compute of the serving operating point (the manifest's curve; NaN off the curve).",
            registry=registry,
        )
        self.adaptive_steps = Counter(
            "ride_adaptive_steps_total",
            "Steps of load-adaptive early exit along the curve: to a cheaper point, or back (one step may move several "
            "rungs).",
            ["direction"],
            registry=registry,
        )
        self.adaptive_wait_p95 = Gauge(
            "ride_adaptive_queue_wait_p95_seconds",
            "The moving 95th percentile of the queue wait that load-adaptive early exit steers by.",
            registry=registry,
        )
        for direction in ("cheaper", "back"):
            self.adaptive_steps.labels(direction=direction)
        self.model_info = Gauge(
            "ride_model_info",
            "Every model version loaded and the onnxruntime provider really in use (value 1; the series goes when "
            "the version is unloaded).",
            ["name", "version", "provider"],
            registry=registry,
        )
        for group in groups:
            self.experts_used.labels(group=group)
            for expert in range(1, num_experts + 1):
                self.exits_total.labels(expert=str(expert), group=group)
            for outcome in ("agree", "disagree"):
                self.shadow_total.labels(outcome=outcome, group=group)

    def model_loaded(self, name: str, version: str, provider: str) -> None:
        self.model_info.labels(name=name, version=version, provider=provider).set(1)

    def model_unloaded(self, name: str, version: str, provider: str) -> None:
        with contextlib.suppress(KeyError):  # never loaded under these labels
            self.model_info.remove(name, version, provider)

    def preinitialise_routes(self, routes: Iterable[str], error_statuses: Mapping[str, Iterable[int]]) -> None:
        """Create the request series of every route, and of the error statuses a route declares (see
        `service.http_errors`), so that they start at zero."""
        for route in (*routes, UNMATCHED_ROUTE):
            self.request_duration.labels(route=route)
            self.requests_total.labels(route=route, status="404" if route == UNMATCHED_ROUTE else "200")
        for route, route_statuses in error_statuses.items():
            for status in route_statuses:
                self.requests_total.labels(route=route, status=str(status))

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests_total.labels(route=route, status=str(status)).inc()
        self.request_duration.labels(route=route).observe(seconds)

    def observe_classification(
        self, *, queue_seconds: float, experts_used: int, relative_compute: float, group: str
    ) -> None:
        """One call per successful classification, so that the counts of these series add up; ``group`` is the
        class group of its answer."""
        self.queue_wait.observe(queue_seconds)
        self.experts_used.labels(group=group).observe(experts_used)
        self.exits_total.labels(expert=str(experts_used), group=group).inc()
        self.relative_compute.observe(relative_compute)

    def observe_shadow(self, agrees: bool, group: str, relative_compute: float) -> None:
        """One shadow-checked classification: the routed answer (of class group ``group``) against every expert's."""
        self.shadow_total.labels(outcome="agree" if agrees else "disagree", group=group).inc()
        self.shadow_compute.inc(relative_compute)

    def observe_serving_point(self, serving: ServingPoint) -> None:
        """The serving operating point changed (or was set at start-up)."""
        self.operating_threshold.set(serving.threshold)
        expected = serving.point.relative_compute if serving.point is not None else math.nan
        self.operating_relative_compute.set(expected)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference_duration.observe(seconds)

    def track_queue_depth(self, depth: Callable[[], float], capacity: int) -> None:
        """Read the queue depth at scrape time from ``depth``; ``capacity`` is the bound it is refused at."""
        self.queue_depth.set_function(depth)
        self.queue_capacity.set(capacity)

    def track_connections(self, open_connections: Callable[[], float], capacity: int) -> None:
        """Read the open connections at scrape time from ``open_connections``; ``capacity`` is their bound."""
        self.connections.set_function(open_connections)
        self.connections_capacity.set(capacity)

    def observe_connection_closed(self, reason: str, status: int | None) -> None:
        """A connection closed by a limit, after a response of ``status`` (counted as a request to no route) or
        without one."""
        self.connections_closed.labels(reason=reason).inc()
        if status is not None:
            self.requests_total.labels(route=UNMATCHED_ROUTE, status=str(status)).inc()

    def track_readiness(self, ready: Callable[[], bool]) -> None:
        """Read readiness (what /readyz answers) at scrape time from ``ready``."""
        self.ready.set_function(lambda: float(ready()))

    def exposition(self) -> bytes:
        """The text exposition format of this registry."""
        return generate_latest(self.registry)
