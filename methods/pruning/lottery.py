"""Lottery tickets: iterative magnitude pruning (IMP) with rewinding, and its random control.

IMP trains the dense network, prunes the smallest-magnitude weights, **rewinds** the surviving
weights to their values at initialisation (``rewind_step=0``, Frankle & Carbin 2019) or at an
early step ``k`` (Frankle et al. 2020), and retrains, for a list of target sparsities. The
control re-initialises the same masks at random (:func:`random_reinit`) and trains them too.

References:
  Frankle & Carbin, "The Lottery Ticket Hypothesis", https://arxiv.org/abs/1803.03635
  Frankle et al., "Linear Mode Connectivity and the Lottery Ticket Hypothesis",
  https://arxiv.org/abs/1912.05671
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from methods.pruning.masks import SparsityRule
from methods.pruning.masks import apply_masks
from methods.pruning.masks import check_sparsity
from methods.pruning.masks import mask_sparsity
from methods.pruning.scores import magnitude_masks
from methods.pruning.wrapper import MaskedState
from methods.pruning.wrapper import masked
from research.data import BatchSampler
from research.data import Dataset
from research.train import TrainState
from research.train import evaluate
from research.train import fit
from research.train import make_train_step
from research.train import split_model

PyTree = Any


def rewind(params: PyTree, masks: PyTree) -> PyTree:
    """The ticket: ``params`` (from init or step ``k``) with the pruned entries zeroed."""
    return apply_masks(params, masks)


def random_reinit(params: PyTree, masks: PyTree, key: jax.Array) -> PyTree:
    """The control: every masked leaf's initial values randomly permuted, then masked.

    A random permutation of i.i.d. initial values is a fresh draw from the same per-layer
    initialiser, so the control keeps the layer-wise scale but loses the ticket's values.
    """

    def perm(i, m, x):
        if m is None:
            return x
        flat = jnp.ravel(x)
        return jnp.where(m, jax.random.permutation(jax.random.fold_in(key, i), flat).reshape(x.shape), 0.0)

    leaves_m = jax.tree.leaves(masks, is_leaf=lambda m: m is None)
    leaves_x, tdef = jax.tree.flatten(params)
    return jax.tree.unflatten(tdef, [perm(i, m, x) for i, (m, x) in enumerate(zip(leaves_m, leaves_x, strict=False))])


def imp(
    model: nnx.Module,
    dataset: Dataset,
    sparsities: Sequence[float],
    *,
    steps: int,
    learning_rate: float = 1.2e-3,
    batch_size: int = 60,
    rewind_step: int = 0,
    rules: Sequence[SparsityRule] | None = None,
    controls: Sequence[float] = (),
    seed: int = 0,
    progress: bool = False,
) -> list[dict]:
    """Runs IMP with rewinding (and random-reinit controls) and reports test accuracy.

    Args:
      model: the initialised model (its values are the initialisation).
      dataset: data; accuracy is measured on the test split.
      sparsities: increasing target sparsities, one per pruning round.
      steps: training steps per round (the ticket trains ``steps - rewind_step`` from the rewind point).
      learning_rate, batch_size: Adam settings.
      rewind_step: 0 rewinds to initialisation, ``k`` to the weights after step ``k``.
      rules: which leaves are pruned (default every kernel).
      controls: sparsities (from ``sparsities``) at which to also train the random re-init.
      seed: data order and control permutation seed.
      progress: show progress bars.

    Returns:
      Rows ``{"round", "sparsity", "weights_remaining", "kind", "test_accuracy"}`` with kind
      ``"dense"``, ``"ticket"`` or ``"random_reinit"``.

    Raises:
      ValueError: a sparsity outside [0, 1), or sparsities not increasing.
    """
    sparsities = [check_sparsity(s) for s in sparsities]
    if any(b <= a for a, b in zip(sparsities, sparsities[1:], strict=False)):
        raise ValueError(f"sparsities={sparsities} must increase round by round")
    if not 0 <= rewind_step < steps:
        raise ValueError(f"rewind_step={rewind_step} must be in [0, steps={steps})")
    defs, params0, model_state0 = split_model(nnx.clone(model))
    inner = optax.adam(learning_rate)
    first = magnitude_masks(params0, sparsities[0], rules)
    all_kept = jax.tree.map(lambda m: None if m is None else jnp.ones_like(m), first, is_leaf=lambda m: m is None)
    tx = masked(inner, masks=all_kept)
    step_fn = make_train_step(defs, tx, donate=False)
    sampler = BatchSampler(dataset.x_train, dataset.y_train, batch_size=batch_size, seed=seed)
    rng = jax.random.key_data(jax.random.key(seed))

    def train(params, masks, start, num, label):
        state = TrainState(
            jnp.asarray(start, jnp.int32),
            apply_masks(params, masks),
            model_state0,
            MaskedState(jnp.asarray(start, jnp.int32), masks, inner.init(params)),
            rng,
        )
        keep = {}

        def on_step(done, s):
            if done == rewind_step:
                keep["rewind"] = jax.tree.map(jnp.copy, s.params)

        state, _ = fit(
            state,
            step_fn,
            sampler,
            num_steps=start + num,
            log_every=0,
            progress=progress,
            description=label,
            on_step=on_step if rewind_step and start == 0 else None,
        )
        acc = evaluate(defs, state.params, state.model_state, dataset.x_test, dataset.y_test)["accuracy"]
        return state.params, acc, keep.get("rewind")

    rows = []
    trained, acc, rewound = train(params0, all_kept, 0, steps, "dense")
    rewind_params = rewound if rewind_step else params0
    rows.append(
        {
            "round": 0,
            "sparsity": 0.0,
            "weights_remaining": 1.0,
            "kind": "dense",
            "test_accuracy": acc,
        }
    )
    key = jax.random.key(seed + 1000)
    for r, s in enumerate(sparsities, start=1):
        masks = magnitude_masks(trained, s, rules)
        achieved = mask_sparsity(masks)["__global__"]
        trained, acc, _ = train(
            rewind(rewind_params, masks), masks, rewind_step, steps - rewind_step, f"ticket {s:.2f}"
        )
        rows.append(
            {
                "round": r,
                "sparsity": achieved,
                "weights_remaining": 1 - achieved,
                "kind": "ticket",
                "test_accuracy": acc,
            }
        )
        if any(abs(s - c) < 1e-9 for c in controls):
            _, acc_c, _ = train(
                random_reinit(params0, masks, jax.random.fold_in(key, r)),
                masks,
                0,
                steps,
                f"reinit {s:.2f}",
            )
            rows.append(
                {
                    "round": r,
                    "sparsity": achieved,
                    "weights_remaining": 1 - achieved,
                    "kind": "random_reinit",
                    "test_accuracy": acc_c,
                }
            )
    return rows
