"""Where a run executes: device choice, CPU threads, and (optionally) torchrun's process group."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from training.config import ConfigError


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


def start_runtime(device_choice: str, num_threads: int | None = None) -> Runtime:
    """Set up the device and, when launched by torchrun (WORLD_SIZE > 1), the process group."""
    device = resolve_device(device_choice)
    if num_threads is not None:
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
    if runtime.distributed:
        values = values.clone()
        dist.all_reduce(values)
    return values
