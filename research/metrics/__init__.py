"""Model measurements: parameters, non-zeros, bytes, FLOPs (XLA), latency, accuracy and the report columns."""

from research.metrics.cost import flops
from research.metrics.cost import latency
from research.metrics.cost import median_ms
from research.metrics.cost import model_latency
from research.metrics.cost import timings
from research.metrics.counting import bitmask_bytes
from research.metrics.counting import count_nonzeros
from research.metrics.counting import count_params
from research.metrics.counting import model_bytes
from research.metrics.counting import stored_bytes
from research.metrics.evaluation import accuracy
from research.metrics.evaluation import measure

__all__ = [
    "accuracy",
    "bitmask_bytes",
    "count_nonzeros",
    "count_params",
    "flops",
    "latency",
    "measure",
    "median_ms",
    "model_bytes",
    "model_latency",
    "stored_bytes",
    "timings",
]
