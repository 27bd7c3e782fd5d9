"""Serving benchmark, one run: the raw cascade and the HTTP server, float32 and int8, side by side.

For each model folder (the float32 one, and its int8 variant when there is one):

- raw: `cascade.run_cascade` on decoded CIFAR-10 test images, without HTTP, on the server's CPUs with the
  server's thread count: images/s at batch 1 and at ``--max-batch-size`` (32), routed (the manifest's threshold)
  and full (every expert), and the single-image latency (routed, batch 1: trunk, the experts used, routers;
  median over the images) beside the decoding time of one image;
- server: `python -m service` pinned to the server CPUs, driven by wrk pinned to the client CPUs at each
  concurrency (1 and 64), posting the same images as raw ``image/jpeg`` bodies: requests/s, p50, p99, and from
  the server's /metrics the mean experts used, batch size, queue wait and time in the server.

Then the ratios: int8 / float32, server at the top concurrency / raw at the batch size (goal 0.85), server routed
/ server full (goal 1.4, issue 5), and the server's p50 at concurrency 1 minus the raw single-image latency
(goal: at most 1.0 ms).

It refuses to mislead. A load generator that cannot keep up measures itself: after every load run the client's
CPU use (its CPU time over the run's wall time on its CPUs) and the requests it kept in flight (Little's law:
requests/s x mean latency) are checked, and a run where the client used 90 % of its CPUs or kept fewer than
90 % of the asked concurrency in flight is marked client-limited: no ratio is printed from it, and the line says
why. wrk is required (Debian package ``wrk``; ``make bench`` installs it): without it the benchmark stops,
unless ``--python-client`` asks for the Python load generator, whose runs are judged by the same rule. The CPU
and its instruction sets (int8 speed depends on VNNI) and the load average before and after are printed: on a
shared machine, only ratios measured in one run mean anything.

    python bench/serve_load.py [--model-dir models/cifar10-lt-ride4] [--int8-model-dir DIR] [--duration 10]
                               [--concurrency 1 64] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from cascade import run_cascade  # noqa: E402
from export.manifest import load_manifest  # noqa: E402
from service.images import ImageDecoder  # noqa: E402
from service.model import OnnxModel, load_model  # noqa: E402
from service.settings import DEFAULT_MODEL_DIR  # noqa: E402

DEFAULT_DATA_DIR = Path(os.environ.get("RIDE_CIFAR10_DIR", REPO.parent / "shared" / "data" / "cifar10"))
DEFAULT_INT8_MODEL_DIR = DEFAULT_MODEL_DIR.with_name(DEFAULT_MODEL_DIR.name + "-int8")
CLIENT_CPU_LIMIT = 0.9  # a client using this share of its CPUs may be what limits the load
IN_FLIGHT_FLOOR = 0.9  # a client keeping fewer than this share of the asked concurrency in flight limits the load
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
MODES = ("routed", "full")


# ------------------------------------------------------------------------------------------------------------------
# The machine
# ------------------------------------------------------------------------------------------------------------------


def cpu_description() -> str:
    """The CPU model and which of the instruction sets that matter for int8 it has (Linux; else 'unknown')."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU (no /proc/cpuinfo)"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    present = [flag for flag in CPU_FLAGS if flag in flags]
    vnni = "yes" if {"avx512_vnni", "avx_vnni"} & flags else "no (int8 runs, without the dot-product instructions)"
    shown = " ".join(present) or "none of " + ", ".join(CPU_FLAGS)
    return f"{fields.get('model name', 'unknown')}; flags: {shown}; VNNI: {vnni}"


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


# ------------------------------------------------------------------------------------------------------------------
# Inputs and the server
# ------------------------------------------------------------------------------------------------------------------


def pick_test_images(data_dir: Path, count: int) -> list[Path]:
    """``count`` test images, taken round-robin over the classes so that every class is represented."""
    folders = sorted(p for p in (data_dir / "test").iterdir() if p.is_dir())
    per_class = [sorted(folder.glob("*.jpg")) for folder in folders]
    paths = [files[i] for i in range(max(map(len, per_class))) for files in per_class if i < len(files)]
    if not paths:
        raise SystemExit(f"no test images under {data_dir / 'test'} (set --data-dir or RIDE_CIFAR10_DIR)")
    return paths[:count]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pinned(command: list[str], cpus: list[int]) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, cpus)), *command] if shutil.which("taskset") else command


