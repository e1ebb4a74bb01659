"""Parameters, non-zeros and bytes of a model or a parameter pytree."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx


def _param_leaves(model_or_tree: Any) -> list:
    if isinstance(model_or_tree, nnx.Module):
        model_or_tree = nnx.state(model_or_tree, nnx.Param)
    return [x for x in jax.tree.leaves(model_or_tree) if hasattr(x, "shape")]


def count_params(model_or_tree: Any) -> int:
    """Number of parameter scalars (``nnx.Param`` of a model, or every array leaf of a pytree)."""
    return int(sum(np.prod(x.shape) for x in _param_leaves(model_or_tree)))


def count_nonzeros(model_or_tree: Any) -> int:
    """Number of parameter scalars that are not exactly zero."""
    return int(sum(int(np.count_nonzero(np.asarray(x))) for x in _param_leaves(model_or_tree)))


def stored_bytes(model_or_tree: Any) -> int:
    """Bytes the arrays take as stored, each at its own dtype (``nnx.Param`` of a model, or every
    array leaf of a pytree: pass ``nnx.state(model)`` to count batch statistics too).

    Example:
      >>> stored_bytes({"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float16)})
      30
    """
    return int(sum(int(getattr(x, "nbytes", np.asarray(x).nbytes)) for x in _param_leaves(model_or_tree)))


def bitmask_bytes(x: Any, bits: int | float = 32) -> float:
    """Bytes of one array stored as a bitmask (one bit per entry) plus its non-zeros at ``bits``.

    Example:
      >>> bitmask_bytes(np.array([[0.0, 1.0], [0.0, 0.0]]))
      5.0
    """
    x = np.asarray(x)
    return float(math.ceil(x.size / 8) + np.count_nonzero(x) * bits / 8)


def model_bytes(model_or_tree: Any, bits: int | float = 32) -> float:
    """Bytes of the parameters stored densely at ``bits`` per value.

    Raises:
      ValueError: ``bits`` not positive.
    """
    if bits <= 0:
        raise ValueError(f"bits={bits} must be positive (e.g. 32, 16, 8, 4)")
    return count_params(model_or_tree) * bits / 8.0
