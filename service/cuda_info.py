"""What CUDA the server runs on, for its start-up log line: the GPU's name, the CUDA version of the driver, and the
versions of the CUDA runtime and cuDNN libraries the process loaded.

Read through ctypes from the libraries themselves (the service has no torch): the driver's ``libcuda.so.1``, the
runtime ``libcudart.so.<major>`` of onnxruntime's CUDA build and ``libcudnn.so.9``. Once onnxruntime's CUDA
provider has loaded them, opening them by name returns those very libraries. A part that cannot be read says so
instead of failing the start-up.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

NOT_FOUND = "not found"


@dataclass(frozen=True)
class CudaInfo:
    gpu: str
    driver_cuda: str
    runtime: str
    cudnn: str

    def describe(self) -> str:
        return f"GPU {self.gpu}, CUDA driver {self.driver_cuda}, CUDA runtime {self.runtime}, cuDNN {self.cudnn}"


def cuda_version_text(value: int) -> str:
    """CUDA's integer version (1000 x major + 10 x minor) as text: 13000 -> '13.0', 12080 -> '12.8'."""
    return f"{value // 1000}.{value % 1000 // 10}"


def cudnn_version_text(value: int) -> str:
    """cuDNN 9's integer version (10000 x major + 100 x minor + patch) as text: 92801 -> '9.28.1'."""
    return f"{value // 10000}.{value % 10000 // 100}.{value % 100}"


def _open(name: str) -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def _driver(device_index: int) -> tuple[str, str]:
    """(GPU name, the driver's CUDA version) through the driver API."""
    cuda = _open("libcuda.so.1")
    if cuda is None or cuda.cuInit(0) != 0:
        return NOT_FOUND, NOT_FOUND
    version, device = ctypes.c_int(), ctypes.c_int()
    driver = cuda_version_text(version.value) if cuda.cuDriverGetVersion(ctypes.byref(version)) == 0 else "unknown"
    name = ctypes.create_string_buffer(256)
    if cuda.cuDeviceGet(ctypes.byref(device), device_index) != 0 or cuda.cuDeviceGetName(name, 256, device) != 0:
        return "unknown", driver
    return name.value.decode(errors="replace"), driver


def _runtime(cuda_major: str) -> str:
    cudart = _open(f"libcudart.so.{cuda_major}")
    version = ctypes.c_int()
    if cudart is None or cudart.cudaRuntimeGetVersion(ctypes.byref(version)) != 0:
        return NOT_FOUND
    return cuda_version_text(version.value)


def _cudnn() -> str:
    cudnn = _open("libcudnn.so.9")
    if cudnn is None:
        return NOT_FOUND
    cudnn.cudnnGetVersion.restype = ctypes.c_size_t
    return cudnn_version_text(int(cudnn.cudnnGetVersion()))


def read_cuda_info(build_cuda_version: str, device_index: int = 0) -> CudaInfo:
    """The CUDA this process runs on; ``build_cuda_version`` is onnxruntime's (e.g. '13.0'), which names the
    runtime library it loads."""
    gpu, driver = _driver(device_index)
    major = build_cuda_version.split(".")[0] or "13"
    return CudaInfo(gpu=gpu, driver_cuda=driver, runtime=_runtime(major), cudnn=_cudnn())
