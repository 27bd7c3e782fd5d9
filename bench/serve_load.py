"""Load benchmark of the inference service: HTTP throughput and latency against the raw cascade limit.

Starts `python -m service` on 127.0.0.1, then drives it with `wrk` (Debian package `wrk`; a Python load generator
in a separate process is the fallback) at each concurrency, posting real CIFAR-10 test images as raw
``image/jpeg`` bodies, in two modes:

- routed: the manifest's default threshold, the routers decide how many experts run;
- full: ``threshold=0&max_experts=E``, every expert (and router) runs for every image.

The mean experts used and the mean batch size come from the server's own /metrics. Then, with the server
stopped, the same cascade (`cascade.run_cascade`) runs on the same decoded images in batches of
``max_batch_size`` without HTTP, on the same CPUs with the same thread count: the raw limit.

The load generator gets its own CPUs (``--client-cpus``, default the last one) and the server the others, so
that the client does not measure itself. Goals (issue 5): at concurrency 64 the routed server reaches at least
0.6 of the raw routed limit, and routed throughput is at least 1.4x the full ensemble's.

    python bench/serve_load.py [--model-dir models/cifar10-lt-ride4] [--duration 10] [--concurrency 1 16 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from cascade import run_cascade  # noqa: E402
from export.manifest import load_manifest  # noqa: E402
from service.images import ImageDecoder  # noqa: E402
from service.model import load_model  # noqa: E402
from service.settings import DEFAULT_MODEL_DIR  # noqa: E402

DEFAULT_DATA_DIR = Path(os.environ.get("RIDE_CIFAR10_DIR", REPO.parent / "shared" / "data" / "cifar10"))


@dataclass
class LoadResult:
    mode: str
    concurrency: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    mean_experts: float
    mean_batch_size: float


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


def scrape(url: str) -> dict[str, float]:
    """The sums and counts of the server's experts-used and batch-size histograms."""
    wanted = {"ride_experts_used_sum", "ride_experts_used_count", "ride_batch_size_sum", "ride_batch_size_count"}
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name in wanted
    }


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


