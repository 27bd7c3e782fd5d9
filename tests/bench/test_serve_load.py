"""The serving benchmark (bench/serve_load.py) cannot mislead: no ratio from a run whose load generator set the
pace, and no silent fallback when wrk is missing. Its numbers are never asserted (benchmarks print ratios; tests
check behaviour)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.server_process import REPO_ROOT

BENCH = REPO_ROOT / "bench" / "serve_load.py"


@pytest.fixture(scope="module")
def serve_load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("serve_load", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_load"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def load_result(serve_load: ModuleType, model: str, mode: str, concurrency: int, **values):
    fields = {
        "requests_per_s": 100.0,
        "p50_ms": 5.0,
        "p99_ms": 9.0,
        "mean_latency_ms": 5.0,
        "errors": 0,
        "client_cpu": 0.1,
        "in_flight": 0.0,
        "mean_experts": 1.5,
        "mean_batch_size": 1.0,
        "server_queue_ms": 0.1,
        "server_inference_ms": 4.0,
        "server_request_ms": 4.5,
        **values,
    }
    if "in_flight" not in values:
        fields["in_flight"] = float(concurrency)
    result = serve_load.LoadResult(model=model, mode=mode, concurrency=concurrency, **fields)
    result.judge_client()
    return result


def test_a_run_is_client_limited_by_its_cpu_or_by_too_few_requests_in_flight(serve_load: ModuleType) -> None:
    assert load_result(serve_load, "fp32", "routed", 64, client_cpu=0.5, in_flight=62.0).client_limited == ""
    busy = load_result(serve_load, "fp32", "routed", 64, client_cpu=0.95, in_flight=63.0)
    assert busy.client_limited == "client CPU at 95 % of its CPUs: the load generator was the bottleneck"
    starved = load_result(serve_load, "fp32", "routed", 64, client_cpu=0.3, in_flight=12.0)
    assert starved.client_limited == "12.00 requests in flight of 64 asked: the load generator was the bottleneck"
    failed = load_result(serve_load, "fp32", "routed", 64, errors=3)
    assert failed.client_limited == "3 requests failed or were refused"
    assert load_result(serve_load, "fp32", "routed", 1, in_flight=0.85).client_limited != ""


def test_report_prints_no_ratio_from_a_client_limited_run(serve_load: ModuleType) -> None:
    args = serve_load.parse_args(["--concurrency", "1", "64"])
    raw = {}
    for model in ("fp32", "int8"):
        raw[model] = serve_load.RawResult(model, latency_p50_ms=3.0, decode_p50_ms=0.1)
        for mode in serve_load.MODES:
            for batch in (1, 32):
                raw[model].images_per_s[f"{mode}/{batch}"] = 200.0
    loads = [
        load_result(serve_load, model, mode, c)
        for model in raw
        for mode in serve_load.MODES
        for c in (1, 64)
        if (model, mode, c) != ("int8", "routed", 64)
    ]
    loads.append(load_result(serve_load, "int8", "routed", 64, in_flight=20.0))
    lines = serve_load.report(loads, raw, args)
    text = "\n".join(lines)
    refused = [line for line in lines if "not printed (" in line and "the load generator was the bottleneck" in line]
    # Every ratio that needs int8 routed at c=64 is refused, with the reason; the others are printed.
    assert len(refused) == 3 and all("int8 routed c=64: 20.00 requests in flight of 64 asked" in r for r in refused)
    assert "int8: server routed c=64 / raw routed batch 32: not printed" in text
    assert "fp32: server routed c=64 / raw routed batch 32: 0.50 (goal >= 0.85)" in text
    assert "fp32: server p50 at c=1 minus raw single-image latency: 5.00 - 3.00 = +2.00 ms" in text
    assert "server routed, c=64 (req/s) *" in text


def test_without_wrk_the_benchmark_stops_instead_of_falling_back(model_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # nothing on the PATH, wrk included
    result = subprocess.run(
        [sys.executable, str(BENCH), "--model-dir", str(model_dir)], capture_output=True, text=True, env=env
    )
    assert result.returncode != 0
    assert "wrk is not installed" in result.stderr and "make bench" in result.stderr


def test_benchmark_runs_end_to_end_with_wrk(
    model_dir: Path, early_exit_int8_model_dir: Path, cifar10_dir: Path, tmp_path: Path
) -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install wrk; .ci/run and make bench install it)")
    report = tmp_path / "bench.json"
    command = [sys.executable, str(BENCH), "--model-dir", str(model_dir), "--int8-model-dir"]
    command += [str(early_exit_int8_model_dir), "--data-dir", str(cifar10_dir), "--json", str(report)]
    command += ["--duration", "1", "--warmup", "0.5", "--images", "20", "--latency-images", "5"]
    result = subprocess.run([*command, "--max-batch-size", "8"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("CPU: ") and "flags:" in out.splitlines()[0] and "VNNI:" in out.splitlines()[0]
    assert "load average at start" in out and "load average at end" in out
    assert "raw single image, routed: p50 (ms)" in out and "int8 / fp32 raw routed throughput" in out
    record = json.loads(report.read_text())
    runs = {(r["model"], r["mode"], r["concurrency"]) for r in record["load"]}
    assert runs == {(m, mode, c) for m in ("fp32", "int8") for mode in ("routed", "full") for c in (1, 64)}
    assert all(r["errors"] == 0 for r in record["load"])
    assert set(record["raw"]["int8"]["images_per_s"]) == {"routed/1", "routed/8", "full/1", "full/8"}
