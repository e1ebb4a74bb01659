"""Compression methods built on ``research``: pruning, distillation, decomposition, quantization.

Importing this package registers every method's stage (``prune``, ``distill``, ``decompose``,
``quantize``, ``qat``, ...) with ``research.stages`` so configs can name them.
"""

from methods import decomposition
from methods import distillation
from methods import nas
from methods import pruning
from methods import quantization

__all__ = [
    "decomposition",
    "distillation",
    "nas",
    "pruning",
    "quantization",
]
