"""Task losses and the loss-transform protocol.

A **loss function** has the signature ``loss_fn(model, batch, rng) -> (loss, aux)`` where
``model`` is the NNX module (already merged, in training mode), ``batch`` a dict with at least
``x`` and ``y``, ``rng`` a PRNG key for stochastic losses, and ``aux`` a dict that must hold the
model's ``"logits"`` so transforms can reuse them without a second forward pass.

A **loss transform** maps a loss function to a new loss function (KD, hint losses,
regularisers); transforms stack with :func:`compose`.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

Batch = dict[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch, jax.Array], tuple[jax.Array, dict[str, Any]]]
LossTransform = Callable[[LossFn], LossFn]


def cross_entropy_loss(model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
    """Softmax cross-entropy on integer labels; ``aux`` holds logits and accuracy."""
    del rng
    logits = model(batch["x"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["y"])
    return loss, {"logits": logits, "accuracy": accuracy}


def l2_regularizer(weight: float, pattern: str = r"kernel$") -> LossTransform:
    """A loss transform adding ``weight * sum(w**2)`` over parameters whose path matches ``pattern``."""
    import re

    from research.tree.paths import flatten_with_paths

    def transform(loss_fn: LossFn) -> LossFn:
        def new_loss(model, batch, rng):
            loss, aux = loss_fn(model, batch, rng)
            params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
            reg = sum(jnp.sum(jnp.square(w)) for p, w in flatten_with_paths(params) if re.search(pattern, p))
            aux = {**aux, "l2": reg}
            return loss + weight * reg, aux

        return new_loss

    return transform


def compose(*transforms: LossTransform) -> LossTransform:
    """Composes loss transforms; the first listed is applied first (innermost)."""

    def transform(loss_fn: LossFn) -> LossFn:
        for t in transforms:
            loss_fn = t(loss_fn)
        return loss_fn

    return transform


def apply_transforms(loss_fn: LossFn, transforms: Sequence[LossTransform]) -> LossFn:
    """``compose(*transforms)(loss_fn)``."""
    return compose(*transforms)(loss_fn)
