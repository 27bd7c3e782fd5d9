"""The early-exit expert cascade: the decision rule, the compute model and the batch runner, in numpy only.

This is the product's core contract in one place. The service runs it on onnxruntime graphs, the exporter's
parity check runs it on the exported graphs and on the PyTorch checkpoint, and training's evaluation and
accuracy-compute curve replay it on PyTorch outputs computed once. Nothing here imports torch or onnxruntime.
"""

from cascade.cost import CostModel
from cascade.decision import (
    DECISION_RULE,
    Threshold,
    check_max_experts,
    check_threshold,
    continues,
    sigmoid,
)
from cascade.run import CascadeGraphs, CascadeResult, run_cascade, softmax

__all__ = [
    "DECISION_RULE",
    "CascadeGraphs",
    "CascadeResult",
    "CostModel",
    "Threshold",
    "check_max_experts",
    "check_threshold",
    "continues",
    "run_cascade",
    "sigmoid",
    "softmax",
]
