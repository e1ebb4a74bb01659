"""Dynamic sparse training: SET and RigL as optax wrappers.

The network starts sparse (random masks at the target sparsity, ``erk`` or ``layerwise``
allocation) and every ``update_every`` steps until ``end_step`` each layer drops the
``k = f(t) * active`` active weights of lowest magnitude and grows ``k`` inactive ones, so the
sparsity stays exact. ``f(t) = drop_fraction / 2 * (1 + cos(pi * t / end_step))`` (cosine decay).
SET grows at random, RigL where the dense gradient is largest. Grown weights start at zero and
their optimizer state (every state leaf shaped like the params, e.g. Adam's moments) is reset.

References:
  Mocanu et al., "Scalable training of ANNs with adaptive sparse connectivity" (SET),
  https://arxiv.org/abs/1707.04780
  Evci et al., "Rigging the Lottery: Making All Tickets Winners" (RigL),
  https://arxiv.org/abs/1911.11134
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

import methods.pruning.names as _names
from methods.pruning.masks import SparsityRule
from methods.pruning.masks import leaf_targets
from methods.pruning.masks import smallest_k
from methods.pruning.scores import allocate
from methods.pruning.wrapper import mask_grads
from methods.pruning.wrapper import mask_updates
from research.registry import Registry
from research.tree import flatten_with_paths
from research.tree import map_with_paths

PyTree = Any
GrowFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

# Created (with the built-in names declared) in the standard-library names module, so configs are checked before JAX.
GROW: Registry[GrowFn] = _names.GROW


def register_grow(name: str) -> Callable[[GrowFn], GrowFn]:
    """Registers a grow criterion ``fn(weight, dense_grad, key) -> scores`` (higher grows first).

    Raises:
      DuplicateNameError: another function is registered as ``name`` (a ``ValueError``).
    """
    return GROW.register(name)


@register_grow("set")
def _grow_random(weight, grad, key):
    del grad
    return jax.random.uniform(key, weight.shape)


@register_grow("rigl")
def _grow_gradient(weight, grad, key):
    del key
    return jnp.abs(grad)


def list_grow_methods() -> list[str]:
    """Registered grow criteria (the ``method`` of :func:`dynamic_sparse`)."""
    return GROW.names()


class DynamicSparseState(NamedTuple):
    """State of :func:`dynamic_sparse`: counter, masks, the inner optimizer state."""

    count: jax.Array
    masks: PyTree
    inner_state: optax.OptState


def cosine_drop_fraction(step, drop_fraction: float, end_step: int) -> jax.Array:
    """``drop_fraction / 2 * (1 + cos(pi * step / end_step))``, 0 after ``end_step``."""
    t = jnp.clip(jnp.asarray(step, jnp.float32) / max(end_step, 1), 0.0, 1.0)
    return jnp.where(jnp.asarray(step) <= end_step, drop_fraction / 2 * (1 + jnp.cos(jnp.pi * t)), 0.0)


def _largest_k(x, k):
    """The ``k`` largest entries of ``x`` (ties by position), as :func:`smallest_k` of ``-x``."""
    return smallest_k(-jnp.ravel(x), k).reshape(x.shape)


def drop_and_grow(mask, weight, grow_scores, fraction):
    """One layer's update: drop the ``k`` smallest active ``|w|``, grow the ``k`` best inactive.

    Returns:
      ``(new_mask, grown)`` where ``grown`` marks entries that were inactive and are now active.
    """
    n_active = jnp.sum(mask)
    n_inactive = mask.size - n_active
    k = jnp.minimum(jnp.floor(fraction * n_active).astype(jnp.int32), n_inactive)
    dropped = mask & _largest_k(jnp.where(mask, -jnp.abs(weight), -jnp.inf), k)  # smallest |w| first
    grown = (~mask) & _largest_k(jnp.where(mask, -jnp.inf, grow_scores), k)  # excludes dropped (were active)
    return (mask & ~dropped) | grown, grown


def reset_where(inner_state: PyTree, grown: PyTree, params: PyTree) -> PyTree:
    """Zeroes, in every state subtree shaped like ``params``, the entries marked in ``grown``.

    ``grown`` is a dense bool pytree with the structure of ``params``.
    """
    pstruct = jax.tree.structure(params)
    shapes = [jnp.shape(x) for x in jax.tree.leaves(params)]

    def like_params(node):
        try:
            if jax.tree.structure(node) != pstruct:
                return False
        except Exception:  # noqa: BLE001 - non-pytree nodes are simply not param-shaped
            return False
        return [jnp.shape(x) for x in jax.tree.leaves(node)] == shapes

    def fix(node):
        if not like_params(node):
            return node
        return jax.tree.map(lambda s, g: jnp.where(g, jnp.zeros_like(s), s), node, grown)

    return jax.tree.map(fix, inner_state, is_leaf=like_params)


def dynamic_sparse(
    inner: optax.GradientTransformation,
    sparsity: float,
    *,
    method: str = "rigl",
    update_every: int = 100,
    end_step: int = 1000,
    drop_fraction: float = 0.3,
    rules: Sequence[SparsityRule] | None = None,
    allocation: str = "erk",
    seed: int = 0,
) -> optax.GradientTransformation:
    """SET/RigL training at a fixed sparsity.

    Args:
      inner: the optimizer.
      sparsity: overall target sparsity in [0, 1).
      method: ``"set"`` or ``"rigl"`` (see :func:`list_grow_methods`).
      update_every: steps between connectivity updates.
      end_step: no updates after this step; the drop fraction decays to 0 by then.
      drop_fraction: initial fraction of active weights replaced per update.
      rules: which leaves are sparse.
      allocation: ``erk`` (RigL's default) or ``layerwise`` for the initial random masks.
      seed: key for the initial masks and SET's random growth.

    Returns:
      An optax transformation with :class:`DynamicSparseState`.

    Raises:
      UnknownNameError: unknown ``method`` (a ``KeyError`` naming the registered ones).
    """
    grow_fn = GROW.get(method)
    base = jax.random.key(seed)

    def init(params):
        targets = leaf_targets(params, sparsity, rules)
        leaves = dict(flatten_with_paths(params))
        scores = {
            p: jax.random.uniform(jax.random.fold_in(base, i), jnp.shape(leaves[p]))
            for i, p in enumerate(sorted(targets))
        }
        keep = allocate(scores, targets, allocation) if scores else {}
        masks = map_with_paths(lambda p, x: keep.get(p), params)
        return DynamicSparseState(jnp.zeros((), jnp.int32), masks, inner.init(params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("dynamic_sparse() needs params: call tx.update(grads, opt_state, params)")
        count = state.count
        is_update = (count > 0) & (count % update_every == 0) & (count <= end_step)
        frac = cosine_drop_fraction(count, drop_fraction, end_step)
        key = jax.random.fold_in(base, count + 1)

        def regrow():
            new, grown = {}, {}
            flat_m = dict(flatten_with_paths(state.masks))
            flat_w = dict(flatten_with_paths(params))
            flat_g = dict(flatten_with_paths(updates))
            for i, p in enumerate(sorted(flat_m)):
                gs = grow_fn(flat_w[p], flat_g[p], jax.random.fold_in(key, i))
                new[p], grown[p] = drop_and_grow(flat_m[p], flat_w[p], gs, frac)
            masks = map_with_paths(lambda p, x: new.get(p), params)
            grown_tree = map_with_paths(lambda p, x: grown.get(p, jnp.zeros(jnp.shape(x), bool)), params)
            return masks, grown_tree

        def keep():
            return state.masks, jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), bool), params)

        masks, grown = jax.lax.cond(is_update, regrow, keep)
        inner_state = reset_where(state.inner_state, grown, params)
        grads = mask_grads(updates, masks)
        inner_updates, inner_state = inner.update(grads, inner_state, params)
        # Grown weights start from zero: their update is relative to the (zero) current value.
        out = mask_updates(inner_updates, masks, params)
        return out, DynamicSparseState(count + 1, masks, inner_state)

    return optax.GradientTransformation(init, update)
