"""Overload benchmark: goodput and latency of the served 200s when four times more requests arrive than the server
can answer.

Starts `python -m service` on 127.0.0.1, pinned to its own CPUs, then:

1. capacity: a closed loop of ``--capacity-concurrency`` clients (16) posting real CIFAR-10 test images; the rate of
   200s is the server's capacity C;
2. overload: an open loop, requests arriving at ``--overload`` x C per second (4) at evenly spread times, each on a
   free kept-alive connection (a new one when all are busy), whatever the server answers; a 503 is final (no
   retry).

It prints goodput (200s per second) under overload as a fraction of C, and the p50 and p99 latency of the 200s
beside the bound they should stay within: RIDE_MAX_QUEUE_WAIT_MS plus the time of one full batch (from the
server's metrics). Goal (issue 13): goodput at least 0.9 of C, p99 of the 200s within that bound.

The load generator is a raw asyncio HTTP/1.1 client on its own CPU (``--client-cpus``): httpx costs too much per
request to offer 4x the load from one core. ``--repo`` serves another checkout of this repository (e.g. the main
branch, to compare), with this script's client.

    python bench/serve_overload.py [--model-dir models/cifar10-lt-ride4] [--duration 20] [--overload 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
sys.path.insert(0, str(REPO / "bench"))

from serve_load import DEFAULT_DATA_DIR, free_port, pick_test_images, pinned, wait_until_ready  # noqa: E402

from service.settings import DEFAULT_MODEL_DIR, Settings  # noqa: E402


@dataclass
class Outcomes:
    """What the load generator saw: per status, and the latencies of the 200s."""

    statuses: Counter = field(default_factory=Counter)
    refusals: Counter = field(default_factory=Counter)  # 503s by cause
    ok_latencies: list[float] = field(default_factory=list)
    connect_seconds: list[float] = field(default_factory=list)  # opening each new connection
    server_ms: list[float] = field(default_factory=list)  # each 200's own timing_ms.total: its time in the app
    server_queue_p99: str = "?"  # from the server's queue-wait histogram
    thresholds: list[float] = field(default_factory=list)  # each 200's X-Threshold header (the threshold it ran at)
    seconds: float = 0.0

    def rate(self, status: str) -> float:
        return self.statuses[status] / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.ok_latencies, q)) * 1e3 if self.ok_latencies else float("nan")


# ------------------------------------------------------------------------------------------------------------------
# A minimal HTTP/1.1 client: one request at a time per connection, Content-Length bodies only
# ------------------------------------------------------------------------------------------------------------------


# What a 503's message says, to tell refusals before the body (cheap) from requests dropped at their deadline (their
# body read and image decoded for nothing).
REFUSAL_KINDS = {
    b"expected wait": "refused: expected wait",
    b"already waiting": "refused: queue full",
    b"in the queue, above": "dropped at deadline",
    b"decoding slots": "refused: decoders busy",
}


def refusal_kind(body: bytes) -> str:
    return next((kind for text, kind in REFUSAL_KINDS.items() if text in body), "other")


def request_bytes(body: bytes) -> bytes:
    head = f"POST /classify HTTP/1.1\r\nHost: bench\r\nContent-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.threshold = float("nan")  # the last response's X-Threshold

    async def exchange(self, request: bytes) -> tuple[int, bool, bytes]:
        """Send ``request``; the response's status, whether the server closes the connection after it, and the
        body."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length, close = 0, False
        self.threshold = float("nan")
        for line in head.lower().split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and b"close" in value:
                close = True
            elif name == b"x-threshold":
                self.threshold = float(value)
        body = await self.reader.readexactly(length)
        return status, close, body

    def close(self) -> None:
        self.writer.close()


