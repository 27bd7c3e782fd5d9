"""Batch requests against single ones, one run: 32 images as one request against the same 32 as 32 requests.

`python -m service` runs pinned to the server CPUs; the client (httpx, pinned to the client CPUs) sends, round
after round, the same ``--rows`` CIFAR-10 test images (JPEG) in each of these forms:

- ``classify batch``: one POST /classify with ``--rows`` multipart ``file`` fields;
- ``v2 batch``: one Open Inference Protocol request, a BYTES input of ``--rows`` images, binary tensor data
  both ways (what tritonclient sends by default);
- ``singles, sequential``: ``--rows`` POST /classify one after another (one connection, kept alive);
- ``singles, concurrent``: ``--rows`` POST /classify at once (``--rows`` connections), which the server's dynamic
  batcher can gather into batches.

The forms take turns within each round (a slow moment of a shared machine hits them all), and each form's
images/s is its rows over the median time of a round. The ratios against the sequential singles are what to
read (on a shared machine only ratios measured in one run mean anything), except where the client itself was the
bottleneck: a form whose rounds kept the client's one thread busy 90 % of the time or more is marked client-bound,
and no ratio is printed for it (nor for any form, when it is the baseline). For reference, the same images go
through the raw cascade (`cascade.run_cascade`, no HTTP, in a child process on the server CPUs with the server's
thread count) as one batch and one by one, rounds interleaved likewise: the most that batching itself can give on
this CPU. The load average before and after is printed.

    python bench/batch_requests.py [--model-dir models/cifar10-lt-ride4] [--rows 32] [--rounds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
sys.path.insert(0, str(REPO / "bench"))

from serve_load import (  # noqa: E402
    CLIENT_CPU_LIMIT,
    DEFAULT_DATA_DIR,
    cpu_description,
    load_average,
    pick_test_images,
    start_server,
)

from cascade import run_cascade  # noqa: E402
from export.manifest import load_manifest  # noqa: E402
from service.images import ImageDecoder  # noqa: E402
from service.model import load_model  # noqa: E402
from service.settings import DEFAULT_MODEL_DIR  # noqa: E402

Form = Callable[[httpx.AsyncClient, list[bytes]], Awaitable[None]]


def _check(response: httpx.Response) -> None:
    if response.status_code != 200:
        raise SystemExit(
            f"{response.request.method} {response.request.url.path}: {response.status_code} {response.text}"
        )


async def classify_batch(client: httpx.AsyncClient, images: list[bytes]) -> None:
    files = [("file", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    _check(await client.post("/classify", files=files))


def v2_body(images: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """A binary v2 request as tritonclient builds one: the JSON header, then the BYTES elements."""
    data = b"".join(struct.pack("<I", len(image)) + image for image in images)
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [len(images)],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(data)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return head + data, {"Inference-Header-Content-Length": str(len(head))}


def v2_batch(model: str) -> Form:
    async def send(client: httpx.AsyncClient, images: list[bytes]) -> None:
        body, headers = v2_body(images)
        _check(await client.post(f"/v2/models/{model}/infer", content=body, headers=headers))

    return send


async def singles_sequential(client: httpx.AsyncClient, images: list[bytes]) -> None:
    for data in images:
        _check(await client.post("/classify", content=data, headers={"content-type": "image/jpeg"}))


async def singles_concurrent(client: httpx.AsyncClient, images: list[bytes]) -> None:
    headers = {"content-type": "image/jpeg"}
    for response in await asyncio.gather(*(client.post("/classify", content=d, headers=headers) for d in images)):
        _check(response)


async def measure(
    url: str, forms: dict[str, Form], images: list[bytes], rounds: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per round of each form, and the client's CPU seconds over all its rounds (this process: the client
    is one asyncio thread); one warm-up round of each first."""
    seconds: dict[str, list[float]] = {name: [] for name in forms}
    client_cpu_s = dict.fromkeys(forms, 0.0)
    limits = httpx.Limits(max_connections=len(images), max_keepalive_connections=len(images))
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as client:
        for form in forms.values():
            await form(client, images)
        for _ in range(rounds):
            for name, form in forms.items():
                started, cpu_started = time.perf_counter(), time.process_time()
                await form(client, images)
                seconds[name].append(time.perf_counter() - started)
                client_cpu_s[name] += time.process_time() - cpu_started
    return seconds, client_cpu_s


def client_cpu_share(seconds: dict[str, list[float]], client_cpu_s: dict[str, float]) -> dict[str, float]:
    """Each form's client CPU seconds over its wall seconds. The client is one asyncio thread, so 1.0 means it was
    never idle: a form at `CLIENT_CPU_LIMIT` or above measured the load generator, not the server."""
    return {name: client_cpu_s[name] / sum(rounds) for name, rounds in seconds.items()}


