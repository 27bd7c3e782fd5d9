"""Where a run executes: device choice, CPU threads, and (optionally) torchrun's process group."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from training.config import ConfigError, RuntimeConfig


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(choice: str) -> torch.device:
    """'auto' picks CUDA when it can really run, else the CPU; asking for CUDA without it is an error."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but torch sees no usable CUDA device; use --device cpu")
    if choice in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _cpu_capabilities() -> dict | None:
    """torch's reading of the CPU (features, cores), or None on torch builds that lack it."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    return get_capabilities() if get_capabilities is not None else None


def cpu_runs_bf16_natively() -> bool:
    """True where the CPU has bf16 arithmetic (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower than fp32.

    Machines of the same fleet differ (some have AVX2 only), so this is read at run time, never assumed.
    """
    capabilities = _cpu_capabilities()
    if capabilities is not None:
        return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(choice: str, device: torch.device) -> torch.dtype:
    """The training compute dtype for ``runtime.precision`` on ``device`` ('auto': bf16 only where it is native)."""
    if choice == "fp32":
        return torch.float32
    if choice == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_runs_bf16_natively() else torch.float32


def default_num_threads() -> int:
    """Physical cores: a second hyper-thread per core slows oneDNN's convolutions down rather than up."""
    capabilities = _cpu_capabilities()
    physical = capabilities.get("num_physical_cores") if capabilities is not None else None
    return int(physical) if physical else max(1, (os.cpu_count() or 1))


def describe_execution(cfg: RuntimeConfig, device: torch.device) -> str:
    """One line for the run's log: precision (and why), memory layout, compilation, threads."""
    dtype = resolve_precision(cfg.precision, device)
    precision = "bf16 autocast" if dtype == torch.bfloat16 else "fp32"
    if cfg.precision == "auto" and device.type == "cpu":
        precision += " (CPU has native bf16)" if dtype == torch.bfloat16 else " (no native bf16 on this CPU)"
    parts = [precision, "channels-last" if cfg.channels_last else "NCHW"]
    if cfg.compile:
        parts.append("torch.compile")
    if device.type == "cpu":
        parts.append(f"{torch.get_num_threads()} threads")
    return ", ".join(parts)


def configure_device(device: torch.device) -> None:
    """What every run on ``device`` wants set first."""
    if device.type == "cuda":
        # Batch shapes repeat every step (the last batch of an epoch is one more shape), so cuDNN's one-off
        # benchmark of each convolution's algorithms pays for itself within the first epoch.
        torch.backends.cudnn.benchmark = True


def start_runtime(device_choice: str, num_threads: int | None = None) -> Runtime:
    """Set up the device and, when launched by torchrun (WORLD_SIZE > 1), the process group."""
    device = resolve_device(device_choice)
    configure_device(device)
    if device.type == "cpu":
        # torchrun starts LOCAL_WORLD_SIZE processes on this host: they share its cores.
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(num_threads or max(1, default_num_threads() // local_processes))
    elif num_threads is not None:
        torch.set_num_threads(num_threads)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return Runtime(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    return Runtime(device, dist.get_rank(), dist.get_world_size())


def stop_runtime(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """The sum of ``values`` over the processes (``values`` itself in a single process).

    ``values`` must live on the training device, whatever the backend: NCCL reduces only CUDA tensors, and a rule
    that held only under NCCL would let a CPU-only test (gloo) pass code that crashes on GPUs.
    """
    if values.device != runtime.device:
        raise ValueError(f"reduce on the training device {runtime.device}, not on {values.device}")
    if runtime.distributed:
        values = values.clone()
        dist.all_reduce(values)
    return values
