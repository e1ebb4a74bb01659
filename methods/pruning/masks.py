"""Masks as pytrees: which leaves are pruned, at what sparsity, and applying masks.

A **mask** pytree has the structure of the parameters (a pure nested dict, as in
``TrainState.params``) with a ``bool`` array where a leaf is pruned (``True`` = kept) and
``None`` where it is not pruned. Everything here is a pure function on pytrees, usable under
``jax.jit`` (sparsities may be traced values).

Which leaves are pruned, and how much, is set by :class:`SparsityRule` s matched against the
leaves' path strings (first match wins). The default prunes every ``kernel`` (Linear and Conv
weights) and leaves biases and normalisation scales dense.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from methods.pruning.rules import SparsityRule
from methods.pruning.rules import check_sparsity
from research.train import masking
from research.tree import flatten_with_paths
from research.tree import map_with_paths
from research.tree import match_param_rules

PyTree = Any


DEFAULT_RULES: tuple[SparsityRule, ...] = (SparsityRule(pattern=r"(^|/)kernel$"),)


def leaf_targets(params: PyTree, sparsity: float, rules: Sequence[SparsityRule] | None = None) -> dict[str, float]:
    """The target sparsity of each pruned leaf, by path (leaves that stay dense are left out).

    Args:
      params: the parameter pytree.
      sparsity: the default sparsity for rules whose ``sparsity`` is ``None``.
      rules: ordered :class:`SparsityRule` s (default :data:`DEFAULT_RULES`).

    Raises:
      ValueError: sparsity outside [0, 1).
      research.tree.RuleError: a rule matches no path (the message lists the paths).
    """
    default = check_sparsity(sparsity)
    rules = DEFAULT_RULES if rules is None else tuple(rules)
    leaves = [(p, x) for p, x in flatten_with_paths(params) if x is not None]
    matches = match_param_rules(rules, [p for p, _ in leaves])
    out = {}
    for path, leaf in leaves:
        rule = matches[path]
        if rule is None or np.ndim(leaf) == 0:
            continue
        s = default if rule.sparsity is None else rule.sparsity
        if s > 0.0:
            out[path] = s
    return out


def ones_like_masks(params: PyTree, paths: Sequence[str]) -> PyTree:
    """An all-kept mask for the leaves in ``paths`` (``None`` elsewhere)."""
    keep = set(paths)
    return map_with_paths(lambda p, x: jnp.ones(jnp.shape(x), bool) if p in keep else None, params)


def nonzero_masks(params: PyTree) -> PyTree:
    """Keeps the nonzero entries of every kernel (``ndim >= 2``); ``None`` (not masked) for vectors.

    Used as ``masked(tx, masks=nonzero_masks)`` to fine-tune an already pruned model: its zero
    weights stay zero, while biases and norms (often zero-initialised) still train.
    """
    return jax.tree.map(lambda x: jnp.asarray(x) != 0 if jnp.ndim(x) >= 2 else None, params)


def mask_from_scores(scores: jax.Array, sparsity: jax.Array | float) -> jax.Array:
    """Keeps the highest scores: exactly ``round(sparsity * size)`` entries are pruned.

    Ties are broken by position, so the count is exact even when many scores are equal
    (e.g. weights that are already zero). Works with a traced ``sparsity``. The pruned entries
    are :func:`smallest_k`'s (the same on every platform).
    """
    flat = jnp.ravel(scores)
    k = jnp.round(jnp.asarray(sparsity, jnp.float32) * flat.size).astype(jnp.int32)
    return (~smallest_k(flat, k)).reshape(jnp.shape(scores))


def smallest_k(values: jax.Array, k: jax.Array | int) -> jax.Array:
    """The ``k`` smallest entries of a 1-D array, ties taken by position (earlier first).

    Exactly the entries whose rank in a stable ascending sort is below ``k`` (JAX's sort
    order: ``-0.0`` equals ``0.0``, NaNs last); ``k`` may be traced and is clipped to
    ``[0, size]``. On a CPU it selects instead of sorting (:func:`_smallest_k_by_selection`: 32
    counting passes find the k-th smallest value; XLA's CPU sort of a 784x300 kernel costs about
    20x that); elsewhere one stable ``argsort``. Both give the same entries; integer and float64
    values sort on every platform.

    Example:
      >>> import jax.numpy as jnp
      >>> smallest_k(jnp.array([3.0, 1.0, 1.0, 2.0]), 2).tolist()
      [False, True, True, False]
    """
    values = jnp.ravel(values)
    k = jnp.clip(jnp.asarray(k, jnp.int32), 0, values.size)
    # integers, and float64 (its 64-bit keys would need 64 passes), sort on every platform
    if not jnp.issubdtype(values.dtype, jnp.floating) or values.dtype == jnp.float64 or values.size == 0:
        return _smallest_k_by_sort(values, k)
    return jax.lax.platform_dependent(values, k, cpu=_smallest_k_by_selection, default=_smallest_k_by_sort)


PAIRWISE_RANK_MAX = 32
"""Groups up to this size are ranked by comparing every pair (``m`` x ``m`` comparisons per
group); longer ones by two stable argsorts."""


def ranks_in_groups(values: jax.Array) -> jax.Array:
    """Each entry's rank in a stable ascending sort of its group (the last axis), as ``int32``.

    The same ranks as ``argsort(argsort(values, axis=-1, stable=True), axis=-1, stable=True)``
    (JAX's sort order: ``-0.0`` equals ``0.0``, NaNs last, ties by position). Groups of up to
    :data:`PAIRWISE_RANK_MAX` entries (N:M's 4 or 8) count the smaller and the earlier equal
    entries instead of sorting: an XLA sort of many tiny rows is slow on a CPU (2:4 masks of a
    784x300 kernel: 26 ms sorted, 0.7 ms counted; ``experiments/benchmarks/prune_masks.py``).

    Example:
      >>> import jax.numpy as jnp
      >>> ranks_in_groups(jnp.array([[3.0, 1.0, 1.0, 2.0]])).tolist()
      [[3, 0, 1, 2]]
    """
    m = values.shape[-1]
    if m > PAIRWISE_RANK_MAX or values.dtype == jnp.float64:  # (float64: the uint32 keys would round)
        return jnp.argsort(jnp.argsort(values, axis=-1, stable=True), axis=-1, stable=True).astype(jnp.int32)
    keys = _sort_keys(values) if jnp.issubdtype(values.dtype, jnp.floating) else values
    mine, other = keys[..., :, None], keys[..., None, :]  # [..., i, j]
    earlier = jnp.arange(m)[None, :] < jnp.arange(m)[:, None]  # j before i
    before = (other < mine) | ((other == mine) & earlier)
    return jnp.sum(before, axis=-1, dtype=jnp.int32)


def _smallest_k_by_sort(values: jax.Array, k: jax.Array) -> jax.Array:
    """:func:`smallest_k` by one stable argsort: the first ``k`` positions of the order are taken."""
    order = jnp.argsort(values, stable=True)
    return jnp.zeros(values.shape, bool).at[order].set(jnp.arange(values.size) < k, unique_indices=True)


def _sort_keys(values: jax.Array) -> jax.Array:
    """``uint32`` keys in JAX's float sort order: ``-0.0`` as ``0.0``, every NaN after ``+inf``."""
    x = values.astype(jnp.float32)  # exact for the narrower floats, the order kept
    x = jnp.where(x == 0, jnp.float32(0), x)
    x = jnp.where(jnp.isnan(x), jnp.float32(jnp.nan), x)
    u = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(u >> 31 == 1, ~u, u | jnp.uint32(0x80000000))


def _smallest_k_by_selection(values: jax.Array, k: jax.Array) -> jax.Array:
    """:func:`smallest_k` without a sort: a bisection over the ``uint32`` keys finds the
    k-th smallest key ``t`` (32 passes that count the keys ``<= mid``); the entries below ``t``
    are taken, then the first ``k - #below`` equal to ``t`` by position (floats of at most 32 bits)."""
    keys = _sort_keys(values)

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(keys <= mid, dtype=jnp.int32) >= k
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    t, _ = jax.lax.fori_loop(0, 32, halve, (jnp.uint32(0), jnp.uint32(0xFFFFFFFF)))
    below = keys < t
    tied = keys == t
    quota = k - jnp.sum(below, dtype=jnp.int32)
    return (k > 0) & (below | (tied & (jnp.cumsum(tied, dtype=jnp.int32) <= quota)))


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """Zeroes the pruned entries: ``where(mask, param, 0)`` per leaf; ``None`` masks pass through.

    Example:
      >>> import jax.numpy as jnp
      >>> apply_masks({"w": jnp.array([1.0, 2.0]), "b": jnp.ones(2)},
      ...             {"w": jnp.array([False, True]), "b": None})["w"].tolist()
      [0.0, 2.0]
    """
    return _apply_masks(params, masks)


# One compiled program per tree of shapes, not two per leaf shape when called eagerly (inlined in a jit).
@jax.jit
def _apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    return jax.tree.map(
        lambda m, x: x if m is None else jnp.where(m, x, jnp.zeros_like(x)),
        masks,
        params,
        is_leaf=lambda m: m is None,
    )


def mask_sparsity(masks: PyTree) -> dict[str, float]:
    """Achieved sparsity of each mask leaf, plus ``"__global__"`` over all masked leaves."""
    out, pruned, total = {}, 0, 0
    for path, m in flatten_with_paths(masks):
        m = np.asarray(m)
        out[path] = float(1.0 - m.mean())
        pruned += int(m.size - m.sum())
        total += int(m.size)
    out["__global__"] = pruned / max(total, 1)
    return out


def combine_masks(a: PyTree, b: PyTree) -> PyTree:
    """Logical AND of two mask pytrees (``None`` acts as all-kept); see
    :func:`research.train.masking.combine_masks` (any number of trees)."""
    return masking.combine_masks(a, b)
