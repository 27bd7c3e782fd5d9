"""A stand-in for a GPU on a CPU-only machine: training code runs with ``meta`` as its device, under a dispatch
mode that refuses what CUDA refuses and counts what makes a GPU wait for the host.

- An op whose tensor operands sit on both the device and the CPU raises :class:`MixedDevicesError`, naming the op,
  where CUDA would raise "Expected all tensors to be on the same device" (or NCCL would refuse a CPU tensor).
  CUDA accepts a few mixes (a 0-dim CPU tensor in an elementwise op, a CPU index into a CUDA tensor) by copying
  from the host, which makes the GPU wait; the stand-in refuses those too, which keeps the rule simple.
- Copies between the device and the host are allowed and counted (:attr:`SimulatedDevice.to_host`,
  :attr:`SimulatedDevice.to_device`); ``.item()``, ``.cpu()`` and friends on a device tensor count as copies to
  the host. On a GPU each copy to the host, and each copy from pageable host memory, waits for the device: they
  are the host syncs a training step must not have.
- Meta tensors hold no values, so what comes back to the host is ones (a count of 1, a loss of 1.0). The code
  under test runs its real control flow; its numbers are not checked here.

What it cannot simulate: the meta device has no random generator (the tests hand the code a CPU generator after
checking it asked for one on the device), no autocast and no fused optimizer kernels, and ops whose output size
depends on the data (``nonzero``, ``bincount``) fail on it; on a GPU those are host syncs too.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

DEVICE = torch.device("meta")
aten = torch.ops.aten


class MixedDevicesError(RuntimeError):
    """An op took tensors on the device and on the CPU at once."""


def _fill_one(dtype: torch.dtype) -> bool | int | float:
    if dtype == torch.bool:
        return True
    return 1 if not dtype.is_floating_point else 1.0


# Factories that copy Python or NumPy data: with a device argument they are a copy from the host (they never reach
# the dispatcher as one, so the function mode below sees them).
_FROM_HOST_DATA = {torch.tensor, torch.as_tensor, torch.asarray}


class _HostData(TorchFunctionMode):
    def __init__(self, device: SimulatedDevice) -> None:
        super().__init__()
        self.device = device

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if func in _FROM_HOST_DATA and device is not None and torch.device(device).type == "meta":
            self.device.to_device += 1
        return func(*args, **kwargs)


class SimulatedDevice(TorchDispatchMode):
    """``with SimulatedDevice() as device:`` run code whose device is :data:`DEVICE`."""

    def __init__(self) -> None:
        super().__init__()
        self.to_host = 0
        self.to_device = 0
        self._host_data = _HostData(self)

    def __enter__(self) -> SimulatedDevice:
        self._host_data.__enter__()
        return super().__enter__()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        super().__exit__(kind, error, traceback)
        self._host_data.__exit__(kind, error, traceback)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default and args[0].is_meta:
            self.to_host += 1
            return _fill_one(args[0].dtype)
        if func.overloadpacket in (aten._to_copy, aten.to):  # `to` itself reaches here under inference mode
            return self._copy_to(func, args, kwargs)
        if func is aten.copy_.default:
            destination, source = args[0], args[1]
            if source.is_meta and not destination.is_meta:
                self.to_host += 1
                return destination.fill_(_fill_one(destination.dtype))
            if destination.is_meta and not source.is_meta:
                self.to_device += 1
            return func(*args, **kwargs)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(t.is_meta for t in tensors) and any(t.device.type == "cpu" for t in tensors):
            operands = ", ".join(f"{t.device.type} {list(t.shape)}" for t in tensors)
            raise MixedDevicesError(f"{func} mixes tensors on the device and on the CPU ({operands})")
        return func(*args, **kwargs)

    def _copy_to(self, func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        source = args[0]
        named = [kwargs.get("device")] + [a for a in args[1:] if isinstance(a, torch.device)]
        target = next((torch.device(d) for d in named if d is not None), source.device)
        if source.is_meta and target.type == "cpu":
            self.to_host += 1
            dtype = kwargs.get("dtype") or source.dtype
            return torch.full(source.shape, _fill_one(dtype), dtype=dtype)
        if not source.is_meta and target.type == "meta":
            self.to_device += 1
        return func(*args, **kwargs)

    @property
    def syncs(self) -> int:
        """Copies either way: each is a point where a GPU and its host wait for each other."""
        return self.to_host + self.to_device
