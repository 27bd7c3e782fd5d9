"""Load-adaptive early exit under overload: a fixed threshold against RIDE_ADAPTIVE_LATENCY_TARGET_MS, in one run.

Starts `python -m service` on 127.0.0.1 (pinned to its own CPUs, as bench/serve_overload.py does) at the model's
default threshold, measures its capacity C (closed loop of ``--capacity-concurrency`` clients posting real
CIFAR-10 test images), then offers ``--overload`` x C requests per second (2) in an open loop: the fixed run. A
second server with the same settings plus ``RIDE_ADAPTIVE_LATENCY_TARGET_MS`` (and ``RIDE_ADAPTIVE_MIN_COMPUTE``
when given), on the same CPUs, takes the same offered rate: the adaptive run. The two alternate in ``--rounds``
segments each (fixed first), so that what else the machine runs meanwhile falls on both alike; the adaptive
server starts every segment from where the idle time between segments has stepped it back to.

For each it prints the successful requests per second (200s), the share of 503s, the p50 / p99 latency of the
200s as the client saw them, the server's queue-wait p50 and p99 (bucket bounds of its histogram: what the
target steers), the mean validation relative compute of the points the 200s were served at, and their mean expected
accuracy: the validation accuracy of the curve point each 200 was served at (its X-Threshold header, looked up
in the manifest's curve). Goal (issue 15): adaptive serves at least 1.5x the fixed run's 200s per second, with
p99 under the target.

    python bench/serve_adaptive.py [--model-dir models/cifar10-lt-ride4] [--duration 30] [--rounds 3] [--overload 2] \\
        [--target-ms 100] [--min-compute 0.4]
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
sys.path.insert(0, str(REPO / "bench"))

from serve_load import DEFAULT_DATA_DIR, free_port, pick_test_images, pinned, wait_until_ready  # noqa: E402
from serve_overload import (  # noqa: E402
    Outcomes,
    Pool,
    closed_loop,
    open_loop,
    quantile_bound,
    request_bytes,
    run_on,
    server_histograms,
)

from export.manifest import OperatingCurve, load_manifest  # noqa: E402
from service.operating_points import point_at  # noqa: E402
from service.settings import DEFAULT_MODEL_DIR  # noqa: E402

WARM_UP_S = 2.0


def start_server(model_dir: Path, cpus: list[int], log_path: Path, **env: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    environment = {**os.environ, "RIDE_INTRA_OP_THREADS": str(len(cpus)), "RIDE_LOG_LEVEL": "warning", **env}
    command = [sys.executable, "-m", "service", "--model-dir", str(model_dir), "--port", str(port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            pinned(command, cpus), cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT
        )
    wait_until_ready(process, f"http://127.0.0.1:{port}", log_path)
    return process, port


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(60)


def adaptive_steps(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        sample.labels["direction"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "ride_adaptive_steps_total"
    }


class Run:
    """One server's overload segments, merged: the client's outcomes and the server's queue-wait histogram."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.outcomes = Outcomes()
        self.queue_waits: dict[str, float] = {}  # bucket -> count, summed over the segments

    async def segment(self, pool: Pool, requests: list[bytes], rate: float, seconds: float) -> None:
        before = server_histograms(self.port)
        part = await open_loop(pool, requests, rate, seconds)
        after = server_histograms(self.port)
        for key, value in after.items():
            if key.startswith("le "):
                self.queue_waits[key] = self.queue_waits.get(key, 0.0) + value - before.get(key, 0.0)
        merged = self.outcomes
        merged.statuses.update(part.statuses)
        merged.ok_latencies += part.ok_latencies
        merged.thresholds += part.thresholds
        merged.seconds += part.seconds

    def queue_wait(self) -> str:
        return f"p50 {quantile_bound({}, self.queue_waits, 0.5)}, p99 {quantile_bound({}, self.queue_waits, 0.99)}"


async def compare(fixed: Run, adaptive: Run, requests: list[bytes], args: argparse.Namespace) -> tuple[Outcomes, float]:
    """Warm both, measure the fixed server's capacity, then alternate overload segments between the two servers
    (fixed first), so that a change in what else the machine runs falls on both alike."""
    pools = {run.port: Pool("127.0.0.1", run.port) for run in (fixed, adaptive)}
    for run in (fixed, adaptive):
        await closed_loop(pools[run.port], requests, args.capacity_concurrency, WARM_UP_S)
    capacity = await closed_loop(pools[fixed.port], requests, args.capacity_concurrency, args.duration / args.rounds)
    rate = args.overload * capacity.rate("200")
    for _ in range(args.rounds):
        for run in (fixed, adaptive):
            await run.segment(pools[run.port], requests, rate, args.duration / args.rounds)
    for pool in pools.values():
        pool.close()
    return capacity, rate


