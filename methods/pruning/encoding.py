"""Bytes of sparse encodings (bitmask and CSR) next to dense storage."""

from __future__ import annotations

from typing import Any

import numpy as np

from research.metrics import bitmask_bytes
from research.tree import flatten_with_paths

PyTree = Any


def _index_bytes(n: int) -> int:
    return 1 if n <= 2**8 else 2 if n <= 2**16 else 4


def leaf_sparse_bytes(x: np.ndarray, value_bits: int = 32) -> dict[str, float]:
    """Dense, bitmask and CSR bytes of one array (zeros are the pruned entries).

    * bitmask: one bit per entry plus the non-zero values;
    * CSR over the 2-D view ``(prod(shape[:-1]), shape[-1])``: values, column indices (the
      smallest unsigned width that holds the column count) and ``rows + 1`` int32 row pointers.
    """
    x = np.asarray(x)
    n = int(x.size)
    nnz = int(np.count_nonzero(x))
    vb = value_bits / 8
    cols = int(x.shape[-1]) if x.ndim else 1
    rows = n // max(cols, 1)
    return {
        "dense": n * vb,
        "bitmask": bitmask_bytes(x, value_bits),
        "csr": nnz * (vb + _index_bytes(cols)) + (rows + 1) * 4,
        "nonzeros": nnz,
        "size": n,
    }


def sparse_bytes(params: PyTree, masks: PyTree | None = None, *, value_bits: int = 32) -> dict[str, float]:
    """Total bytes of ``params`` stored dense, as bitmask+values and as CSR.

    Leaves that are not pruned (``None`` in ``masks``, when given) are counted densely in every
    encoding, so the figures compare whole models.

    Returns:
      ``{"dense_bytes", "bitmask_bytes", "csr_bytes", "nonzeros", "params"}``.

    Example:
      >>> import numpy as np
      >>> sparse_bytes({"kernel": np.array([[0.0, 1.0], [0.0, 0.0]])})["bitmask_bytes"]
      5.0
    """
    pruned = None
    if masks is not None:
        pruned = {p for p, m in flatten_with_paths(masks, is_leaf=lambda m: m is None) if m is not None}
    tot = {"dense_bytes": 0.0, "bitmask_bytes": 0.0, "csr_bytes": 0.0, "nonzeros": 0, "params": 0}
    for path, x in flatten_with_paths(params):
        b = leaf_sparse_bytes(x, value_bits)
        dense = pruned is not None and path not in pruned
        tot["dense_bytes"] += b["dense"]
        tot["bitmask_bytes"] += b["dense"] if dense else b["bitmask"]
        tot["csr_bytes"] += b["dense"] if dense else b["csr"]
        tot["nonzeros"] += b["nonzeros"]
        tot["params"] += b["size"]
    return tot
