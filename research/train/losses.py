"""Task losses and the loss-transform protocol.

A **loss function** has the signature ``loss_fn(model, batch, rng) -> (loss, aux)`` where
``model`` is the NNX module (already merged, in training mode), ``batch`` a dict with at least
``x`` and ``y``, ``rng`` a PRNG key for stochastic losses, and ``aux`` a dict that must hold the
model's ``"logits"`` so transforms can reuse them without a second forward pass.

A **loss transform** maps a loss function to a new loss function (KD, hint losses,
regularisers); transforms stack with :func:`compose`.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class BatchLoss:
    """Loss transforms that read one run's values from its batches instead of closing over them.

    A KD loss with a cached teacher closes over the teacher's outputs and its temperature and
    weights: constants of the compiled step, so two runs that differ in them compile twice and
    cannot train as one vmapped program. The same loss written as a :class:`BatchLoss` reads them
    from the batch: ``constants`` join every batch (``batch["kd"]["temperature"]``), and ``rows``
    are tables with one row per training example (the teacher's logits) of which each batch gets
    the rows ``batch["index"]`` names. Runs whose :attr:`key` agree then run one program with
    their values as data (:mod:`research.population` stacks them on the trial axis).

    Attributes:
      transforms: the loss transforms; their values come only from the batch.
      constants: ``{name: pytree of scalars or arrays}`` added to every batch.
      rows: ``{name: pytree of arrays with the training set's rows first}``; a batch gets
        ``tree[batch["index"]]`` under ``name``.
      key: hashable; everything the transforms bake into the program (term names, static options,
        the tables' shapes and dtypes). Runs with equal keys share one compiled step.
    """

    transforms: tuple[LossTransform, ...]
    constants: dict[str, Any]
    rows: dict[str, Any]
    key: Any

    def extend(self, batch: Batch) -> Batch:
        """``batch`` with this run's constants and its rows at ``batch["index"]`` added (what a
        population's program builds on the device for each trial).

        Raises:
          KeyError: ``rows`` are given but the batch has no ``"index"`` (the fix is named).
        """
        if self.rows and "index" not in batch:
            raise KeyError(
                f"the batch has keys {sorted(batch)} but this loss reads rows by batch['index']; "
                "sample with an indexed sampler (methods.distillation.IndexedBatchSampler)"
            )
        out = {**batch, **self.constants}
        if self.rows:
            idx = batch["index"]
            out.update(jax.tree.map(lambda table: jnp.take(jnp.asarray(table), idx, axis=0), self.rows))
        return out
