"""onnxruntime's execution providers as the graphs of a model folder run on them: the CPU, and CUDA with its
options set deliberately. The service serves with these and ``python -m export verify --provider cuda`` checks
parity with the same ones."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True)
class CudaOptions:
    """The CUDA provider's options, each set deliberately rather than left to onnxruntime's defaults.

    - ``tf32`` off: TF32 matmuls and convolutions keep 10 mantissa bits, which moves fp32 logits by about 1e-3,
      ten times the 1e-4 the export's parity check holds the graphs to, and can flip routing decisions near the
      threshold.
    - ``conv_algo_search`` heuristic: onnxruntime's default, an exhaustive benchmark of every cuDNN algorithm for
      every convolution and input shape, makes the first run of each warm-up batch size slow enough to outlast a
      health check's start period on large experts; cuDNN's heuristic picks without timing.
    - ``arena_extend_strategy`` same-as-requested: the memory arena grows by what a batch needs, not to the next
      power of two (a few fixed batch shapes are served, so rounding up would only hold memory idle).
    """

    tf32: bool = False
    conv_algo_search: Literal["heuristic", "exhaustive", "default"] = "heuristic"
    arena_extend_strategy: Literal["same_as_requested", "next_power_of_two"] = "same_as_requested"

    def provider_options(self) -> dict[str, str]:
        """The options as onnxruntime's CUDAExecutionProvider reads them."""
        return {
            "use_tf32": "1" if self.tf32 else "0",
            "cudnn_conv_algo_search": self.conv_algo_search.upper(),
            "arena_extend_strategy": {"same_as_requested": "kSameAsRequested", "next_power_of_two": "kNextPowerOfTwo"}[
                self.arena_extend_strategy
            ],
        }


ProviderEntry = str | tuple[str, dict[str, str]]


def provider_entries(providers: Sequence[str], cuda: CudaOptions) -> list[ProviderEntry]:
    """``providers`` as an onnxruntime session takes them, CUDA with its options."""
    return [(name, cuda.provider_options()) if name == CUDA else name for name in providers]