def start_server(model_dir: Path, cpus: list[int], batch_size: int, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "RIDE_INTRA_OP_THREADS": str(len(cpus)),
        "RIDE_MAX_BATCH_SIZE": str(batch_size),
        "RIDE_LOG_LEVEL": "warning",
        # Capacity is measured, not shedding: no request may be refused for the wait it would have in the queue.
        "RIDE_MAX_QUEUE_WAIT_MS": "60000",
    }
    command = [sys.executable, "-m", "service", "--model-dir", str(model_dir), "--port", str(port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(pinned(command, cpus), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(process, url, log_path)
    return process, url


def wait_until_ready(process: subprocess.Popen, url: str, log_path: Path, timeout_s: float = 120.0) -> None:
    """Return once ``url``'s /readyz answers 200; end the bench with the server's log if it exits or never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"server not ready after {timeout_s:g} s:\n{log_path.read_text()}")


SCRAPED = (
    "ride_experts_used",
    "ride_batch_size",
    "ride_queue_wait_seconds",
    "ride_inference_duration_seconds",
    "ride_request_duration_seconds",
)


def scrape(url: str) -> dict[str, float]:
    """The sums and counts of the histograms the report uses (request durations of /classify only)."""
    wanted = {f"{name}_{part}" for name in SCRAPED for part in ("sum", "count")}
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name in wanted and sample.labels.get("route", "/classify") == "/classify"
    }


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def mean_of(delta: dict[str, float], name: str, scale: float = 1.0) -> float:
    return scale * ratio(delta.get(f"{name}_sum", 0.0), delta.get(f"{name}_count", 0.0))


# ------------------------------------------------------------------------------------------------------------------
# Load generators: each returns requests/s, p50, p99, mean latency, errors and the client's CPU seconds
# ------------------------------------------------------------------------------------------------------------------

WRK_SCRIPT = """
local paths = {%(paths)s}
local requests = {}
local next_index = 0

function init(args)
  for i, path in ipairs(paths) do
    local file = assert(io.open(path, "rb"))
    requests[i] = wrk.format("POST", "%(target)s", {["Content-Type"] = "image/jpeg"}, file:read("*a"))
    file:close()
  end
  next_index = math.random(#requests)
end

function request()
  next_index = next_index %% #requests + 1
  return requests[next_index]
end

function done(summary, latency, requests)
  local errors = summary.errors
  local format = '{"requests": %%d, "duration_us": %%d, "errors": %%d, "p50_us": %%d, "p99_us": %%d, "mean_us": %%f}'
  io.write("RESULT " .. string.format(format,
    summary.requests, summary.duration,
    errors.connect + errors.read + errors.write + errors.timeout + errors.status,
    latency:percentile(50), latency:percentile(99), latency.mean) .. "\\n")
end
"""


def run_wrk(url: str, target: str, paths: list[Path], concurrency: int, seconds: float, cpus: list[int]) -> dict:
    lua_paths = ", ".join(json.dumps(str(p)) for p in paths)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % {"paths": lua_paths, "target": target})
    try:
        threads = max(1, min(concurrency, len(cpus)))
        command = ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "10s"]
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            process = subprocess.Popen(pinned([*command, "-s", script.name, url], cpus), stdout=out, stderr=err)
            # wait4 gives the CPU time of wrk itself (taskset execs it in the same process).
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            err.seek(0)
            output, errors = out.read(), err.read()
        if process.returncode != 0:
            raise SystemExit(f"wrk failed ({process.returncode}): {errors.strip()}")
    finally:
        os.unlink(script.name)
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    raw = json.loads(line.removeprefix("RESULT "))
    return {
        "requests_per_s": raw["requests"] / (raw["duration_us"] / 1e6),
        "p50_ms": raw["p50_us"] / 1e3,
        "p99_ms": raw["p99_us"] / 1e3,
        "mean_latency_ms": raw["mean_us"] / 1e3,
        "errors": raw["errors"],
        "wall_s": raw["duration_us"] / 1e6,
        "client_cpu_s": usage.ru_utime + usage.ru_stime,
    }


def _python_load_worker(url: str, bodies: list[bytes], concurrency: int, seconds: float, cpus: list[int], out) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)

    async def scenario() -> dict:
        latencies: list[float] = []
        errors = 0
        deadline = time.perf_counter() + seconds
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(timeout=10, limits=limits) as client:

            async def worker(offset: int) -> None:
                nonlocal errors
                i = offset
                while time.perf_counter() < deadline:
                    started = time.perf_counter()
                    body = bodies[i % len(bodies)]
                    response = await client.post(url, content=body, headers={"content-type": "image/jpeg"})
                    latencies.append(time.perf_counter() - started)
                    errors += response.status_code != 200
                    i += 1

            started = time.perf_counter()
            await asyncio.gather(*(worker(k * 7) for k in range(concurrency)))
            elapsed = time.perf_counter() - started
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "requests_per_s": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(latencies, 50)) * 1e3,
            "p99_ms": float(np.percentile(latencies, 99)) * 1e3,
            "mean_latency_ms": float(np.mean(latencies)) * 1e3,
            "errors": errors,
            "wall_s": elapsed,
            "client_cpu_s": usage.ru_utime + usage.ru_stime,
        }

    out.put(asyncio.run(scenario()))


def run_python_load(
    url: str, target: str, paths: list[Path], concurrency: int, seconds: float, cpus: list[int]
) -> dict:
    """An asyncio httpx client in its own process, pinned to the client CPUs (usually the bottleneck)."""
    queue: multiprocessing.Queue = multiprocessing.Queue()
    bodies = [p.read_bytes() for p in paths]
    process = multiprocessing.Process(
        target=_python_load_worker, args=(url + target, bodies, concurrency, seconds, cpus, queue)
    )
    process.start()
    result = queue.get(timeout=seconds + 120)
    process.join()
    return result


# ------------------------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """One measured load run against the server."""

    model: str
    mode: str
    concurrency: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    mean_latency_ms: float
    errors: int
    client_cpu: float  # the client's CPU time over the run's wall time, per client CPU (1.0: all of them busy)
    in_flight: float  # requests the client kept in flight on average: requests/s x mean latency
    mean_experts: float
    mean_batch_size: float
    server_queue_ms: float  # mean wait for the batch to start
    server_inference_ms: float  # mean wall time of a batch through the cascade
    server_request_ms: float  # mean time in the server (middleware to last byte)
    client_limited: str = ""  # why the run cannot be compared: errors, or a client that set the pace ("" if none)

    def judge_client(self) -> None:
        reasons = []
        if self.errors:
            reasons.append(f"{self.errors} requests failed or were refused")
        if self.client_cpu >= CLIENT_CPU_LIMIT:
            reasons.append(
                f"client CPU at {100 * self.client_cpu:.0f} % of its CPUs: the load generator was the bottleneck"
            )
        if self.in_flight < IN_FLIGHT_FLOOR * self.concurrency:
            reasons.append(
                f"{self.in_flight:.2f} requests in flight of {self.concurrency} asked: the load generator was the "
                "bottleneck"
            )
        self.client_limited = "; ".join(reasons)


@dataclass
class RawResult:
    """The cascade without HTTP for one model: images/s per (mode, batch size), single-image latency."""

    model: str
    images_per_s: dict[str, float] = field(default_factory=dict)  # key "mode/batch"
    mean_experts: dict[str, float] = field(default_factory=dict)
    latency_p50_ms: float = float("nan")  # routed, batch 1: trunk + experts used + routers
    decode_p50_ms: float = float("nan")  # one JPEG to the normalised input, on one thread


def measure_load(
    load, url: str, model: str, mode: str, target: str, concurrency: int, args: argparse.Namespace, paths: list[Path]
) -> LoadResult:
    load(url, target, paths, concurrency, args.warmup, args.client_cpus)
    before = scrape(url)
    measured = load(url, target, paths, concurrency, args.duration, args.client_cpus)
    after = scrape(url)
    delta = {name: after[name] - before.get(name, 0.0) for name in after}
    cpu_s, wall_s = measured.pop("client_cpu_s"), measured.pop("wall_s")
    result = LoadResult(
        model=model,
        mode=mode,
        concurrency=concurrency,
        client_cpu=cpu_s / (wall_s * len(args.client_cpus)),
        in_flight=measured["requests_per_s"] * measured["mean_latency_ms"] / 1e3,
        mean_experts=mean_of(delta, "ride_experts_used"),
        mean_batch_size=mean_of(delta, "ride_batch_size"),
        server_queue_ms=mean_of(delta, "ride_queue_wait_seconds", 1e3),
        server_inference_ms=mean_of(delta, "ride_inference_duration_seconds", 1e3),
        server_request_ms=mean_of(delta, "ride_request_duration_seconds", 1e3),
        **measured,
    )
    result.judge_client()
    return result


def serve_and_load(
    model: str, model_dir: Path, args: argparse.Namespace, paths: list[Path], load, workdir: Path
) -> list[LoadResult]:
    num_experts = load_manifest(model_dir).cascade.num_experts
    targets = {"routed": "/classify", "full": f"/classify?threshold=0&max_experts={num_experts}"}
    server, url = start_server(model_dir, args.server_cpus, args.max_batch_size, workdir / f"server-{model}.log")
    results = []
    try:
        for mode in MODES:
            for concurrency in args.concurrency:
                result = measure_load(load, url, model, mode, targets[mode], concurrency, args, paths)
                results.append(result)
                print(
                    f"  server {model:<4} {mode:>6} c={concurrency:<3} {result.requests_per_s:8.1f} req/s"
                    f"  p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  batch {result.mean_batch_size:5.1f}"
                    f"  experts {result.mean_experts:.2f}  client CPU {100 * result.client_cpu:3.0f} %"
                    f"  in flight {result.in_flight:5.1f}"
                    + (f"  NOT COMPARABLE ({result.client_limited})" if result.client_limited else "")
                    + (f"  ERRORS {result.errors}" if result.errors else ""),
                    flush=True,
                )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    return results


# ------------------------------------------------------------------------------------------------------------------
# The raw cascade
# ------------------------------------------------------------------------------------------------------------------


def cascade_options(model: OnnxModel, mode: str) -> dict:
    threshold = model.manifest.cascade.default_threshold if mode == "routed" else 0.0
    return {"thresholds": threshold, "max_experts": model.num_experts}


def raw_throughput(
    model: OnnxModel, images: np.ndarray, mode: str, batch: int, seconds: float
) -> tuple[int, int, float]:
    """Rows, experts run and seconds of ``run_cascade`` in batches of ``batch`` for about ``seconds``."""
    options = cascade_options(model, mode)
    run_cascade(model, images[:batch], **options)  # warm
    rows, experts, offset = 0, 0, 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        chunk = images[offset : offset + batch]
        if len(chunk) < batch:
            chunk = np.concatenate([chunk, images[: batch - len(chunk)]])
        result = run_cascade(model, chunk, **options)
        rows += len(chunk)
        experts += int(result.experts_used.sum())
        offset = (offset + batch) % len(images)
    return rows, experts, time.perf_counter() - started


SINGLE_IMAGE_PAUSE_S = 0.002


def single_image_seconds(model: OnnxModel, images: np.ndarray) -> list[float]:
    """Wall time of the routed cascade on each image alone (batch 1), with a pause between images as a server at
    concurrency 1 has between requests: on a shared CPU the scheduler favours a process that sleeps between
    bursts over one that computes without a break, so a tight loop would be timed at a disadvantage."""
    options = cascade_options(model, "routed")
    times = []
    for image in images:
        time.sleep(SINGLE_IMAGE_PAUSE_S)
        started = time.perf_counter()
        run_cascade(model, image[None], **options)
        times.append(time.perf_counter() - started)
    return times


def raw_for_model(name: str, folder: Path, paths: list[Path], args: argparse.Namespace) -> RawResult:
    """One model's raw numbers, measured in this process on the server's CPUs with the server's thread count."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, args.server_cpus)  # before onnxruntime creates its pool, whose threads inherit it
    model = load_model(folder, provider="cpu", intra_op_threads=len(args.server_cpus))
    decoder = ImageDecoder(model.manifest.input, max_pixels=25_000_000)
    decode_times, decoded = [], []
    for path in paths:
        body = path.read_bytes()
        started = time.perf_counter()
        decoded.append(decoder.decode(body))
        decode_times.append(time.perf_counter() - started)
    images = np.stack(decoded)
    result = RawResult(name, decode_p50_ms=1e3 * statistics.median(decode_times))
    for mode in MODES:
        for batch in sorted({1, args.max_batch_size}):
            rows, experts, seconds = raw_throughput(model, images, mode, batch, args.duration)
            result.images_per_s[f"{mode}/{batch}"] = rows / seconds
            result.mean_experts[f"{mode}/{batch}"] = experts / rows
    # Last, so that it is measured just before the server's first run (routed, concurrency 1) it is compared with.
    result.latency_p50_ms = 1e3 * statistics.median(single_image_seconds(model, images[: args.latency_images]))
    return result


def _raw_worker(name: str, folder: Path, paths: list[Path], args: argparse.Namespace, out) -> None:
    out.put(asdict(raw_for_model(name, folder, paths, args)))


def raw_in_child(name: str, folder: Path, paths: list[Path], args: argparse.Namespace) -> RawResult:
    """:func:`raw_for_model` in a child process: its CPU pinning and onnxruntime thread pool stay its own."""
    queue: multiprocessing.Queue = multiprocessing.Queue()
    process = multiprocessing.Process(target=_raw_worker, args=(name, folder, paths, args, queue))
    process.start()
    result = queue.get(timeout=20 * args.duration + 600)
    process.join()
    return RawResult(**result)


# ------------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------------


def _refused(*runs: LoadResult) -> str:
    limited = [f"{r.model} {r.mode} c={r.concurrency}: {r.client_limited}" for r in runs if r.client_limited]
    return "not printed (" + "; ".join(limited) + ")" if limited else ""


def report(loads: list[LoadResult], raw: dict[str, RawResult], args: argparse.Namespace) -> list[str]:
    lines = []
    by_key = {(r.model, r.mode, r.concurrency): r for r in loads}
    models = list(raw)
    batch, low, top = args.max_batch_size, min(args.concurrency), max(args.concurrency)
    header = f"  {'':<44}" + "".join(f"{m:>10}" for m in models) + ("   int8/fp32" if len(models) == 2 else "")
    lines.append(header)

    def row(label: str, values: list[float], fmt: str = "{:10.1f}", ratio_wanted: bool = True) -> None:
        text = "".join(fmt.format(v) for v in values)
        if len(values) == 2 and ratio_wanted:
            text += f"{ratio(values[1], values[0]):12.2f}"
        lines.append(f"  {label:<44}{text}")

    for mode in MODES:
        for b in sorted({1, batch}):
            row(f"raw {mode}, batch {b} (img/s)", [raw[m].images_per_s[f"{mode}/{b}"] for m in models])
    row("raw single image, routed: p50 (ms)", [raw[m].latency_p50_ms for m in models], "{:10.2f}", False)
    row("decode one JPEG: p50 (ms)", [raw[m].decode_p50_ms for m in models], "{:10.2f}", False)
    for mode in MODES:
        for c in args.concurrency:
            runs = [by_key[(m, mode, c)] for m in models]
            mark = " *" if any(r.client_limited for r in runs) else ""
            row(f"server {mode}, c={c} (req/s){mark}", [r.requests_per_s for r in runs])
            row(f"server {mode}, c={c}: p50 (ms)", [r.p50_ms for r in runs], "{:10.2f}", False)
    lines.append("  (* a run with failed requests or a load generator that set the pace: no ratio from it)")
    lines.append("")
    lines.append("goals (issue 17), from this run:")
    for m in models:
        single = by_key[(m, "routed", low)]
        refused = _refused(single)
        difference = single.p50_ms - raw[m].latency_p50_ms
        lines.append(
            f"  {m}: server p50 at c={low} minus raw single-image latency: "
            + (refused or f"{single.p50_ms:.2f} - {raw[m].latency_p50_ms:.2f} = {difference:+.2f} ms (goal <= 1.0)")
        )
        if not refused:
            lines.append(
                f"        in the server: {single.server_request_ms:.2f} ms mean (queue {single.server_queue_ms:.2f}, "
                f"batch through the cascade {single.server_inference_ms:.2f}); decode {raw[m].decode_p50_ms:.2f} ms"
            )
        for mode, goal in (("routed", 0.85), ("full", None)):
            busy = by_key[(m, mode, top)]
            value = ratio(busy.requests_per_s, raw[m].images_per_s[f"{mode}/{batch}"])
            refused = _refused(busy)
            lines.append(
                f"  {m}: server {mode} c={top} / raw {mode} batch {batch}: "
                + (refused or f"{value:.2f}" + (f" (goal >= {goal})" if goal else ""))
            )
            if mode == "routed" and not refused:
                # With the server CPUs saturated, 1 / throughput is the CPU time a request costs; the raw cascade's
                # cost per image at the same batch size is the floor. (The server's own inference timing cannot
                # split them: on shared CPUs its wall time includes the event loop's work for the other requests.)
                per_request = 1e3 / busy.requests_per_s
                floor = 1e3 / raw[m].images_per_s[f"{mode}/{batch}"]
                lines.append(
                    f"        per request {per_request:.2f} ms of server CPU time against {floor:.2f} ms for the raw "
                    f"cascade: {per_request - floor:.2f} ms for HTTP, decoding, the response and the batcher"
                )
        routed, full = by_key[(m, "routed", top)], by_key[(m, "full", top)]
        refused = _refused(routed, full)
        lines.append(
            f"  {m}: server routed / server full at c={top}: "
            + (refused or f"{ratio(routed.requests_per_s, full.requests_per_s):.2f} (goal >= 1.4)")
        )
    if len(models) == 2:
        fp32, int8 = models
        lines.append(
            f"  int8 / fp32 raw routed throughput: batch 1 "
            f"{ratio(raw[int8].images_per_s['routed/1'], raw[fp32].images_per_s['routed/1']):.2f}, batch {batch} "
            f"{ratio(raw[int8].images_per_s[f'routed/{batch}'], raw[fp32].images_per_s[f'routed/{batch}']):.2f} "
            "(goal >= 1.5)"
        )
        pair = (by_key[(fp32, "routed", top)], by_key[(int8, "routed", top)])
        refused = _refused(*pair)
        lines.append(
            f"  int8 / fp32 server routed at c={top}: "
            + (refused or f"{ratio(pair[1].requests_per_s, pair[0].requests_per_s):.2f}")
        )
    return lines


# ------------------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="float32 model (default: %(default)s)"
    )
    parser.add_argument(
        "--int8-model-dir",
        type=Path,
        default=DEFAULT_INT8_MODEL_DIR,
        help="int8 model compared with it, skipped when absent (default: %(default)s)",
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="CIFAR-10 folder with test/")
    parser.add_argument("--images", type=int, default=500, help="distinct test images cycled through")
    parser.add_argument("--latency-images", type=int, default=200, help="images timed one by one for the latency")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load run and per raw measurement")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each measured run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--max-batch-size", type=int, default=32, help="the server's, and the raw run's batch size")
    parser.add_argument("--client-cpus", type=int, nargs="+", default=cpus[-1:], help="CPUs of the load generator")
    parser.add_argument("--server-cpus", type=int, nargs="+", default=cpus[:-1] or cpus, help="CPUs of the server")
    parser.add_argument("--python-client", action="store_true", help="use the Python load generator instead of wrk")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.python_client and shutil.which("wrk") is None:
        raise SystemExit(
            "wrk is not installed: it is the load generator this benchmark trusts (`make bench` installs it, or "
            "`apt-get install wrk`); --python-client runs the Python one instead, judged by the same rule"
        )
    load = run_python_load if args.python_client else run_wrk
    model_dirs = {"fp32": args.model_dir}
    if args.int8_model_dir.is_dir():
        model_dirs["int8"] = args.int8_model_dir
    paths = pick_test_images(args.data_dir, args.images)
    started_load = load_average()
    print(f"CPU: {cpu_description()}")
    print(
        f"load average at start {started_load}; server CPUs {args.server_cpus}, client CPUs {args.client_cpus}, "
        f"client {'python' if args.python_client else 'wrk'}, {len(paths)} images"
    )
    for name, folder in model_dirs.items():
        manifest = load_manifest(folder)
        print(f"  {name}: {folder} ({manifest.model.name} {manifest.model.version}, {manifest.precision})")
    loads: list[LoadResult] = []
    raw: dict[str, RawResult] = {}
    with tempfile.TemporaryDirectory() as workdir:
        # Each model's raw cascade just before its server, on the same CPUs: the two are compared.
        for name, folder in model_dirs.items():
            raw[name] = raw_in_child(name, folder, paths, args)
            print(
                f"  raw    {name:<4} single image {raw[name].latency_p50_ms:.2f} ms; "
                + ", ".join(f"{key} {value:.1f} img/s" for key, value in raw[name].images_per_s.items()),
                flush=True,
            )
            loads += serve_and_load(name, folder, args, paths, load, Path(workdir))
    print(f"load average at end {load_average()}")
    print()
    for line in report(loads, raw, args):
        print(line)
    if args.json:
        record = {
            "cpu": cpu_description(),
            "load_average": {"start": started_load, "end": load_average()},
            "load": [asdict(r) for r in loads],
            "raw": {name: asdict(r) for name, r in raw.items()},
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
