"""Shadow agreement measured live against offline, on the same real images.

Starts `python -m service` with ``RIDE_SHADOW_RATE=1`` (every classification shadowed) at the model's default
threshold, posts ``--per-class`` CIFAR-10 test images of every class one after another, waits for the shadow to
have checked them all, and reads ``ride_shadow_total`` from /metrics. Then, without the server, decodes the same
images with the service's decoder and runs the cascade (`cascade.run_cascade`) routed and with every expert, one
image at a time as the requests ran. Prints the agreement per class group of the routed answer, both ways.

    python bench/shadow_agreement.py [--model-dir models/cifar10-lt-ride4] [--per-class 50]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
sys.path.insert(0, str(REPO / "bench"))

from serve_load import DEFAULT_DATA_DIR, free_port, wait_until_ready  # noqa: E402

from cascade import run_cascade  # noqa: E402
from service.images import ImageDecoder  # noqa: E402
from service.model import load_model  # noqa: E402
from service.settings import DEFAULT_MODEL_DIR  # noqa: E402

SHADOW_WAIT_S = 300.0


def class_images(data_dir: Path, class_names: list[str], per_class: int) -> list[bytes]:
    """The first ``per_class`` test images of every class, in class order."""
    folders = [data_dir / "test" / name for name in class_names]
    return [p.read_bytes() for folder in folders for p in sorted(folder.glob("*.jpg"))[:per_class]]


def live_counts(model_dir: Path, images: list[bytes]) -> Counter:
    port = free_port()
    env = {**os.environ, "RIDE_SHADOW_RATE": "1", "RIDE_LOG_LEVEL": "warning"}
    command = [sys.executable, "-m", "service", "--model-dir", str(model_dir), "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as workdir:
        log_path = Path(workdir) / "server.log"
        with open(log_path, "wb") as log:
            server = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_ready(server, url, log_path)
            with httpx.Client(base_url=url, timeout=30.0) as client:
                for data in images:
                    client.post("/classify", content=data, headers={"content-type": "image/jpeg"}).raise_for_status()
                deadline = time.monotonic() + SHADOW_WAIT_S
                while sum((counts := shadow_counts(client.get("/metrics").text)).values()) < len(images):
                    if time.monotonic() > deadline:
                        raise SystemExit(f"error: the shadow checked {sum(counts.values())} of {len(images)}")
                    time.sleep(0.1)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    return counts


def shadow_counts(text: str) -> Counter:
    return Counter(
        {
            (sample.labels["outcome"], sample.labels["group"]): int(sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "ride_shadow_total"
        }
    )


def offline_counts(model_dir: Path, images: list[bytes]) -> Counter:
    model = load_model(model_dir, provider="cpu", shared_thread_pool=False)
    manifest = model.manifest
    decoder = ImageDecoder(manifest.input, max_pixels=25_000_000)
    threshold, experts = manifest.cascade.default_threshold, model.num_experts
    counts: Counter = Counter()
    for data in images:
        batch = decoder.decode(data)[None]
        routed = run_cascade(model, batch, thresholds=threshold, max_experts=experts).probabilities.argmax(axis=1)[0]
        full = run_cascade(model, batch, thresholds=0.0, max_experts=experts).probabilities.argmax(axis=1)[0]
        counts[("agree" if routed == full else "disagree", manifest.classes[routed].group)] += 1
    return counts


def agreement(counts: Counter, group: str | None) -> str:
    agree = sum(v for (outcome, g), v in counts.items() if outcome == "agree" and group in (None, g))
    total = sum(v for (_, g), v in counts.items() if group in (None, g))
    return f"{agree}/{total} = {100 * agree / total:.2f} %" if total else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="CIFAR-10 folder with test/")
    parser.add_argument("--per-class", type=int, default=50, help="test images per class")
    args = parser.parse_args()
    model = load_model(args.model_dir, provider="cpu", shared_thread_pool=False)
    classes = model.manifest.classes
    images = class_images(args.data_dir, [c.name for c in classes], args.per_class)
    live, offline = live_counts(args.model_dir, images), offline_counts(args.model_dir, images)
    print(f"{len(images)} test images, threshold {model.manifest.cascade.default_threshold:.4g}")
    print("| routed answer's group | live (ride_shadow_total) | offline | equal |")
    print("|---|---|---|---|")
    for group in [*sorted({c.group for c in classes}), None]:
        live_text, offline_text = agreement(live, group), agreement(offline, group)
        print(f"| {group or 'all'} | {live_text} | {offline_text} | {live_text == offline_text} |")


if __name__ == "__main__":
    main()
