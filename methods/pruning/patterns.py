"""Sparsity patterns: unstructured, N:M (e.g. 2:4) and blocks.

A pattern turns one leaf's scores into a bool mask. ``NM`` keeps the ``n`` highest scores in
every group of ``m`` consecutive entries along ``axis`` (the input/reduction axis by default,
``-2`` for ``(..., in, out)`` kernels, as sparse tensor cores need). ``Block`` ranks
``(rows, cols)`` tiles of the last two axes by their summed score and removes whole tiles.

References:
  Mishra et al., "Accelerating Sparse Deep Neural Networks" (2:4), https://arxiv.org/abs/2104.08378
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from methods.pruning.masks import SparsityRule
from methods.pruning.masks import leaf_targets
from methods.pruning.masks import mask_from_scores
from methods.pruning.masks import ranks_in_groups
from methods.pruning.scores import compute_scores
from research.tree import flatten_with_paths
from research.tree import map_with_paths

PyTree = Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class Unstructured:
    """Any entry may be pruned."""

    def validate(self, shape: tuple[int, ...], path: str) -> None:
        del shape, path

    def mask(self, scores: jax.Array, sparsity) -> jax.Array:
        return mask_from_scores(scores, sparsity)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NM:
    """Keep ``n`` of every ``m`` consecutive entries along ``axis`` (sparsity ``1 - n/m``).

    Raises:
      ValueError: ``n`` not in 1..m-1.
    """

    n: int = 2
    m: int = 4
    axis: int = -2

    def __post_init__(self):
        if not 0 < self.n < self.m:
            raise ValueError(f"N:M pattern needs 0 < n < m, got n={self.n}, m={self.m}")

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def validate(self, shape, path):
        if len(shape) < 2 and self.axis not in (0, -1):
            raise ValueError(f"N:M axis={self.axis} does not exist in {path!r} with shape {shape}")
        size = shape[self.axis]
        if size % self.m:
            raise ValueError(
                f"N:M {self.n}:{self.m} needs axis {self.axis} of {path!r} (shape {tuple(shape)}) to be a "
                f"multiple of m={self.m}, but it is {size}; exclude that leaf with "
                f"SparsityRule(pattern=..., sparsity=0.0) or pick another m/axis"
            )

    def mask(self, scores, sparsity=None):
        del sparsity  # fixed by n and m
        x = jnp.moveaxis(scores, self.axis, -1)
        shp = x.shape
        g = x.reshape(*shp[:-1], shp[-1] // self.m, self.m)
        ranks = ranks_in_groups(-g)
        keep = (ranks < self.n).reshape(shp)
        return jnp.moveaxis(keep, -1, self.axis)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Block:
    """Remove whole ``block`` = ``(rows, cols)`` tiles of the last two axes, lowest summed score first."""

    block: tuple[int, int] = (4, 4)

    def validate(self, shape, path):
        if len(shape) < 2:
            raise ValueError(f"block pattern needs a leaf with >= 2 dims; {path!r} has shape {tuple(shape)}")
        r, c = self.block
        if shape[-2] % r or shape[-1] % c:
            raise ValueError(
                f"block {self.block} does not tile the last two axes {tuple(shape[-2:])} of {path!r}; "
                "pick a block that divides them or exclude the leaf with SparsityRule(sparsity=0.0)"
            )

    def mask(self, scores, sparsity):
        r, c = self.block
        *lead, h, w = scores.shape
        t = scores.reshape(*lead, h // r, r, w // c, c)
        bscore = jnp.sum(t, axis=(-3, -1))
        bkeep = mask_from_scores(bscore, sparsity)
        keep = jnp.broadcast_to(bkeep[..., :, None, :, None], t.shape)
        return keep.reshape(scores.shape)


Pattern = Unstructured | NM | Block


def pattern_masks(
    params: PyTree,
    pattern: Pattern,
    sparsity: float | None = None,
    rules: Sequence[SparsityRule] | None = None,
    *,
    scorer: str = "magnitude",
    grads: PyTree | None = None,
    key: jax.Array | None = None,
) -> PyTree:
    """Masks with a sparsity pattern for every leaf the rules select.

    Args:
      params: parameter pytree.
      pattern: :class:`Unstructured`, :class:`NM` or :class:`Block`.
      sparsity: target (ignored by N:M, which is ``1 - n/m``; defaults to that for N:M).
      rules: which leaves (default: every kernel).
      scorer: registered score used to rank entries.

    Raises:
      ValueError: a leaf whose shape the pattern cannot tile (the message names the leaf).

    Example:
      >>> import jax.numpy as jnp
      >>> m = pattern_masks({"kernel": jnp.arange(8.0).reshape(4, 2)}, NM(n=2, m=4))
      >>> m["kernel"].sum(axis=0).tolist()
      [2, 2]
    """
    if sparsity is None:
        if not isinstance(pattern, NM):
            raise ValueError(f"sparsity is required for pattern {pattern}")
        sparsity = pattern.sparsity
    targets = leaf_targets(params, sparsity, rules)
    leaves = dict(flatten_with_paths(params))
    for p in targets:
        pattern.validate(tuple(jnp.shape(leaves[p])), p)
    scores = compute_scores(scorer, params, list(targets), grads, key)
    keep = {p: pattern.mask(s, targets[p]) for p, s in scores.items()}
    return map_with_paths(lambda p, x: keep.get(p), params)


def nm_masks(params: PyTree, n: int = 2, m: int = 4, rules=None, *, axis: int = -2) -> PyTree:
    """N:M magnitude masks (2:4 by default) along ``axis`` of every selected leaf."""
    pat = NM(n=n, m=m, axis=axis)
    return pattern_masks(params, pat, pat.sparsity, rules)


def block_masks(params: PyTree, sparsity: float, block=(4, 4), rules=None) -> PyTree:
    """Block-sparse magnitude masks: whole ``block`` tiles removed to reach ``sparsity``."""
    return pattern_masks(params, Block(block=tuple(block)), sparsity, rules)
