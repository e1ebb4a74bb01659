"""Training with fixed masks: the optax wrapper every fine-tuning stage uses to keep earlier zeros.

A mask pytree has the structure of the parameters: a bool array where a leaf is constrained
(``True`` = the weight may train, ``False`` = it stays exactly ``0.0``) and ``None`` where a leaf
is free. :func:`keep_masks` wraps any optax transformation so that training keeps the masked
entries at zero; the masks live in its state (:class:`MaskedState`), so checkpoints carry them.

``methods.pruning.masked`` is the same transformation with a schedule that recomputes the masks
while training; it builds on :func:`mask_grads`, :func:`mask_updates` and :class:`MaskedState` from
here, so the two are one mechanism and :func:`find_masks` reads the masks of either.

Example:
  >>> import jax.numpy as jnp, optax
  >>> tx = keep_masks(optax.sgd(1.0), {"w": jnp.array([True, False]), "b": None})
  >>> params = {"w": jnp.array([1.0, 2.0]), "b": jnp.zeros(2)}
  >>> state = tx.init(params)
  >>> grads = {"w": jnp.ones(2), "b": jnp.ones(2)}
  >>> updates, state = tx.update(grads, state, params)
  >>> optax.apply_updates(params, updates)["w"].tolist()
  [0.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any


class MaskedState(NamedTuple):
    """State of :func:`keep_masks` (and of ``methods.pruning.masked``).

    Attributes:
      count: int32 number of updates done (a pruning schedule's step).
      masks: bool pytree shaped like the params (``None`` for free leaves).
      inner_state: the wrapped optimizer's state.
    """

    count: jax.Array
    masks: PyTree
    inner_state: optax.OptState


def _is_none(x: Any) -> bool:
    return x is None


def mask_updates(updates: PyTree, masks: PyTree, params: PyTree) -> PyTree:
    """``where(mask, update, -param)`` per masked leaf, so applied params are exactly zero when masked.

    ``w + (-w) == 0`` exactly in IEEE arithmetic, so a masked weight is ``0.0`` after
    ``optax.apply_updates`` whatever it was before.
    """
    return jax.tree.map(
        lambda m, u, p: u if m is None else jnp.where(m, u, -p),
        masks,
        updates,
        params,
        is_leaf=_is_none,
    )


def mask_grads(grads: PyTree, masks: PyTree) -> PyTree:
    """Zeroes the gradients of masked entries (before an inner optimizer sees them)."""
    return jax.tree.map(
        lambda m, g: g if m is None else jnp.where(m, g, jnp.zeros_like(g)),
        masks,
        grads,
        is_leaf=_is_none,
    )


def as_bool_masks(masks: PyTree, params: PyTree) -> PyTree:
    """``masks`` as bool arrays aligned with ``params`` (``None`` leaves stay ``None``).

    Raises:
      ValueError: a mask leaf whose shape differs from its parameter's (names the shapes).
    """

    def one(m, p):
        if m is None:
            return None
        m = jnp.asarray(m, bool)
        if m.shape != jnp.shape(p):
            raise ValueError(f"a mask of shape {m.shape} does not fit its parameter of shape {jnp.shape(p)}")
        return m

    return jax.tree.map(one, masks, params, is_leaf=_is_none)


def keep_masks(
    inner: optax.GradientTransformation, masks: PyTree | Callable[[PyTree], PyTree]
) -> optax.GradientTransformation:
    """Wraps ``inner`` so that the masked entries of the parameters stay exactly zero.

    Args:
      inner: any optax transformation (the optimizer, or another wrapper such as a pruning
        schedule's ``methods.pruning.masked``: the result keeps both sets of zeros).
      masks: a pytree shaped like the params (bool arrays; ``None`` for free leaves), or a
        function of the params returning one at ``init``.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`MaskedState`.

    Raises:
      ValueError: ``update`` called without params; a mask that does not fit its parameter.
    """

    def init(params):
        m = as_bool_masks(masks(params) if callable(masks) else masks, params)
        return MaskedState(jnp.zeros((), jnp.int32), m, inner.init(params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("keep_masks() needs params: call tx.update(grads, opt_state, params)")
        inner_updates, inner_state = inner.update(mask_grads(updates, state.masks), state.inner_state, params)
        out = mask_updates(inner_updates, state.masks, params)
        return out, MaskedState(state.count + 1, state.masks, inner_state)

    return optax.GradientTransformation(init, update)


def find_all_masks(opt_state: Any) -> list[PyTree]:
    """Every mask pytree inside an optimizer state (outermost first; chains and nested wrappers searched)."""
    if isinstance(opt_state, MaskedState) or (hasattr(opt_state, "masks") and hasattr(opt_state, "inner_state")):
        return [opt_state.masks, *find_all_masks(opt_state.inner_state)]
    if isinstance(opt_state, (tuple, list)):
        return [m for s in opt_state for m in find_all_masks(s)]
    return []


def find_masks(opt_state: Any) -> PyTree | None:
    """The outermost masks inside an optimizer state (searching chains and nested states), or ``None``."""
    found = find_all_masks(opt_state)
    return found[0] if found else None


def combine_masks(*trees: PyTree) -> PyTree | None:
    """The entries every mask tree keeps (logical AND; a leaf free in all trees stays ``None``)."""
    trees = [t for t in trees if t is not None]
    if not trees:
        return None

    def both(a, b):
        if a is None:
            return b
        if b is None:
            return a
        return jnp.logical_and(a, b)

    out = trees[0]
    for t in trees[1:]:
        out = jax.tree.map(both, out, t, is_leaf=_is_none)
    return out


def freeze(inner: optax.GradientTransformation, paths: tuple[str, ...] | list[str]) -> optax.GradientTransformation:
    """Wraps ``inner`` so the parameters at ``paths`` (``"head/weight_quant/step"``) never change.

    Their gradients are zeroed before ``inner`` sees them and their updates are zero; the state
    is ``inner``'s. Used to keep an earlier stage's trainable quantizer ranges.
    """
    from research.tree import map_with_paths  # pylint: disable=import-outside-toplevel

    frozen = frozenset(paths)

    def zero(tree):
        return map_with_paths(lambda p, x: jnp.zeros_like(x) if p in frozen else x, tree)

    def init(params):
        return inner.init(params)

    def update(updates, state, params=None):
        out, state = inner.update(zero(updates), state, params)
        return zero(out), state

    return optax.GradientTransformation(init, update)
