"""Train state for an NNX model and an optax optimizer, held as plain pytrees.

The model is split once into a static ``graphdef`` and two pure nested dicts: ``params``
(``nnx.Param`` leaves) and ``model_state`` (everything else: BatchNorm statistics, dropout
RNG counters). Pure dicts are what every method transforms: masks have the same structure as
``params``, rules match their path strings, orbax saves them, and ``jax.vmap`` stacks them.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import optax
from flax import nnx

PyTree = Any


class TrainState(NamedTuple):
    """Everything that changes during training; a pytree.

    Attributes:
      step: scalar int32, the number of optimizer steps taken.
      params: pure nested dict of ``nnx.Param`` values.
      model_state: pure nested dict of the model's other variables.
      opt_state: the optax state.
      rng: raw ``uint32[2]`` key data; the step's key is ``fold_in(rng, step)``.
    """

    step: jax.Array
    params: PyTree
    model_state: PyTree
    opt_state: PyTree
    rng: jax.Array


class ModelDefs(NamedTuple):
    """The static halves of a model: its graph in training and in evaluation mode."""

    train: nnx.GraphDef
    eval: nnx.GraphDef


def split_model(model: nnx.Module) -> tuple[ModelDefs, PyTree, PyTree]:
    """Splits ``model`` into ``(defs, params, model_state)`` (pure dicts).

    The model is left in evaluation mode afterwards.
    """
    model.train()
    g_train, params, rest = nnx.split(model, nnx.Param, ...)
    model.eval()
    g_eval = nnx.graphdef(model)
    return ModelDefs(g_train, g_eval), nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def merge_model(graphdef: nnx.GraphDef, params: PyTree, model_state: PyTree) -> nnx.Module:
    """Rebuilds the NNX module from its graphdef and pure-dict states."""
    return nnx.merge(graphdef, params, model_state)


def create_train_state(
    model: nnx.Module, tx: optax.GradientTransformation, *, seed: int = 0
) -> tuple[ModelDefs, TrainState]:
    """Splits ``model`` and initialises the optimizer.

    Returns:
      ``(defs, state)`` where ``defs.train`` / ``defs.eval`` are the static graphs.
    """
    defs, params, model_state = split_model(model)
    # Own buffers: the train step donates its input state, and the model's arrays may be shared
    # with other models (nnx.clone shares immutable arrays), e.g. a distillation teacher. A device
    # copy (device_put, may_alias=False) compiles nothing; jnp.copy compiled one program per shape.
    params, model_state = jax.tree.map(lambda a: jax.device_put(a, may_alias=False), (params, model_state))
    state = TrainState(
        step=jax.numpy.zeros((), jax.numpy.int32),
        params=params,
        model_state=model_state,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )
    return defs, state


def state_to_model(defs: ModelDefs, state: TrainState, *, train: bool = False) -> nnx.Module:
    """The NNX model holding ``state``'s parameters (in eval mode unless ``train``)."""
    return merge_model(defs.train if train else defs.eval, state.params, state.model_state)