# ------------------------------------------------------------------------------------------------------------------
# Load generators
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
  io.write(string.format('RESULT {"requests": %%d, "duration_us": %%d, "errors": %%d, "p50_us": %%d, "p99_us": %%d}\\n',
    summary.requests, summary.duration,
    errors.connect + errors.read + errors.write + errors.timeout + errors.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


def run_wrk(url: str, target: str, paths: list[Path], concurrency: int, seconds: float, cpus: list[int]) -> dict:
    lua_paths = ", ".join(json.dumps(str(p)) for p in paths)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % {"paths": lua_paths, "target": target})
    try:
        threads = max(1, min(concurrency, len(cpus)))
        command = [
            "wrk",
            f"-t{threads}",
            f"-c{concurrency}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            script.name,
        ]
        finished = subprocess.run(pinned([*command, url], cpus), capture_output=True, text=True)
        if finished.returncode != 0:
            raise SystemExit(f"wrk failed ({finished.returncode}): {finished.stderr.strip()}")
        output = finished.stdout
    finally:
        os.unlink(script.name)
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    raw = json.loads(line.removeprefix("RESULT "))
    return {
        "requests_per_s": raw["requests"] / (raw["duration_us"] / 1e6),
        "p50_ms": raw["p50_us"] / 1e3,
        "p99_ms": raw["p99_us"] / 1e3,
        "errors": raw["errors"],
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
        return {
            "requests_per_s": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(latencies, 50)) * 1e3,
            "p99_ms": float(np.percentile(latencies, 99)) * 1e3,
            "errors": errors,
        }

    out.put(asyncio.run(scenario()))


def run_python_load(
    url: str, target: str, paths: list[Path], concurrency: int, seconds: float, cpus: list[int]
) -> dict:
    """Fallback without wrk: an asyncio httpx client in its own process, pinned to the client CPUs."""
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
# The raw limit
# ------------------------------------------------------------------------------------------------------------------


def raw_throughput(
    model_dir: Path, paths: list[Path], *, cpus: list[int], batch_size: int, seconds: float
) -> dict[str, dict[str, float]]:
    """Images/s of `run_cascade` on the decoded images in batches, routed and full, on the server's CPUs."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)  # before onnxruntime creates its pool, whose threads inherit it
    model = load_model(model_dir, provider="cpu", intra_op_threads=len(cpus))
    decoder = ImageDecoder(model.manifest.input, max_pixels=25_000_000)
    bodies = [p.read_bytes() for p in paths]
    started = time.perf_counter()
    images = np.stack([decoder.decode(data) for data in bodies])
    decode_per_s = len(bodies) / (time.perf_counter() - started)
    modes = {
        "routed": {"thresholds": model.manifest.cascade.default_threshold, "max_experts": model.num_experts},
        "full": {"thresholds": 0.0, "max_experts": model.num_experts},
    }
    results: dict[str, dict[str, float]] = {"decode": {"images_per_s": decode_per_s}}
    for mode, options in modes.items():
        run_cascade(model, images[:batch_size], **options)  # warm
        rows, experts, offset = 0, 0, 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            batch = images[offset : offset + batch_size]
            if len(batch) < batch_size:
                batch = np.concatenate([batch, images[: batch_size - len(batch)]])
            result = run_cascade(model, batch, **options)
            rows += len(batch)
            experts += int(result.experts_used.sum())
            offset = (offset + batch_size) % len(images)
        elapsed = time.perf_counter() - started
        results[mode] = {"images_per_s": rows / elapsed, "mean_experts": experts / rows}
    return results


# ------------------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="model folder (default: %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="CIFAR-10 folder with test/")
    parser.add_argument("--images", type=int, default=500, help="distinct test images cycled through")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each measured run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--max-batch-size", type=int, default=32, help="the server's, and the raw run's batch size")
    parser.add_argument("--client-cpus", type=int, nargs="+", default=cpus[-1:], help="CPUs of the load generator")
    parser.add_argument("--server-cpus", type=int, nargs="+", default=cpus[:-1] or cpus, help="CPUs of the server")
    parser.add_argument("--python-client", action="store_true", help="use the Python load generator even with wrk")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    manifest = load_manifest(args.model_dir)
    num_experts = manifest.cascade.num_experts
    paths = pick_test_images(args.data_dir, args.images)
    use_wrk = shutil.which("wrk") is not None and not args.python_client
    load = run_wrk if use_wrk else run_python_load
    print(
        f"model {manifest.model.name} {manifest.model.version} ({num_experts} experts), {len(paths)} images, "
        f"server CPUs {args.server_cpus}, client CPUs {args.client_cpus}, client {'wrk' if use_wrk else 'python'}"
    )
    targets = {"routed": "/classify", "full": f"/classify?threshold=0&max_experts={num_experts}"}

    results: list[LoadResult] = []
    with tempfile.TemporaryDirectory() as workdir:
        server, url = start_server(args.model_dir, args.server_cpus, args.max_batch_size, Path(workdir) / "server.log")
        try:
            for mode, target in targets.items():
                for concurrency in args.concurrency:
                    load(url, target, paths, concurrency, args.warmup, args.client_cpus)
                    before = scrape(url)
                    measured = load(url, target, paths, concurrency, args.duration, args.client_cpus)
                    after = scrape(url)
                    delta = {name: after[name] - before.get(name, 0.0) for name in after}
                    result = LoadResult(
                        mode=mode,
                        concurrency=concurrency,
                        mean_experts=ratio(delta["ride_experts_used_sum"], delta["ride_experts_used_count"]),
                        mean_batch_size=ratio(delta["ride_batch_size_sum"], delta["ride_batch_size_count"]),
                        **measured,
                    )
                    results.append(result)
                    print(
                        f"{mode:>6} c={concurrency:<3} {result.requests_per_s:8.1f} req/s  p50 {result.p50_ms:7.2f} ms"
                        f"  p99 {result.p99_ms:7.2f} ms  experts {result.mean_experts:.2f}"
                        f"  batch {result.mean_batch_size:5.1f}  errors {result.errors}",
                        flush=True,
                    )
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)

    batch = args.max_batch_size
    raw = raw_throughput(args.model_dir, paths, cpus=args.server_cpus, batch_size=batch, seconds=args.duration)
    print(
        f"raw cascade, batch {batch}, no HTTP: routed {raw['routed']['images_per_s']:.1f} img/s "
        f"(experts {raw['routed']['mean_experts']:.2f}), full {raw['full']['images_per_s']:.1f} img/s; "
        f"decode alone {raw['decode']['images_per_s']:.0f} img/s on one thread"
    )
    by_key = {(r.mode, r.concurrency): r for r in results}
    top = max(args.concurrency)
    routed, full = by_key[("routed", top)], by_key[("full", top)]
    print(f"ratios at concurrency {top}:")
    lines = [
        ("server routed / raw routed limit", ratio(routed.requests_per_s, raw["routed"]["images_per_s"]), "0.6"),
        ("server full / raw full limit", ratio(full.requests_per_s, raw["full"]["images_per_s"]), None),
        ("server routed / server full", ratio(routed.requests_per_s, full.requests_per_s), "1.4"),
        ("raw routed / raw full", ratio(raw["routed"]["images_per_s"], raw["full"]["images_per_s"]), None),
    ]
    for name, value, goal in lines:
        print(f"  {name:<34}: {value:.2f}" + (f" (goal >= {goal})" if goal else ""))
    if args.json:
        args.json.write_text(json.dumps({"load": [asdict(r) for r in results], "raw": raw}, indent=2) + "\n")


if __name__ == "__main__":
    main()
