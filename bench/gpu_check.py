"""The prepared device check of issue 19, for a GPU machine without internet; `bench/gpu_check.sh` runs it.

    python bench/gpu_check.py prepare               # here: wheels and CIFAR-10-LT JPEGs into .gpu-check/
    python bench/gpu_check.py run [--cpu-dry-run]   # there (bench/gpu_check.sh), or here on the CPU, tiny

``prepare`` writes the git-ignored folder ``.gpu-check/``: the wheels of the pure-Python dependencies the GPU
image lacks (for CPython 3.12 on manylinux x86-64, at the versions of this checkout's environment) and the
CIFAR-10-LT images (the long-tailed training subset at imbalance factor 100, 12,406 JPEGs, and the test split)
as one tar. ``run`` prints, step by step, each with its time, and carries on past a failed step:

1. RIDE-4 trained a few epochs two ways: fp32 NCHW, and bf16 autocast + channels-last; seconds per epoch and the
   200-epoch estimate of each;
2. host syncs in the training step (CUDA's sync debug mode over one epoch, counted and located);
3. the epoch's statistics through NCCL's all_reduce (a group of one process: one GPU);
4. stage 2 (routers) and evaluation on the GPU, from the fp32 run's checkpoint;
5. the export, and the ONNX cascade on onnxruntime's CUDA provider where this onnxruntime has it (else why not);
6. the compiled run (bf16 + channels-last + torch.compile), last because its compilation takes longest.

``--cpu-dry-run`` runs the same steps on the CPU on a few images per class for two epochs, gloo standing in for
NCCL and the compiled run using dynamo's graph capture without inductor (whose code generation takes minutes a
graph on a small CPU): it checks the script, not the speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK = REPO / ".gpu-check"
DATA_TAR = "cifar10-lt.tar.gz"
CONFIG = REPO / "configs" / "cifar10_lt_ride4.toml"
# What the GPU machine's image lacks of what training and export import (it has torch, numpy, Pillow, safetensors,
# tqdm, matplotlib, onnx, onnxscript, onnxruntime and typing-extensions).
WHEELS = (
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "jsonschema",
    "jsonschema-specifications",
    "referencing",
    "rpds-py",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
FULL_EPOCHS = 200
GOAL_SECONDS = 300


# --------------------------------------------------------------------------------------------------------------
# prepare (here)
# --------------------------------------------------------------------------------------------------------------


def prepare(source: Path) -> None:
    from importlib.metadata import version

    wheels = PACK / "wheels"
    shutil.rmtree(PACK, ignore_errors=True)
    wheels.mkdir(parents=True)
    pins = [f"{name}=={version(name)}" for name in WHEELS]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(wheels), *pins]
    subprocess.run(command, check=True)
    print(f"wheels: {', '.join(sorted(p.name for p in wheels.iterdir()))}")
    _pack_images(source, PACK / DATA_TAR)
    total = sum(p.stat().st_size for p in PACK.rglob("*") if p.is_file())
    print(f"{PACK}: {total / 2**20:.1f} MiB (name it in the device call's carry)")


def _pack_images(source: Path, tar_path: Path) -> None:
    """The training images the long-tailed subset keeps (the project's own selection) and every test image."""
    from training.config import load_config
    from training.data.folder import scan_image_folder
    from training.data.longtail import longtail_counts, select_longtail

    data_cfg = load_config(CONFIG).data
    index = scan_image_folder(source)
    available = [int((index.train_labels == c).sum()) for c in range(len(index.classes))]
    counts = longtail_counts(available, len(index.classes), data_cfg.imbalance_profile, data_cfg.imbalance_factor)
    kept = select_longtail(index.train_labels, counts, data_cfg.subset_seed)
    files = [index.train_files[i] for i in kept] + list(index.test_files)
    with tarfile.open(tar_path, "w:gz") as tar:  # the JPEGs hardly shrink; the tar headers do
        for name in files:
            tar.add(source / name, arcname=name)
    print(f"images: {len(kept)} training (counts {counts}) and {len(index.test_files)} test, {tar_path.name}")


# --------------------------------------------------------------------------------------------------------------
# run (there)
# --------------------------------------------------------------------------------------------------------------


class Check:
    """The steps' shared state and their printed record."""

    def __init__(self, work: Path, dry_run: bool) -> None:
        import torch

        self.work = work
        self.dry_run = dry_run
        self.device = "cpu" if dry_run else "cuda"
        self.torch = torch
        self.results: list[tuple[str, str]] = []
        self.estimates: dict[str, dict[str, float]] = {}
        self.checkpoint: Path | None = None
        self.routed: Path | None = None
        self.data_root = work / "cifar10-lt"

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        print(f"\n== {name}", flush=True)
        started = time.perf_counter()
        try:
            yield
        except Exception as error:  # a check reports every step, whatever failed before
            traceback.print_exc(limit=4)
            self.results.append((name, f"FAILED: {type(error).__name__}: {str(error).splitlines()[0][:200]}"))
        except KeyboardInterrupt:  # bench/gpu_check.sh's time limit: the summary still comes out
            self.results.append((name, f"INTERRUPTED by the time limit after {time.perf_counter() - started:.0f} s"))
            raise
        else:
            self.results.append((name, f"ok, {time.perf_counter() - started:.1f} s"))
        print(f"   ({time.perf_counter() - started:.1f} s)", flush=True)

    @contextlib.contextmanager
    def quietly(self, name: str) -> Iterator[None]:
        """What the project's own code prints (progress bars, summaries) goes to a log file, whose end is shown
        when the code fails: the check's output stays short enough to come back whole."""
        log = self.work / f"{name.replace(' ', '-').replace('+', '')}.log"
        with log.open("w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            try:
                yield
            except Exception:
                sink.flush()
                sys.__stdout__.write("".join(log.read_text().splitlines(keepends=True)[-15:]))
                raise

    def overrides(self, *extra: str) -> list[str]:
        epochs = 2 if self.dry_run else 3
        return [
            f'data.root="{self.data_root}"',
            f'data.cache_dir="{self.work / "cache"}"',
            "data.imbalance_profile=none",  # the packed training images are the long-tailed subset already
            f"data.val_per_class={4 if self.dry_run else 20}",
            f"schedule.epochs={epochs}",
            f"runtime.device={self.device}",
            "runtime.checkpoint_every=1000",
            *extra,
        ]


def environment(check: Check) -> None:
    torch = check.torch
    print(f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(
            f"GPU {props.name}, {props.total_memory / 2**30:.0f} GiB, capability {props.major}.{props.minor}, "
            f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, bf16 {torch.cuda.is_bf16_supported()}"
        )
    elif not check.dry_run:
        raise RuntimeError("torch sees no CUDA device; run with --cpu-dry-run to check the script on the CPU")
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}: {', '.join(onnxruntime.get_available_providers())}")


def unpack_data(check: Check) -> None:
    with tarfile.open(PACK / DATA_TAR) as tar:
        members = tar.getmembers()
        if check.dry_run:  # a few images per class: 2 steps of 128 an epoch
            members = _first_per_class(members, {"train": 16, "test": 8})
        tar.extractall(check.data_root, members=members, filter="data")
    print(f"{len(members)} images in {check.data_root}")


def _first_per_class(members: list[tarfile.TarInfo], per_split: dict[str, int]) -> list[tarfile.TarInfo]:
    taken: dict[tuple[str, str], int] = {}
    kept = []
    for member in sorted(members, key=lambda m: m.name):
        split, label = member.name.split("/")[:2]
        if taken.get((split, label), 0) < per_split[split]:
            taken[(split, label)] = taken.get((split, label), 0) + 1
            kept.append(member)
    return kept


def train_variant(check: Check, name: str, *settings: str) -> dict[str, float]:
    """Train RIDE-4 with ``settings``; print seconds per epoch and the 200-epoch estimate."""
    from training.config import load_config
    from training.train import train

    out = check.work / name.replace(" ", "-").replace("+", "")
    cfg = load_config(CONFIG, check.overrides(*settings))
    started = time.perf_counter()
    with check.quietly(name):
        train(cfg, out=out)
    total = time.perf_counter() - started
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    epochs = [record["seconds"] for record in log]
    steady = statistics.median(epochs[1:]) if len(epochs) > 1 else epochs[0]
    overhead = total - sum(epochs)  # data, set-up, the last epoch's evaluation and saving
    estimate = overhead + epochs[0] + (FULL_EPOCHS - 1) * steady
    images_per_second = statistics.median(record["images_per_second"] for record in log[1:] or log)
    print(
        f"   {name}: epochs {', '.join(f'{s:.2f}' for s in epochs)} s (first one includes warm-up), steady "
        f"{steady:.2f} s/epoch ({images_per_second:.0f} images/s), set-up + evaluation {overhead:.1f} s"
    )
    verdict = "within" if estimate < GOAL_SECONDS else "over"
    print(f"   {name}: 200-epoch estimate {estimate:.0f} s ({estimate / 60:.1f} min; {verdict} the 5-minute goal)")
    if name == "fp32":
        check.checkpoint = out
    return {"steady": steady, "estimate": estimate}


def count_syncs(check: Check) -> None:
    """One epoch of the real step (no progress bar) under CUDA's sync debug mode."""
    if check.dry_run:
        print("   n/a on the CPU (CUDA's sync debug mode); tests/training/test_device.py counts copies on a stand-in")
        return
    torch = check.torch
    run, batches = _epoch_parts(check)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _one_epoch(check, run)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    where: dict[str, int] = {}
    for w in syncs:
        key = f"{Path(w.filename).name}:{w.lineno}"
        where[key] = where.get(key, 0) + 1
    print(f"   {len(syncs)} host syncs in one epoch of {batches} steps ({len(syncs) / batches:.2f} per step)")
    for key, count in sorted(where.items(), key=lambda item: -item[1])[:8]:
        print(f"     {count:4d} at {key}")


def _epoch_parts(check: Check) -> tuple[dict, int]:
    """What `train_one_epoch` takes, built as stage 1 builds it (bf16, channels-last, fused SGD on the GPU)."""
    torch = check.torch
    from training.config import load_config
    from training.data import BatchAugment, ImageSet, load_data
    from training.losses import build_loss
    from training.models import build_model
    from training.runtime import Runtime
    from training.train import epoch_batches, logit_scale

    cfg = load_config(CONFIG, check.overrides())
    device = torch.device(check.device)
    data = load_data(cfg.data, progress=False)
    model = build_model(cfg.model, data.num_classes).to(device, memory_format=torch.channels_last)
    loss_fn = build_loss(cfg.loss, data.class_counts, logit_scale(cfg), drw_epoch=1).to(device)
    loss_fn.set_epoch(2)  # DRW on: its class weights take part in every step
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, fused=True)
    train_set = ImageSet(data.train.images.to(device), data.train.labels.to(device))
    run = {
        "model": model,
        "loss_fn": loss_fn,
        "optimizer": optimizer,
        "train_set": train_set,
        "augment": BatchAugment.from_config(cfg.data),
        "cfg": cfg,
    }
    return run, len(epoch_batches(len(train_set), cfg, 1, Runtime(device)))


def _one_epoch(check: Check, run: dict, runtime: object = None) -> object:
    from training.runtime import Runtime
    from training.train import train_one_epoch

    return train_one_epoch(
        run["model"],
        run["loss_fn"],
        run["optimizer"],
        run["train_set"],
        run["augment"],
        cfg=run["cfg"],
        epoch=1,
        runtime=runtime or Runtime(check.torch.device(check.device)),
        progress=False,
    )


def nccl_statistics(check: Check) -> None:
    """The statistics tensor of an epoch through all_reduce: NCCL accepts only device tensors (crash 2)."""
    import torch.distributed as dist

    from training.runtime import Runtime

    backend = "gloo" if check.dry_run else "nccl"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        run, _ = _epoch_parts(check)
        # As rank 0 of 2: its share of each batch, and `all_reduce_sum` goes through the collective (of one process).
        stats = _one_epoch(check, run, Runtime(check.torch.device(check.device), rank=0, world_size=2))
        print(f"   {backend} all_reduce of the device statistics: loss {stats.loss:.3f}, {stats.images} images")
    finally:
        dist.destroy_process_group()


def route_and_evaluate(check: Check) -> None:
    from training.evaluate_checkpoint import evaluate_checkpoint
    from training.route import route_checkpoint

    if check.checkpoint is None:
        raise RuntimeError("no stage-1 checkpoint (the fp32 run failed)")
    started = time.perf_counter()
    with check.quietly("route"):
        check.routed = route_checkpoint(
            check.checkpoint, overrides=[f"runtime.device={check.device}"], out=check.work / "routed", progress=False
        )
    routed_s = time.perf_counter() - started
    started = time.perf_counter()
    with check.quietly("evaluate"):
        metrics = evaluate_checkpoint(check.routed, device_choice=check.device)
    print(
        f"   stage 2 (5 router epochs, curves, routed test metrics) {routed_s:.1f} s; evaluation "
        f"{time.perf_counter() - started:.1f} s; routed top-1 {metrics.routed.top1:.3f} at relative compute "
        f"{metrics.routed.relative_compute:.3f} (a few epochs of training: the numbers only show it runs)"
    )


def onnx_cascade(check: Check) -> None:
    import numpy as np
    import onnxruntime

    from cascade import run_cascade
    from export.build import export_checkpoint
    from export.providers import CUDA
    from export.verify import verify_model_folder
    from service.model import load_model

    if check.routed is None:
        raise RuntimeError("no routed checkpoint (stage 2 failed)")
    started = time.perf_counter()
    with check.quietly("export"):
        folder = export_checkpoint(check.routed, check.work / "model", data_dir=check.data_root, num_images=64).folder
    print(f"   exported and verified on onnxruntime's CPU provider in {time.perf_counter() - started:.1f} s")
    provider = "cpu" if check.dry_run else "cuda"
    if provider == "cuda" and CUDA not in onnxruntime.get_available_providers():
        print(
            f"   CUDA provider: not here. This onnxruntime {onnxruntime.__version__} offers "
            f"{onnxruntime.get_available_providers()}; the CUDA build (onnxruntime-gpu, about 250 MB, and its CUDA "
            "and cuDNN wheels, about 1 GB) is beyond what one call to this machine may carry, and it cannot be "
            "downloaded there. The service's CUDA path (provider options, profiled placement check, bucketed "
            "warm-up) is tested on the CPU; `python -m export verify --provider cuda` checks parity where it runs."
        )
        return
    model = load_model(folder, provider=provider, shared_thread_pool=False)  # the profiled placement check
    print(f"   provider in use: {model.provider}; {sum(r.computes for r in model.node_runs)} compute nodes profiled")
    images = np.random.default_rng(0).standard_normal((256, 3, 32, 32)).astype(np.float32)
    for batch in (1, 32, 256):
        run_cascade(model, images[:batch], thresholds=0.5, max_experts=model.num_experts)  # warm
        started = time.perf_counter()
        repeats = 20
        for _ in range(repeats):
            run_cascade(model, images[:batch], thresholds=0.5, max_experts=model.num_experts)
        seconds = (time.perf_counter() - started) / repeats
        print(f"   cascade at batch {batch}: {seconds * 1000:.2f} ms ({batch / seconds:.0f} images/s)")
    report = verify_model_folder(folder, data_dir=check.data_root, num_images=64, provider=provider)
    print("   " + report.summary().replace("\n", "\n   "))


@contextlib.contextmanager
def capture_without_inductor() -> Iterator[None]:
    """The dry run's compile: dynamo's capture and guards, run as captured (inductor takes minutes a graph here)."""
    import torch

    real = torch.compile
    torch.compile = lambda model, **options: real(model, backend="eager", **options)
    try:
        yield
    finally:
        torch.compile = real


def train_fp32(check: Check) -> None:
    check.estimates["fp32"] = train_variant(check, "fp32", "runtime.precision=fp32", "runtime.channels_last=false")


def train_bf16(check: Check) -> None:
    check.estimates["bf16 + channels-last"] = train_variant(check, "bf16 + channels-last", "runtime.precision=bf16")


def train_compiled(check: Check) -> None:
    name, settings = "bf16 + channels-last + compiled", ("runtime.precision=bf16", "runtime.compile=true")
    with capture_without_inductor() if check.dry_run else contextlib.nullcontext():
        check.estimates[name] = train_variant(check, name, *settings)


STEPS: list[tuple[str, Callable[[Check], None]]] = [
    ("environment", environment),
    ("data", unpack_data),
    ("train fp32", train_fp32),
    ("train bf16 + channels-last", train_bf16),
    ("host syncs per training step", count_syncs),
    ("all_reduce of the statistics (NCCL; gloo in the dry run)", nccl_statistics),
    ("route and evaluate on the device", route_and_evaluate),
    ("export and the ONNX cascade on the CUDA provider", onnx_cascade),
    ("train bf16 + channels-last + compiled", train_compiled),
]


def run(dry_run: bool) -> int:
    work = Path(os.environ.get("RIDE_GPU_CHECK_WORK", "/tmp/ride-gpu-check"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    check = Check(work, dry_run)
    started = time.perf_counter()
    with contextlib.suppress(KeyboardInterrupt):
        for name, action in STEPS:
            with check.step(name):
                action(check)
    print(f"\n== summary ({time.perf_counter() - started:.0f} s{', CPU dry run' if dry_run else ''})")
    for name, outcome in check.results:
        print(f"   {name}: {outcome}")
    for name, numbers in check.estimates.items():
        print(f"   {name}: {numbers['steady']:.2f} s/epoch, 200 epochs ~ {numbers['estimate']:.0f} s")
    return 0 if all(outcome.startswith("ok") for _, outcome in check.results) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare_parser = commands.add_parser("prepare", help="write .gpu-check/ (run here, with internet)")
    prepare_parser.add_argument("--source", type=Path, default=REPO.parent / "shared" / "data" / "cifar10")
    run_parser = commands.add_parser("run", help="the check itself (bench/gpu_check.sh calls it)")
    run_parser.add_argument("--cpu-dry-run", action="store_true", help="the same steps on the CPU, tiny")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.source)
        return 0
    return run(args.cpu_dry_run)


if __name__ == "__main__":
    sys.exit(main())