def forms_table(seconds: dict[str, list[float]], client_cpu_s: dict[str, float], rows: int) -> list[str]:
    """The table of the HTTP forms: images/s, the client's CPU share, and the ratio to the sequential singles,
    which is left out for a client-bound form (and for every form when the baseline is client-bound)."""
    lines = []
    client_share = client_cpu_share(seconds, client_cpu_s)
    bound = {name for name, share in client_share.items() if share >= CLIENT_CPU_LIMIT}
    baseline = rows / statistics.median(seconds["singles, sequential"])
    lines.append(
        f"\n{'form':<25}{'requests':>9}{'images/s':>11}{'ms/round p50':>14}{'client CPU':>12}"
        f"{'vs sequential singles':>23}"
    )
    for name, rounds in seconds.items():
        rate = rows / statistics.median(rounds)
        requests = 1 if "batch" in name else rows
        ratio = "client-bound" if bound & {name, "singles, sequential"} else f"{rate / baseline:.2f}x"
        lines.append(
            f"{name:<25}{requests:>9}{rate:>11.1f}{statistics.median(rounds) * 1e3:>14.1f}"
            f"{100 * client_share[name]:>11.0f}%{ratio:>23}"
        )
    if bound:
        lines.append(
            f"client-bound: {', '.join(sorted(bound))} kept the client's CPU busy {100 * CLIENT_CPU_LIMIT:.0f} % of "
            "the time or more, so the load generator set the pace; no ratio is given for them (or against them)."
        )
    return lines


def _raw_worker(model_dir: Path, images: list[bytes], rounds: int, cpus: list[int], out) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)  # before onnxruntime creates its pool, whose threads inherit it
    model = load_model(model_dir, provider="cpu", intra_op_threads=len(cpus))
    decoder = ImageDecoder(model.manifest.input, max_pixels=25_000_000)
    batch = np.stack([decoder.decode(data) for data in images])
    options = {"thresholds": model.manifest.cascade.default_threshold, "max_experts": model.num_experts}
    forms = {
        "raw cascade, batch": lambda: run_cascade(model, batch, **options),
        "raw cascade, one by one": lambda: [run_cascade(model, row[None], **options) for row in batch],
    }
    seconds: dict[str, list[float]] = {name: [] for name in forms}
    for form in forms.values():
        form()  # warm
    for _ in range(rounds):
        for name, form in forms.items():
            started = time.perf_counter()
            form()
            seconds[name].append(time.perf_counter() - started)
    out.put(seconds)


def raw_reference(model_dir: Path, images: list[bytes], rounds: int, cpus: list[int]) -> dict[str, list[float]]:
    """Seconds per round of the raw cascade on ``images`` as one batch and one by one, in a child process."""
    queue: multiprocessing.Queue = multiprocessing.Queue()
    process = multiprocessing.Process(target=_raw_worker, args=(model_dir, images, rounds, cpus, queue))
    process.start()
    seconds = queue.get(timeout=600)
    process.join()
    return seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="model (default: %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="CIFAR-10 folder with test/")
    parser.add_argument("--rows", type=int, default=32, help="images per batch request, and single requests per round")
    parser.add_argument("--rounds", type=int, default=30, help="measured rounds of every form")
    parser.add_argument("--max-batch-size", type=int, default=32, help="the server's batch size")
    parser.add_argument("--client-cpus", type=int, nargs="+", default=cpus[-1:], help="CPUs of the client")
    parser.add_argument("--server-cpus", type=int, nargs="+", default=cpus[:-1] or cpus, help="CPUs of the server")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    images = [path.read_bytes() for path in pick_test_images(args.data_dir, args.rows)]
    model = load_manifest(args.model_dir).model.name
    print(f"CPU: {cpu_description()}")
    print(
        f"load average at start {load_average()}; server CPUs {args.server_cpus}, client CPUs {args.client_cpus}; "
        f"{args.rows} images, {args.rounds} rounds; model {args.model_dir}"
    )
    forms = {
        "classify batch": classify_batch,
        "v2 batch": v2_batch(model),
        "singles, sequential": singles_sequential,
        "singles, concurrent": singles_concurrent,
    }
    raw = raw_reference(args.model_dir, images, args.rounds, args.server_cpus)
    with tempfile.TemporaryDirectory() as workdir:
        process, url = start_server(args.model_dir, args.server_cpus, args.max_batch_size, Path(workdir) / "server.log")
        try:
            if hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(0, args.client_cpus)
            seconds, client_cpu_s = asyncio.run(measure(url, forms, images, args.rounds))
        finally:
            process.terminate()
            process.wait(30)
    print(f"load average at end {load_average()}")
    print("\n".join(forms_table(seconds, client_cpu_s, args.rows)))
    one_by_one = args.rows / statistics.median(raw["raw cascade, one by one"])
    print(f"\n{'reference (no HTTP)':<25}{'':>9}{'images/s':>11}{'ms/round p50':>14}{'vs one by one':>23}")
    for name, rounds in raw.items():
        rate = args.rows / statistics.median(rounds)
        print(f"{name:<25}{'':>9}{rate:>11.1f}{statistics.median(rounds) * 1e3:>14.1f}{rate / one_by_one:>22.2f}x")


if __name__ == "__main__":
    main()
