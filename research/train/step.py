"""Jitted train and eval steps built from pluggable pieces.

``make_train_step(defs, tx, loss_fn, loss_transforms=...)`` returns ``step(state, batch) ->
(state, metrics)``. Methods plug in without copying the loop: a loss transform wraps the loss
(distillation, regularisers) and the optax transformation ``tx`` may wrap any optimizer
(pruning masks, learned quantizer steps ride on ordinary params).
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from research.train.losses import Batch
from research.train.losses import LossFn
from research.train.losses import LossTransform
from research.train.losses import apply_transforms
from research.train.losses import cross_entropy_loss
from research.train.state import ModelDefs
from research.train.state import TrainState
from research.train.state import merge_model

StepFn = Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]

#: Jitted train steps by what their program depends on (see ``make_train_step``'s ``cache_key``),
#: least recently used first. A cached step keeps the first call's optimizer object, whose update
#: function reads every per-run value (learning rate, weight decay, masks) from the optimizer state.
_STEP_CACHE: collections.OrderedDict[Hashable, StepFn] = collections.OrderedDict()
_STEP_CACHE_SIZE = 16


def make_train_step(
    defs: ModelDefs,
    tx: optax.GradientTransformation,
    loss_fn: LossFn = cross_entropy_loss,
    loss_transforms: Sequence[LossTransform] = (),
    *,
    jit: bool = True,
    donate: bool = True,
    log_grad_norm: bool = False,
    cache_key: Hashable | None = None,
) -> StepFn:
    """Builds ``step(state, batch) -> (new_state, metrics)``.

    Args:
      defs: the model graphs from :func:`create_train_state`.
      tx: the optax transformation (wrap it to add gradient transforms, e.g. pruning masks).
      loss_fn: the task loss, ``(model, batch, rng) -> (loss, aux)``.
      loss_transforms: applied to ``loss_fn`` in order (innermost first).
      jit: return the jitted step (default) or the plain function (to vmap or embed).
      donate: donate the input state's buffers to the output (saves memory; the input state
        must not be used after the call).
      log_grad_norm: add the gradients' global norm to the metrics (off by default: an extra
        pass over the gradients; ``python -m experiments.benchmarks.train_overhead`` measures
        its cost).
      cache_key: reuse one jitted step (and so its compiled programs) across calls: steps built
        with equal ``cache_key``, equal model graphs (``defs.train``), the same ``loss_fn`` object
        and the same options are the same function, so a later run of the same shapes compiles
        nothing. The caller vouches that equal keys mean ``tx`` and ``loss_transforms`` build the
        same program: the same transformations with the same constants; values they keep in their
        state (a learning rate injected with ``optax.inject_hyperparams``, masks) may differ.
        :func:`research.train.finetune` builds it from the optimizer settings. ``None`` (default):
        a new jitted function (compiled on its first call). Ignored with ``jit=False``.

    Returns:
      The step function. ``metrics`` holds ``loss`` (``grad_norm`` on request) and every scalar
      in ``aux``.
    """
    key = None
    if jit and cache_key is not None:
        key = (defs.train, loss_fn, cache_key, donate, log_grad_norm)
        try:
            hash(key)
        except TypeError:  # a part that cannot be compared (e.g. a list in a rule): no reuse
            key = None
    if key is not None:
        cached = _STEP_CACHE.get(key)
        if cached is not None:
            _STEP_CACHE.move_to_end(key)
            return cached
    full_loss = apply_transforms(loss_fn, loss_transforms)

    def objective(params, model_state, batch, rng):
        model = merge_model(defs.train, params, model_state)
        loss, aux = full_loss(model, batch, rng)
        new_model_state = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
        return loss, (aux, new_model_state)

    def step(state: TrainState, batch: Batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        (loss, (aux, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params, state.model_state, batch, rng
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss}
        if log_grad_norm:
            metrics["grad_norm"] = optax.global_norm(grads)
        metrics.update({k: v for k, v in aux.items() if jnp.ndim(v) == 0})
        new_state = TrainState(state.step + 1, params, model_state, opt_state, state.rng)
        return new_state, metrics

    if not jit:
        return step
    jitted = jax.jit(step, donate_argnums=(0,) if donate else ())
    if key is not None:
        _STEP_CACHE[key] = jitted
        while len(_STEP_CACHE) > _STEP_CACHE_SIZE:
            _STEP_CACHE.popitem(last=False)
    return jitted


def clear_train_step_cache() -> None:
    """Forgets the jitted train steps kept for ``make_train_step(cache_key=...)`` (and so their
    compiled programs, unless JAX's persistent compilation cache holds them)."""
    _STEP_CACHE.clear()


def make_eval_step(defs: ModelDefs, *, jit: bool = True):
    """Builds ``eval_step(params, model_state, batch) -> sums`` in evaluation mode.

    Returns sums (not means) of ``loss`` and ``correct`` over the rows where ``batch["mask"]``
    is true (all rows when there is no mask), plus ``count``, so padded batches average exactly.
    The jitted step is cached per model graph, so repeated evaluations of the same model
    structure compile once.
    """
    return _jitted_eval_step(defs.eval) if jit else _eval_step_fn(defs.eval)


@functools.lru_cache(maxsize=128)
def _jitted_eval_step(graphdef):
    return jax.jit(_eval_step_fn(graphdef))


def _eval_step_fn(graphdef):

    def eval_step(params, model_state, batch):
        model = merge_model(graphdef, params, model_state)
        logits = model(batch["x"])
        mask = batch.get("mask", jnp.ones(logits.shape[0], bool)).astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        correct = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
        return {"loss": jnp.sum(losses * mask), "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}

    return eval_step


def evaluate(defs: ModelDefs, params, model_state, x, y, *, batch_size: int = 256, eval_step=None) -> dict[str, float]:
    """Mean loss and accuracy of the model on ``(x, y)``."""
    from research.data.batching import eval_batches

    eval_step = eval_step or make_eval_step(defs)
    total = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    # Every split in batches of ``batch_size`` (a short one padded): the test and validation splits of
    # one model share one compiled program.
    sums = [eval_step(params, model_state, b) for b in eval_batches(x, y, batch_size)]
    for s in jax.device_get(sums):
        for k in total:
            total[k] += float(s[k])
    n = max(total["count"], 1.0)
    return {"loss": total["loss"] / n, "accuracy": total["correct"] / n, "count": int(total["count"])}