class Pool:
    """Kept-alive connections to one server; a request takes a free one, or opens one."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.free: list[Connection] = []

    async def send(self, request: bytes, outcomes: Outcomes) -> None:
        started = time.perf_counter()
        try:
            while self.free and self.free[-1].reader.at_eof():  # closed by the server while idle: as httpx does
                self.free.pop().close()
            if self.free:
                connection = self.free.pop()
            else:
                connection = Connection(*await asyncio.open_connection(self.host, self.port))
                outcomes.connect_seconds.append(time.perf_counter() - started)
            status, close, body = await connection.exchange(request)
        except (OSError, asyncio.IncompleteReadError, ValueError) as error:
            outcomes.statuses[f"error {type(error).__name__}"] += 1
            return
        outcomes.statuses[str(status)] += 1
        if status == 503:
            outcomes.refusals[refusal_kind(body)] += 1
        if status == 200:
            outcomes.ok_latencies.append(time.perf_counter() - started)
            outcomes.server_ms.append(json.loads(body)["timing_ms"]["total"])
            outcomes.thresholds.append(connection.threshold)
        if close:
            connection.close()
        else:
            self.free.append(connection)

    def close(self) -> None:
        for connection in self.free:
            connection.close()
        self.free.clear()


async def closed_loop(pool: Pool, requests: list[bytes], concurrency: int, seconds: float) -> Outcomes:
    outcomes = Outcomes()
    deadline = time.perf_counter() + seconds

    async def client(offset: int) -> None:
        i = offset
        while time.perf_counter() < deadline:
            await pool.send(requests[i % len(requests)], outcomes)
            i += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(k * 7) for k in range(concurrency)))
    outcomes.seconds = time.perf_counter() - started
    return outcomes


async def open_loop(pool: Pool, requests: list[bytes], rate: float, seconds: float) -> Outcomes:
    """Requests at ``rate`` per second for ``seconds``, each sent when its time comes, answered or not."""
    outcomes = Outcomes()
    in_flight: set[asyncio.Task[None]] = set()
    started = time.perf_counter()
    total = int(rate * seconds)
    for i in range(total):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(pool.send(requests[i % len(requests)], outcomes))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.gather(*in_flight)
    outcomes.seconds = time.perf_counter() - started
    return outcomes


def run_on(cpus: list[int], scenario):
    """Run the coroutine ``scenario`` with this process on ``cpus``, on uvloop when it is there."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(scenario)
    return uvloop.run(scenario)


# ------------------------------------------------------------------------------------------------------------------
# The server
# ------------------------------------------------------------------------------------------------------------------


