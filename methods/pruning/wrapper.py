"""An optax wrapper that trains with pruning masks kept in its state.

``masked(inner, schedule)`` wraps any optax transformation. Its state holds the step counter,
the masks (a pytree shaped like the parameters, ``None`` where a leaf is not pruned) and the
inner optimizer's state. On the schedule's update steps it recomputes the masks from the
current parameters (and gradients, for gradient-based scores). Every update is
``where(mask, inner_update, -param)``, so after ``optax.apply_updates`` a pruned weight is
exactly ``0.0`` (``w + (-w) == 0`` in IEEE arithmetic); gradients of pruned weights are zeroed
before the inner optimizer sees them. Since the masks live in the optimizer state, checkpoints
of the train state carry them and a restored run keeps pruning where it stopped.

With fixed masks and no schedule this is :func:`research.train.masking.keep_masks`, the wrapper
every later fine-tuning stage uses to keep a pruned model's zeros (one mechanism: the state type,
the update rule and :func:`find_masks` are shared).

Example:
  >>> import jax, optax, jax.numpy as jnp
  >>> from methods.pruning import masked, one_shot_schedule
  >>> tx = masked(optax.sgd(0.1), one_shot_schedule(0.5))
  >>> params = {"kernel": jnp.arange(1.0, 5.0), "bias": jnp.ones(2)}
  >>> state = tx.init(params)
  >>> updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  >>> optax.apply_updates(params, updates)["kernel"].tolist()
  [0.0, 0.0, 3.0, 4.0]
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from methods.pruning.masks import SparsityRule
from methods.pruning.masks import leaf_targets
from methods.pruning.masks import ones_like_masks
from methods.pruning.patterns import Pattern
from methods.pruning.patterns import Unstructured
from methods.pruning.schedules import Schedule
from methods.pruning.scores import allocate
from methods.pruning.scores import compute_scores
from methods.pruning.scores import get_scorer
from research.train.masking import MaskedState
from research.train.masking import find_masks
from research.train.masking import keep_masks
from research.train.masking import mask_grads
from research.train.masking import mask_updates
from research.tree import flatten_with_paths
from research.tree import map_with_paths

PyTree = Any


def _is_none(x):
    return x is None


def _inverse(sparsity: float) -> np.float32:
    """``1 / sparsity`` in float32 arithmetic (as XLA folds a division by the constant), 0 for 0."""
    return np.float32(1.0) / np.float32(sparsity) if sparsity > 0 else np.float32(0.0)


class PruningState(NamedTuple):
    """State of :func:`masked` with a schedule: :class:`~research.train.masking.MaskedState`'s fields
    plus the run's targets as values, so one compiled step serves every target sparsity.

    Attributes:
      count: int32 number of updates done (the schedule's step).
      masks: bool pytree shaped like the params (``None`` for dense leaves).
      inner_state: the wrapped optimizer's state.
      targets: float32 scalars shaped like the params: each pruned leaf's final sparsity (its
        rule's, else the schedule's), ``None`` for dense leaves.
      inverse: float32, ``1 / final_sparsity`` rounded to float32 (0 when it is 0).
      schedule: the schedule's ``values()`` as float32 scalars.
    """

    count: jax.Array
    masks: PyTree
    inner_state: optax.OptState
    targets: PyTree
    inverse: jax.Array
    schedule: dict[str, jax.Array]


def masked(
    inner: optax.GradientTransformation,
    schedule: Schedule | None = None,
    *,
    rules: Sequence[SparsityRule] | None = None,
    scorer: str = "magnitude",
    allocation: str = "layerwise",
    pattern: Pattern | None = None,
    masks: PyTree | Callable[[PyTree], PyTree] | None = None,
    seed: int = 0,
) -> optax.GradientTransformation:
    """Wraps ``inner`` so training keeps pruned weights at exactly zero.

    Args:
      inner: any optax transformation (the optimizer).
      schedule: when and how much to prune (see :mod:`methods.pruning.schedules`); ``None``
        keeps the given ``masks`` fixed (e.g. a lottery ticket).
      rules: which leaves are pruned and their final sparsity (default: every kernel).
      scorer: a registered score (``magnitude``, ``random``, ``saliency`` ...). Gradient-based
        scores use the gradients the wrapper receives.
      allocation: ``layerwise``, ``global`` or ``erk`` (unstructured pattern only).
      pattern: :class:`~methods.pruning.patterns.Unstructured` (default), ``NM`` or ``Block``.
      masks: initial masks (pytree shaped like the params with ``None`` for dense leaves), or a
        function of the params that returns them at ``init`` (e.g.
        :func:`~methods.pruning.masks.nonzero_masks`: a pruned model's zeros stay zero).
      seed: key for random scores.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`PruningState` (a
      :class:`MaskedState` without a schedule). The targets (the schedule's and the rules'
      sparsities) are values in that state, so wrappers that differ only in them compile to one
      program (:func:`~methods.pruning.schedules.program_key` names what the update bakes in).

    Raises:
      ValueError: neither ``schedule`` nor ``masks`` given; ``update`` called without params.
    """
    if schedule is None and masks is None:
        raise ValueError("masked() needs a schedule (to compute masks) or fixed masks=...; pass one")
    if schedule is None:
        return keep_masks(inner, masks)
    pattern = pattern or Unstructured()
    scorer_obj = get_scorer(scorer)

    def init(params):
        # Shapes are static: a leaf the pattern cannot tile is named here, not as a reshape error
        # inside the jitted update.
        shapes = dict(flatten_with_paths(params))
        for p in leaf_targets(params, schedule.final_sparsity, rules):
            pattern.validate(tuple(jnp.shape(shapes[p])), p)
        if masks is not None:
            m = jax.tree.map(
                lambda mk, p: None if mk is None else jnp.asarray(mk, bool),
                masks(params) if callable(masks) else masks,
                params,
                is_leaf=_is_none,
            )
        final = leaf_targets(params, schedule.final_sparsity, rules)
        if masks is None:
            m = ones_like_masks(params, final)
        return PruningState(
            jnp.zeros((), jnp.int32),
            m,
            inner.init(params),
            map_with_paths(lambda p, _: jnp.float32(final[p]) if p in final else None, params),
            jnp.float32(_inverse(schedule.final_sparsity)),
            {k: jnp.float32(v) for k, v in schedule.values().items()},
        )

    def recompute(params, grads, state):
        # The numbers that were constants of the program, as values: the same float32 arithmetic.
        # XLA compiled `now / final_sparsity` as `now * (1 / final_sparsity)` (the reciprocal of
        # the float32 constant); the product with the stored reciprocal is that, bit for bit.
        final = {p: t for p, t in flatten_with_paths(state.targets, is_leaf=_is_none) if t is not None}
        now = schedule.sparsity(state.count, state.schedule)
        scale = now * state.inverse if schedule.final_sparsity > 0 else 0.0
        targets = {p: t * scale for p, t in final.items()}
        count = state.count
        key = jax.random.fold_in(jax.random.key(seed), count)
        scores = compute_scores(scorer_obj, params, list(targets), grads if scorer_obj.needs_grad else None, key)
        if isinstance(pattern, Unstructured):
            keep = allocate(scores, targets, allocation)
        else:
            keep = {p: pattern.mask(s, targets[p]) for p, s in scores.items()}
        return map_with_paths(lambda p, x: keep.get(p), params)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("masked() needs params: call tx.update(grads, opt_state, params)")
        new_masks = jax.lax.cond(
            schedule.is_update_step(state.count),
            lambda: recompute(params, updates, state),
            lambda: state.masks,
        )
        grads = mask_grads(updates, new_masks)
        inner_updates, inner_state = inner.update(grads, state.inner_state, params)
        out = mask_updates(inner_updates, new_masks, params)
        return out, state._replace(count=state.count + 1, masks=new_masks, inner_state=inner_state)

    return optax.GradientTransformation(init, update)


__all__ = ["MaskedState", "PruningState", "find_masks", "mask_grads", "mask_updates", "masked"]