def expected_accuracy(outcomes: Outcomes, curve: OperatingCurve) -> float:
    """Mean validation accuracy of the curve points the 200s were served at (NaN where one is off the curve)."""
    accuracies = []
    for threshold in outcomes.thresholds:
        point = point_at(curve, threshold) if math.isfinite(threshold) else None
        accuracies.append(point.accuracy if point is not None else math.nan)
    return float(np.mean(accuracies)) if accuracies else math.nan


def row(name: str, run: Run, curve: OperatingCurve) -> str:
    outcomes, computes = run.outcomes, served_compute(run.outcomes, curve)
    answered = sum(outcomes.statuses.values())
    refused = outcomes.statuses["503"] / answered if answered else math.nan
    compute = float(np.mean(computes)) if computes else math.nan
    return (
        f"| {name} | {outcomes.rate('200'):.1f} | {100 * refused:.1f} % | {outcomes.percentile_ms(50):.1f} | "
        f"{outcomes.percentile_ms(99):.1f} | {run.queue_wait()} | {compute:.3f} | "
        f"{100 * expected_accuracy(outcomes, curve):.2f} % |"
    )


def served_compute(outcomes: Outcomes, curve: OperatingCurve) -> list[float]:
    """The validation relative compute of the curve point of each 200 (its expected cost)."""
    points = [point_at(curve, t) for t in outcomes.thresholds if math.isfinite(t)]
    return [p.relative_compute for p in points if p is not None]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="model folder with a curve")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="CIFAR-10 folder with test/")
    parser.add_argument("--images", type=int, default=500, help="distinct test images cycled through")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of overload per server, in all")
    parser.add_argument("--rounds", type=int, default=3, help="alternating segments per server")
    parser.add_argument("--capacity-concurrency", type=int, default=16)
    parser.add_argument("--overload", type=float, default=2.0, help="offered load as a multiple of capacity")
    parser.add_argument("--target-ms", type=float, default=100.0, help="RIDE_ADAPTIVE_LATENCY_TARGET_MS")
    parser.add_argument("--min-compute", type=float, help="RIDE_ADAPTIVE_MIN_COMPUTE (default: the cheapest point)")
    parser.add_argument("--client-cpus", type=int, nargs="+", default=cpus[-1:], help="CPUs of the load generator")
    parser.add_argument("--server-cpus", type=int, nargs="+", default=cpus[:-1] or cpus, help="CPUs of the server")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    curve = load_manifest(args.model_dir).operating_curve
    if curve is None:
        raise SystemExit(f"error: {args.model_dir} has no operating curve (add one with `python -m export curve`)")
    requests = [request_bytes(path.read_bytes()) for path in pick_test_images(args.data_dir, args.images)]
    adaptive_env = {"RIDE_ADAPTIVE_LATENCY_TARGET_MS": str(args.target_ms)}
    if args.min_compute is not None:
        adaptive_env["RIDE_ADAPTIVE_MIN_COMPUTE"] = str(args.min_compute)
    print(f"servers on CPUs {args.server_cpus}, client on CPUs {args.client_cpus}; model {args.model_dir}")
    with tempfile.TemporaryDirectory() as workdir:
        fixed_server, fixed_port = start_server(args.model_dir, args.server_cpus, Path(workdir) / "fixed.log")
        try:
            log = Path(workdir) / "adaptive.log"
            adaptive_server, adaptive_port = start_server(args.model_dir, args.server_cpus, log, **adaptive_env)
            try:
                fixed, adaptive = Run(fixed_port), Run(adaptive_port)
                capacity, rate = run_on(args.client_cpus, compare(fixed, adaptive, requests, args))
                steps = adaptive_steps(adaptive_port)
            finally:
                stop(adaptive_server)
        finally:
            stop(fixed_server)
    print(
        f"capacity at the fixed threshold (closed loop, c={args.capacity_concurrency}): "
        f"{capacity.rate('200'):.1f} 200s/s; offered {rate:.0f} requests/s ({args.overload:g}x), "
        f"{args.duration:g} s to each server in {args.rounds} alternating segments"
    )
    print()
    print(
        "| run | 200s/s | 503s | p50 ms | p99 ms | server queue wait | mean expected compute | mean expected accuracy |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(row("fixed threshold", fixed, curve))
    print(row(f"adaptive, target {args.target_ms:g} ms", adaptive, curve))
    print()
    fixed_rate, adaptive_rate = fixed.outcomes.rate("200"), adaptive.outcomes.rate("200")
    ratio = adaptive_rate / fixed_rate if fixed_rate else math.nan
    print(
        f"adaptive / fixed 200s per second: {ratio:.2f} (goal >= 1.5); adaptive p99 "
        f"{adaptive.outcomes.percentile_ms(99):.1f} ms against the target {args.target_ms:g} ms; adaptive steps {steps}"
    )
    print(f"answers: fixed {dict(fixed.outcomes.statuses)}, adaptive {dict(adaptive.outcomes.statuses)}")


if __name__ == "__main__":
    main()
