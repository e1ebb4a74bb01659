"""Importance scores and allocation of sparsity across layers.

A **scorer** maps ``(weight, grad, key) -> scores`` (same shape as ``weight``); larger scores
are kept. Scorers are registered with :func:`register_scorer` (duplicates refused) and listed by
:func:`list_scorers`. An **allocation** decides how many entries each layer loses:

* ``"layerwise"``: each leaf loses its own target fraction (from the rules);
* ``"global"``: one ranking over all pruned leaves (the per-rule sparsities are ignored; the
  global target is the size-weighted mean of the leaf targets);
* ``"erk"``: Erdős–Rényi-Kernel densities (denser small layers), Evci et al. 2020.

References:
  Han et al., "Learning both Weights and Connections", https://arxiv.org/abs/1506.02626
  Lee et al., "SNIP: Single-shot Network Pruning", https://arxiv.org/abs/1810.02340
  Evci et al., "Rigging the Lottery", https://arxiv.org/abs/1911.11134
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

import methods.pruning.names as _names
from methods.pruning.masks import SparsityRule
from methods.pruning.masks import leaf_targets
from methods.pruning.masks import mask_from_scores
from research.registry import Registry
from research.registry import same_definition
from research.tree import flatten_with_paths
from research.tree import map_with_paths

PyTree = Any
ScoreFn = Callable[[jax.Array, jax.Array | None, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Scorer:
    """A registered importance score.

    Attributes:
      name: registry name.
      fn: ``(weight, grad, key) -> scores``.
      needs_grad: whether ``grad`` must be given.
    """

    name: str
    fn: ScoreFn
    needs_grad: bool = False


# Created (with the built-in names declared) in the standard-library names module, so configs are checked before JAX.
SCORERS: Registry[Scorer] = _names.SCORERS


def register_scorer(name: str, *, needs_grad: bool = False) -> Callable[[ScoreFn], ScoreFn]:
    """Registers ``fn(weight, grad, key) -> scores`` under ``name``.

    Registering the same function again (a re-run notebook cell) is a no-op.

    Raises:
      DuplicateNameError: another scorer is registered as ``name`` (a ``ValueError``).
    """

    def deco(fn: ScoreFn) -> ScoreFn:
        old = SCORERS.loaded(name)
        same = old is not None and same_definition(old.fn, fn) and old.needs_grad == needs_grad
        SCORERS.register(name, Scorer(name, fn, needs_grad), replace=same)
        return fn

    return deco


def list_scorers() -> list[str]:
    """Registered scorer names."""
    return SCORERS.names()


def get_scorer(name: str | Scorer) -> Scorer:
    """The scorer registered under ``name``.

    Raises:
      UnknownNameError: unknown name (a ``KeyError`` naming the closest and all registered ones).
    """
    if isinstance(name, Scorer):
        return name
    return SCORERS.get(name)


@register_scorer("magnitude")
def magnitude_score(weight, grad, key):
    """``|w|`` (Han et al. 2015)."""
    del grad, key
    return jnp.abs(weight)


@register_scorer("random")
def random_score(weight, grad, key):
    """Uniform random scores (the random-pruning baseline)."""
    del grad
    return jax.random.uniform(key, jnp.shape(weight))


@register_scorer("saliency", needs_grad=True)
def saliency_score(weight, grad, key):
    """First-order saliency ``|w * g|`` (SNIP's connection sensitivity, Lee et al. 2019)."""
    del key
    return jnp.abs(weight * grad)


def compute_scores(
    scorer: str | Scorer,
    params: PyTree,
    paths: Sequence[str],
    grads: PyTree | None = None,
    key: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Scores of the leaves in ``paths``.

    Raises:
      ValueError: the scorer needs gradients and ``grads`` is None.
    """
    scorer = get_scorer(scorer)
    if scorer.needs_grad and grads is None:
        raise ValueError(f"scorer {scorer.name!r} needs gradients; pass grads=(the loss gradients)")
    key = jax.random.key(0) if key is None else key
    wanted = set(paths)
    leaves = dict(flatten_with_paths(params))
    gleaves = dict(flatten_with_paths(grads)) if grads is not None else {}
    out = {}
    for i, path in enumerate(sorted(wanted)):
        out[path] = scorer.fn(leaves[path], gleaves.get(path), jax.random.fold_in(key, i))
    return out


def erk_densities(
    shapes: dict[str, tuple[int, ...]], density: jax.Array | float, *, power: float = 1.0
) -> dict[str, jax.Array]:
    """Erdős–Rényi-Kernel densities with overall ``density`` (traceable).

    Each layer's density is ``eps * sum(shape) / prod(shape)`` (raised to ``power``), with layers
    that would exceed 1 made dense and ``eps`` re-solved, so the total number of kept weights
    equals ``density * total``.
    """
    names = list(shapes)
    n = jnp.array([float(math.prod(shapes[k])) for k in names])
    raw = jnp.array([(sum(shapes[k]) / float(math.prod(shapes[k]))) ** power for k in names])
    target = jnp.asarray(density, jnp.float32) * n.sum()
    dense = jnp.zeros(len(names), bool)
    for _ in range(len(names)):
        budget = target - jnp.sum(jnp.where(dense, n, 0.0))
        eps = budget / jnp.maximum(jnp.sum(jnp.where(dense, 0.0, raw * n)), 1e-12)
        dense = dense | (eps * raw > 1.0)
    d = jnp.where(dense, 1.0, jnp.clip(eps * raw, 0.0, 1.0))
    return dict(zip(names, d, strict=False))


def allocate(
    scores: dict[str, jax.Array],
    targets: dict[str, jax.Array | float],
    allocation: str = "layerwise",
) -> dict[str, jax.Array]:
    """Turns scores into bool masks (True = kept) with the given allocation.

    Args:
      scores: per-leaf scores by path.
      targets: per-leaf target sparsity by path (may be traced).
      allocation: ``"layerwise"``, ``"global"`` or ``"erk"``.

    Raises:
      ValueError: unknown allocation.
    """
    if allocation not in _ALLOCATIONS:
        raise ValueError(f"allocation={allocation!r} is not one of {sorted(_ALLOCATIONS)}")
    return _ALLOCATIONS[allocation](scores, targets)


def _layerwise(scores, targets):
    return {p: mask_from_scores(s, targets[p]) for p, s in scores.items()}


def _global(scores, targets):
    paths = sorted(scores)
    sizes = [scores[p].size for p in paths]
    total = sum(sizes)
    sparsity = sum(jnp.asarray(targets[p], jnp.float32) * n for p, n in zip(paths, sizes, strict=False)) / total
    flat = jnp.concatenate([jnp.ravel(scores[p]).astype(jnp.float32) for p in paths])
    keep = mask_from_scores(flat, sparsity)
    out, start = {}, 0
    for p, n in zip(paths, sizes, strict=False):
        out[p] = keep[start : start + n].reshape(scores[p].shape)
        start += n
    return out


def _erk(scores, targets):
    paths = sorted(scores)
    sizes = {p: scores[p].size for p in paths}
    total = sum(sizes.values())
    sparsity = sum(jnp.asarray(targets[p], jnp.float32) * sizes[p] for p in paths) / total
    dens = erk_densities({p: tuple(scores[p].shape) for p in paths}, 1.0 - sparsity)
    return {p: mask_from_scores(scores[p], 1.0 - dens[p]) for p in paths}


_ALLOCATIONS = {"layerwise": _layerwise, "global": _global, "erk": _erk}


def compute_masks(
    params: PyTree,
    sparsity: float,
    *,
    scorer: str | Scorer = "magnitude",
    rules: Sequence[SparsityRule] | None = None,
    allocation: str = "layerwise",
    grads: PyTree | None = None,
    key: jax.Array | None = None,
) -> PyTree:
    """Masks (True = kept, ``None`` = not pruned) for a target sparsity.

    Args:
      params: parameter pytree (pure dict).
      sparsity: default target in [0, 1) for rules without their own sparsity.
      scorer: a registered scorer name (see :func:`list_scorers`).
      rules: :class:`SparsityRule` s; default prunes every ``kernel``.
      allocation: ``"layerwise"``, ``"global"`` or ``"erk"``.
      grads: gradients (for gradient-based scorers).
      key: PRNG key (for the random scorer).

    Returns:
      A mask pytree shaped like ``params``.
    """
    targets = leaf_targets(params, sparsity, rules)
    scores = compute_scores(scorer, params, list(targets), grads, key)
    keep = allocate(scores, targets, allocation) if scores else {}
    return map_with_paths(lambda p, x: keep.get(p), params)


def magnitude_masks(
    params: PyTree,
    sparsity: float,
    rules: Sequence[SparsityRule] | None = None,
    *,
    allocation: str = "layerwise",
) -> PyTree:
    """Magnitude-pruning masks: keep the largest ``|w|`` of each pruned leaf.

    Example:
      >>> import jax.numpy as jnp
      >>> m = magnitude_masks({"kernel": jnp.array([[0.1, -2.0], [0.5, 3.0]])}, 0.5)
      >>> m["kernel"].tolist()
      [[False, True], [False, True]]
    """
    return compute_masks(params, sparsity, scorer="magnitude", rules=rules, allocation=allocation)


def random_masks(params, sparsity, rules=None, *, key: jax.Array, allocation: str = "layerwise"):
    """Random masks with the same per-leaf sparsity as magnitude masks would have."""
    return compute_masks(params, sparsity, scorer="random", rules=rules, allocation=allocation, key=key)


def saliency_masks(params, grads, sparsity, rules=None, *, allocation: str = "layerwise"):
    """Masks keeping the largest ``|w * g|``."""
    return compute_masks(params, sparsity, scorer="saliency", rules=rules, allocation=allocation, grads=grads)


def snip_masks(
    model,
    batch: dict,
    sparsity: float,
    rules: Sequence[SparsityRule] | None = None,
    *,
    loss_fn=None,
    allocation: str = "global",
) -> PyTree:
    """SNIP: prune at initialisation by connection sensitivity ``|w * dL/dw|`` on one batch.

    Args:
      model: the (freshly initialised) NNX model.
      batch: ``{"x", "y"}`` for the loss.
      sparsity: target sparsity.
      rules: which leaves to prune.
      loss_fn: ``(model, batch, rng) -> (loss, aux)`` (default cross-entropy).
      allocation: SNIP ranks globally (default).

    References:
      Lee et al., "SNIP: Single-shot Network Pruning based on Connection Sensitivity",
      https://arxiv.org/abs/1810.02340
    """
    from research.train import cross_entropy_loss
    from research.train import merge_model
    from research.train import split_model

    loss_fn = loss_fn or cross_entropy_loss
    defs, params, model_state = split_model(model)

    def loss(p):
        return loss_fn(merge_model(defs.train, p, model_state), batch, jax.random.key(0))[0]

    grads = jax.jit(jax.grad(loss))(params)  # eager grad would compile every op separately
    return saliency_masks(params, grads, sparsity, rules, allocation=allocation)
