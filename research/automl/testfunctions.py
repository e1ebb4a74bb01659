"""Standard test objectives with known optima (used by tests and benchmarks).

References:
  Surjanovic and Bingham, Virtual Library of Simulation Experiments: Test Functions
  and Datasets (Branin, Hartmann 6-D). https://www.sfu.ca/~ssurjano/optimization.html
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from research.automl.space import Categorical
from research.automl.space import Float
from research.automl.space import Int
from research.automl.space import Space

__all__ = [
    "BRANIN_MIN",
    "CONDITIONAL_MIN",
    "HARTMANN6_MIN",
    "branin",
    "branin_space",
    "conditional",
    "conditional_space",
    "hartmann6",
    "hartmann6_space",
]

BRANIN_MIN = 0.397887357729738
HARTMANN6_MIN = -3.322368011391339
CONDITIONAL_MIN = 0.0


def branin_space() -> Space:
    """``x1 in [-5, 10]``, ``x2 in [0, 15]``."""
    return Space({"x1": Float(-5.0, 10.0), "x2": Float(0.0, 15.0)})


def branin(params: Mapping[str, Any]) -> float:
    """Branin-Hoo function; global minimum 0.397887 at three points."""
    x1, x2 = params["x1"], params["x2"]
    b, c, t = 5.1 / (4 * math.pi**2), 5 / math.pi, 1 / (8 * math.pi)
    return (x2 - b * x1**2 + c * x1 - 6) ** 2 + 10 * (1 - t) * math.cos(x1) + 10


_HA = np.array(
    [[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14], [3, 3.5, 1.7, 10, 17, 8],
     [17, 8, 0.05, 10, 0.1, 14]]
)  # fmt: skip
_HP = 1e-4 * np.array(
    [[1312, 1696, 5569, 124, 8283, 5886], [2329, 4135, 8307, 3736, 1004, 9991],
     [2348, 1451, 3522, 2883, 3047, 6650], [4047, 8828, 8732, 5743, 1091, 381]]
)  # fmt: skip
_HALPHA = np.array([1.0, 1.2, 3.0, 3.2])


def hartmann6_space() -> Space:
    """``x0..x5 in [0, 1]``."""
    return Space({f"x{i}": Float(0.0, 1.0) for i in range(6)})


def hartmann6(params: Mapping[str, Any]) -> float:
    """Hartmann 6-D function; global minimum -3.32237."""
    x = np.array([params[f"x{i}"] for i in range(6)])
    return float(-np.sum(_HALPHA * np.exp(-np.sum(_HA * (x - _HP) ** 2, axis=1))))


def conditional_space() -> Space:
    """A two-level conditional space shaped like a compression-policy search.

    ``method`` picks a branch: ``prune`` (sparsity, schedule; a ``gradual`` schedule adds
    ``steps``), ``quantize`` (bits, log learning rate) or ``none`` (a single knob).
    """
    return Space(
        {
            "method": Categorical(["prune", "quantize", "none"]),
            "sparsity": Float(0.0, 0.99, when={"method": "prune"}),
            "schedule": Categorical(["oneshot", "gradual"], when={"method": "prune"}),
            "steps": Int(1, 64, log=True, when={"schedule": "gradual"}),
            "bits": Int(2, 8, when={"method": "quantize"}),
            "lr": Float(1e-5, 1e-1, log=True, when={"method": "quantize"}),
            "knob": Float(0.0, 1.0, when={"method": "none"}),
        }
    )


def conditional(params: Mapping[str, Any]) -> float:
    """Objective over :func:`conditional_space`; global minimum 0.

    ``prune`` + ``gradual`` reaches 0 at sparsity 0.8 and 16 steps; ``quantize`` is at
    best 0.05 (bits 4, lr 1e-3); ``none`` at best 0.3.
    """
    m = params["method"]
    if m == "prune":
        s = params["sparsity"]
        base = 4.0 * (s - 0.8) ** 2
        if params["schedule"] == "oneshot":
            return base + 0.2
        return base + 0.1 * (math.log2(params["steps"]) - 4.0) ** 2
    if m == "quantize":
        return 0.05 + 0.02 * (params["bits"] - 4) ** 2 + 0.1 * (math.log10(params["lr"]) + 3) ** 2
    return 0.3 + (params["knob"] - 0.5) ** 2
