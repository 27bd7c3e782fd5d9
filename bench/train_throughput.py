"""Training throughput of RIDE-4 ResNet-32 at batch 128 on this machine: every speed option as a ratio to fp32
eager, and our default step against the official RIDE code's step.

Every row runs the real step (gather uint8 images by index, augment on the batch, forward, RIDE loss, backward,
SGD) and all rows run interleaved in rounds in one process, so machine noise hits them alike. Compare ratios
only; absolute images/s differ 2-3x between machines of the same kind.

Rows:
- fp32 eager: NCHW, fp32, the foreach SGD step (what training did before these switches);
- each option alone (channels-last, bf16 autocast, fused SGD, compiled) and the combination training uses by
  default on this machine (``runtime.*`` in training/config.py). bf16 rows run only where the CPU has native
  bf16 (AVX512-BF16 or AMX); elsewhere bf16 is emulated and the row says so instead of printing a ratio;
- threads: the default combination on one thread (the scaling over cores);
- the data pipeline: the default combination on one pre-made batch (what augmentation costs);
- evaluation: the old predict (no_grad, batch 500, NCHW) against the current one (inference_mode, batch 512,
  channels-last);
- official: the official code's ResNet_s (4 experts, reduced width, NormedLinear) and RIDELoss in fp32 on a
  pre-made batch, as its trainer runs them. It gets its data for free, so "ours / official" is conservative.
  It needs a checkout of frank-xwang/RIDE-LongTailRecognition (``--official PATH``, never inside this repo);
  without one, or with a broken one, that row is skipped with the reason.

    python bench/train_throughput.py [--official PATH] [--compile] [--rounds 5] [--steps 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from official_code import official_cifar_model, official_ride_loss

from training.config import TrainConfig, load_config
from training.data import BatchAugment, LongTailData, iterate_batches, load_data, normalize
from training.evaluate import predict
from training.losses import build_loss
from training.models import build_model
from training.runtime import cpu_runs_bf16_natively, default_num_threads
from training.train import logit_scale

REPO = Path(__file__).resolve().parents[1]
BASELINE = "fp32 eager"


@dataclass(frozen=True)
class Variant:
    channels_last: bool = False
    bf16: bool = False
    fused: bool = False
    compiled: bool = False
    threads: int | None = None
    premade_batch: bool = False


def make_step(cfg: TrainConfig, data: LongTailData, variant: Variant, threads: int) -> Callable[[], int]:
    """One training step of RIDE-4 at ``cfg``'s batch size with the switches of ``variant``; returns images."""
    torch.manual_seed(0)
    model = build_model(cfg.model, data.num_classes).train()
    if variant.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if variant.compiled else model
    loss_fn = build_loss(cfg.loss, data.class_counts, logit_scale(cfg), drw_epoch=160)
    loss_fn.set_epoch(1)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=0.01,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        fused=variant.fused or None,
        foreach=None if variant.fused else True,
    )
    augment = BatchAugment.from_config(cfg.data)
    generator = torch.Generator().manual_seed(0)
    batch = cfg.optim.batch_size
    batches = _endless_batches(len(data.train), batch)
    fixed = normalize(data.train.images[:batch], cfg.data.mean, cfg.data.std)
    threads = variant.threads or threads

    def step() -> int:
        torch.set_num_threads(threads)
        if variant.premade_batch:
            images, targets = fixed, data.train.labels[:batch]
        else:
            indices = next(batches)
            images, targets = augment(data.train.images[indices], generator), data.train.labels[indices]
        if variant.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant.bf16):
            outputs = forward(images)
        loss = loss_fn(outputs.logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return len(targets)

    return step


def _endless_batches(num_items: int, batch: int) -> Iterator[torch.Tensor]:
    for epoch in range(1, 1_000_000):
        yield from iterate_batches(num_items, batch, shuffle=True, seed=0, epoch=epoch, drop_last=True)


def make_official_step(checkout: Path, cfg: TrainConfig, data: LongTailData, threads: int) -> Callable[[], int]:
    """The official model + loss + SGD step, fp32 NCHW, on one pre-made normalised batch.

    Only the two files the step needs are loaded (by path, so the checkout's package imports of tensorboard,
    pandas and torchvision are not needed); nothing is copied from them.
    """
    torch.manual_seed(0)
    model = official_cifar_model(checkout, cfg, data.num_classes).train()
    criterion = official_ride_loss(checkout, cfg, data.class_counts, drw_epoch=160)
    criterion._hook_before_epoch(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    batch = cfg.optim.batch_size
    images = normalize(data.train.images[:batch], cfg.data.mean, cfg.data.std)
    targets = data.train.labels[:batch]

    def step() -> int:
        torch.set_num_threads(threads)
        optimizer.zero_grad()
        output = model(images)
        loss = criterion(output_logits=output, target=targets, extra_info={"logits": model.logits})
        loss.backward()
        optimizer.step()
        return batch

    step()  # fail here, inside the caller's error handling, rather than in the timed rounds
    return step


def make_eval(cfg: TrainConfig, data: LongTailData, *, current: bool, threads: int) -> Callable[[], int]:
    """One evaluation pass over 2,048 test images: the old way (no_grad, batch 500, NCHW) or the current one."""
    torch.manual_seed(0)
    model = build_model(cfg.model, data.num_classes).eval()
    if current:
        model = model.to(memory_format=torch.channels_last)
    images = data.test.images[:2048]

    def run() -> int:
        torch.set_num_threads(threads)
        if current:
            predict(model, images, mean=cfg.data.mean, std=cfg.data.std, device=torch.device("cpu"), batch_size=512)
            return len(images)
        with torch.no_grad():
            for start in range(0, len(images), 500):
                model(normalize(images[start : start + 500], cfg.data.mean, cfg.data.std))
        return len(images)

    return run


def build_rows(args: argparse.Namespace, cfg: TrainConfig, data: LongTailData) -> tuple[dict, dict, list[str]]:
    """The timed training rows, the timed evaluation rows, and one line per row that was skipped (with why)."""
    native_bf16 = cpu_runs_bf16_natively()
    threads = args.threads or default_num_threads()
    default = Variant(channels_last=True, bf16=native_bf16, fused=True)
    variants = {
        BASELINE: Variant(),
        "channels-last": Variant(channels_last=True),
        "fused SGD": Variant(fused=True),
    }
    skipped = []
    if native_bf16:
        variants["bf16 autocast"] = Variant(bf16=True)
    else:
        skipped.append("bf16 autocast: skipped, this CPU has no native bf16 (AVX512-BF16/AMX); it would be emulated")
    variants["default (channels-last, fused" + (", bf16)" if native_bf16 else ")")] = default
    if args.compile:
        variants["compiled"] = Variant(compiled=True)
        variants["default + compiled"] = Variant(channels_last=True, bf16=native_bf16, fused=True, compiled=True)
    else:
        skipped.append("compiled: not measured (pass --compile; inductor warm-up takes minutes per variant)")
    if threads > 1:
        variants["default on 1 thread"] = Variant(channels_last=True, bf16=native_bf16, fused=True, threads=1)
    variants["default, pre-made batch"] = Variant(channels_last=True, bf16=native_bf16, fused=True, premade_batch=True)
    steps = {name: make_step(cfg, data, variant, threads) for name, variant in variants.items()}
    if args.official is None:
        skipped.append("official: skipped, no checkout given (--official PATH or RIDE_OFFICIAL_DIR)")
    else:
        try:
            steps["official RIDE code"] = make_official_step(args.official, cfg, data, threads)
        except Exception as error:  # a missing or wrong checkout must skip the row, never end the bench
            skipped.append(
                f"official: skipped, {args.official} did not give a working step ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''})"
            )
    evals = {
        "eval: old (no_grad, batch 500)": make_eval(cfg, data, current=False, threads=threads),
        "eval: current (inference_mode, 512)": make_eval(cfg, data, current=True, threads=threads),
    }
    return steps, evals, skipped


def measure(runs: dict[str, Callable[[], int]], rounds: int, steps: int, warmup: int) -> dict[str, list[float]]:
    """Images/s of every run, interleaved: each round runs every entry ``steps`` times, in turn."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            started, images = time.perf_counter(), 0
            for _ in range(steps):
                images += run()
            rates[name].append(images / (time.perf_counter() - started))
    return rates


def report(rates: dict[str, list[float]], baseline: str) -> None:
    base = statistics.median(rates[baseline])
    for name, values in rates.items():
        median = statistics.median(values)
        print(
            f"  {name:<40} {median:8.1f} img/s  x{median / base:5.2f}  (min {min(values):.1f}, max {max(values):.1f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "cifar10")
    parser.add_argument(
        "--official",
        type=Path,
        default=os.environ.get("RIDE_OFFICIAL_DIR"),
        help="checkout of frank-xwang/RIDE-LongTailRecognition (outside this repo)",
    )
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow warm-up)")
    parser.add_argument("--threads", type=int, help="torch threads for every row (default: physical cores)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per row per round")
    args = parser.parse_args()

    cfg = load_config(REPO / "configs" / "cifar10_lt_ride4.toml", [f'data.root="{args.data_dir}"'])
    data = load_data(cfg.data, args.data_dir)
    steps, evals, skipped = build_rows(args, cfg, data)
    load = os.getloadavg()[0]
    train_rates = measure(steps, args.rounds, args.steps, warmup=3 if args.compile else 2)
    eval_rates = measure(evals, args.rounds, 1, warmup=1)

    print(
        f"RIDE-4 ResNet-32, batch {cfg.optim.batch_size}, {args.threads or default_num_threads()} threads, CPU "
        f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_runs_bf16_natively()}, "
        f"{args.rounds} rounds x {args.steps} steps, load average at start {load:.1f}"
    )
    if load > 0.5:
        print(
            "  WARNING: something else was running when the bench started; ratios are still interleaved, but "
            "oversubscribed threads can distort them"
        )
    print("training step (real data pipeline unless said), ratio to fp32 eager:")
    report(train_rates, BASELINE)
    for line in skipped:
        print(f"  {line}")
    print("evaluation, ratio to the old predict:")
    report(eval_rates, next(iter(eval_rates)))
    default_name = next(name for name in train_rates if name.startswith("default ("))
    if "official RIDE code" in train_rates:
        ours = statistics.median(train_rates[default_name])
        official = statistics.median(train_rates["official RIDE code"])
        print(
            f"ours ({default_name}) / official = {ours / official:.2f}  (goal >= 1.5, stretch 2; the official row "
            "gets its batch for free)"
        )


if __name__ == "__main__":
    main()