def start_server(repo: Path, model_dir: Path, cpus: list[int], log_path: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "RIDE_INTRA_OP_THREADS": str(len(cpus)), "RIDE_LOG_LEVEL": "warning"}
    command = [sys.executable, "-m", "service", "--model-dir", str(model_dir), "--port", str(port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(pinned(command, cpus), cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    wait_until_ready(process, f"http://127.0.0.1:{port}", log_path)
    return process, port


def server_histograms(port: int) -> dict[str, float]:
    """The server's batch-time sum and count, and its queue-wait histogram (cumulative buckets by bound)."""
    for _ in range(50):  # at the connection cap a new connection may be refused: try again
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        if response.status_code == 200:
            break
        time.sleep(0.1)
    text = response.text
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ride_inference_duration_seconds_") and not sample.labels:
                samples[sample.name] = sample.value
            elif sample.name == "ride_queue_wait_seconds_bucket":
                samples[f"le {sample.labels['le']}"] = sample.value
    return samples


def quantile_bound(before: dict[str, float], after: dict[str, float], q: float) -> str:
    """The smallest queue-wait bucket bound holding a fraction ``q`` of the waits observed between two scrapes."""
    buckets = sorted((float(k[3:]), after[k] - before.get(k, 0.0)) for k in after if k.startswith("le "))
    total = buckets[-1][1]
    bound = next((upper for upper, count in buckets if total and count >= q * total), float("inf"))
    return f"<= {bound * 1e3:g} ms"


async def measure(
    port: int, requests: list[bytes], args: argparse.Namespace
) -> tuple[Outcomes, Outcomes, float, float]:
    """Capacity (after a warm-up), then overload at ``args.overload`` x capacity: both outcomes, the offered rate
    and the mean batch time during the overload."""
    pool = Pool("127.0.0.1", port)
    await closed_loop(pool, requests, args.capacity_concurrency, 2.0)
    capacity = await closed_loop(pool, requests, args.capacity_concurrency, args.duration)
    rate = args.overload * capacity.rate("200")
    before = server_histograms(port)
    overload = await open_loop(pool, requests, rate, args.duration)
    after = server_histograms(port)
    pool.close()
    count = "ride_inference_duration_seconds_count"
    batches = after[count] - before[count]
    total = after["ride_inference_duration_seconds_sum"] - before["ride_inference_duration_seconds_sum"]
    overload.server_queue_p99 = quantile_bound(before, after, 0.99)
    return capacity, overload, rate, total / batches if batches else float("nan")


# ------------------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-dir", type=Path, help=f"model folder (default: the --repo's {DEFAULT_MODEL_DIR.relative_to(REPO)})"
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="CIFAR-10 folder with test/")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose server runs (default: this one)")
    parser.add_argument("--images", type=int, default=500, help="distinct test images cycled through")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per measured run")
    parser.add_argument("--capacity-concurrency", type=int, default=16)
    parser.add_argument("--overload", type=float, default=4.0, help="offered load as a multiple of capacity")
    parser.add_argument("--client-cpus", type=int, nargs="+", default=cpus[-1:], help="CPUs of the load generator")
    parser.add_argument("--server-cpus", type=int, nargs="+", default=cpus[:-1] or cpus, help="CPUs of the server")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model_dir = args.model_dir or args.repo / DEFAULT_MODEL_DIR.relative_to(REPO)
    requests = [request_bytes(path.read_bytes()) for path in pick_test_images(args.data_dir, args.images)]
    settings = Settings()
    print(
        f"server {args.repo} on CPUs {args.server_cpus}, client on CPUs {args.client_cpus}; "
        f"RIDE_MAX_QUEUE_WAIT_MS {settings.max_queue_wait_ms:g} (this checkout's default)"
    )
    with tempfile.TemporaryDirectory() as workdir:
        server, port = start_server(args.repo, model_dir, args.server_cpus, Path(workdir) / "server.log")
        try:
            capacity, overload, rate, batch_s = run_on(args.client_cpus, measure(port, requests, args))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    print(
        f"capacity (closed loop, c={args.capacity_concurrency}): {capacity.rate('200'):.1f} 200s/s, "
        f"p50 {capacity.percentile_ms(50):.1f} ms, p99 {capacity.percentile_ms(99):.1f} ms, "
        f"other {dict((k, v) for k, v in capacity.statuses.items() if k != '200')}"
    )
    bound_ms = settings.max_queue_wait_ms + batch_s * 1e3
    print(
        f"overload (open loop, {rate:.0f} requests/s = {args.overload:g}x capacity): goodput "
        f"{overload.rate('200'):.1f} 200s/s = {overload.rate('200') / capacity.rate('200'):.2f} of capacity "
        f"(goal >= 0.90); 200s p50 {overload.percentile_ms(50):.1f} ms, p99 {overload.percentile_ms(99):.1f} ms "
        f"(bound: queue wait {settings.max_queue_wait_ms:g} ms + one batch {batch_s * 1e3:.1f} ms "
        f"= {bound_ms:.0f} ms); answers {dict(overload.statuses)}, 503s {dict(overload.refusals)}"
    )
    connects = overload.connect_seconds
    print(
        f"  server side: queue wait p99 {overload.server_queue_p99}, time in the app p99 "
        f"{np.percentile(overload.server_ms, 99):.0f} ms; client side: {len(connects)} connections "
        f"opened, connect p99 {np.percentile(connects, 99) * 1e3 if connects else float('nan'):.0f} ms"
    )


if __name__ == "__main__":
    main()
