"""Activation-kurtosis regularisation: fine-tune a model so a full-integer export rounds it with less error.

A full-integer conversion (TFLite ``int8``, its ONNX Q/DQ file) gives every activation tensor one
int8 grid. A heavy-tailed tensor (a few values far out, most near the mean: kurtosis well above a
Gaussian's 3) stretches that grid over its tails, and the bulk of its values get few levels.
Fine-tuning with a penalty on each activation's excess kurtosis pulls the tails in, so the same
int8 grid is finer where the values are. The penalty is

    mean over activation tensors t of max(kurtosis(t) - target, 0),   kurtosis = E[(t - mu)^4] / var^2

computed per tensor over all its elements (batch included), as a per-tensor int8 grid sees it.

**Which tensors.** :func:`activations` traces the model to a jaxpr and evaluates it equation by
equation: every floating tensor an equation computes from the input (not from the weights alone)
is an activation, the tensors a full-integer file stores on an int8 grid: projections, LayerNorm
statistics and outputs, attention scores, gates, hidden states. Calls (``jit``, ``closed_call``,
``remat``) are looked into; custom-derivative functions (``jax.nn.softmax``, ``relu``...) and loops
(``scan``, ``while``) count as one operation whose outputs are activations (their gradients keep
their own rules). Operations that move values without changing them (reshape, transpose, slices,
broadcasts, concatenation, dtype casts) are skipped: their output shares the grid of their input.
The trace happens once per compilation of the training step; the compiled step computes the
model's forward pass and the moments of the activations, stacked by size so that tensors of one
size share each reduction.

**Use.** :func:`kurtosis_regularizer` is a loss transform (:mod:`research.train.losses`) for any
fine-tuning; :class:`~methods.quantization.KurtosisStage` (``kind="kurtosis"``) fine-tunes a float
model with it before a full-int8 export, and ``QATStage(kurtosis_weight=...)`` adds it to QAT.

Measured (``python -m experiments.int8_seq.kurtosis``, tables in ``experiments/int8_seq/README.md``):
on the attention + GRU zoo model (MNIST-1D, five init/data-order variations), 300 fine-tuning steps
with weight 0.01 against the same steps without it lower the full-int8 TFLite file's median
max-logit error on every variation (with percentile ranges 0.384/0.319/0.303/0.378/0.447 ->
0.305/0.301/0.275/0.333/0.345) and raise its mean top-1 agreement with JAX from 0.9873 to 0.9905,
but per variation agreement moves within the spread between fine-tunings (0.986-0.996; over three
more variations it went down on two), so 0.99 is not reached on every variation; test accuracy
drops 0-1.3 points. A penalised step costs about
5-6x a plain one on that model (217 activations; ``python -m experiments.benchmarks.kurtosis_step``).

References:
  Shkolnik, Chmiel et al., "Robust Quantization: One Model to Rule Them All" (KURE, a kurtosis
  penalty on weights), https://arxiv.org/abs/2002.07686
  Bondarenko, Nagel & Blankevoort, "Quantizable Transformers: Removing Outliers by Helping
  Attention Heads Do Nothing" (activation outliers of transformers), https://arxiv.org/abs/2306.12929
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.extend import core as jcore

from research.train.losses import LossFn
from research.train.losses import LossTransform

#: Call primitives whose body is evaluated equation by equation (``pjit`` is ``jit``'s name in
#: older JAX releases).
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "remat", "checkpoint", "remat2"})

#: Primitives whose output holds its input's values (moved, not computed): a full-integer file
#: keeps them on their input's grid, so they are not counted again.
SAME_GRID = frozenset(
    {
        "reshape",
        "transpose",
        "squeeze",
        "expand_dims",
        "broadcast_in_dim",
        "convert_element_type",
        "copy",
        "copy_p",
        "slice",
        "dynamic_slice",
        "concatenate",
        "split",
        "pad",
        "rev",
        "select_n",
        "stop_gradient",
        "optimization_barrier",
    }
)

#: Added to ``var**2`` in the kurtosis' denominator (a constant tensor has kurtosis 0, not NaN).
EPS = 1e-12


def _call_body(eqn) -> tuple[Any, tuple] | None:
    for key in ("jaxpr", "call_jaxpr"):
        body = eqn.params.get(key)
        if body is not None:
            return (body.jaxpr, tuple(body.consts)) if hasattr(body, "jaxpr") else (body, ())
    return None


def _bind(eqn, invals):
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = ()
    if isinstance(params, tuple):  # JAX releases before 0.7 return (subfuns, params)
        subfuns, params = params
    ctx = getattr(eqn, "ctx", None)
    manager = getattr(ctx, "manager", None) if ctx is not None else None
    if manager is not None:
        with manager:
            out = eqn.primitive.bind(*subfuns, *invals, **params)
    else:
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return out if eqn.primitive.multiple_results else [out]


def _evaluate(jaxpr, consts, args, active, found: list, min_size: int, scope: str, perturb=None) -> list:
    """Evaluates ``jaxpr`` equation by equation, appending ``(name, tensor)`` of each activation to
    ``found``; ``perturb(name, tensor) -> tensor``, when given, replaces each activation by its
    result before later equations read it (:mod:`methods.quantization.noise`)."""
    env: dict = {}
    live: set = set()

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v] = c
    for v, a, on in zip(jaxpr.invars, args, active, strict=True):
        env[v] = a
        if on:
            live.add(v)
    for i, eqn in enumerate(jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        dep = [not isinstance(v, jcore.Literal) and v in live for v in eqn.invars]
        name = eqn.primitive.name
        body = _call_body(eqn) if name in _CALLS and any(dep) else None
        if body is not None:
            inner, inner_consts = body
            n = len(inner.invars)
            outs = _evaluate(
                inner, inner_consts, invals[-n:], dep[-n:], found, min_size, f"{scope}{i}:{name}/", perturb
            )
        else:
            outs = _bind(eqn, invals)
        for v, val in zip(eqn.outvars, outs, strict=True):
            env[v] = val
            if not any(dep):
                continue
            live.add(v)
            if (
                body is None
                and name not in SAME_GRID
                and jnp.issubdtype(jnp.result_type(val), jnp.floating)
                and math.prod(jnp.shape(val)) >= min_size
            ):
                if perturb is not None:
                    val = env[v] = perturb(f"{scope}{i}:{name}", val)
                found.append((f"{scope}{i}:{name}", val))
    return [read(v) for v in jaxpr.outvars]


def activations(model: nnx.Module, x: jax.Array, *, min_size: int = 2) -> tuple[Any, list[tuple[str, jax.Array]]]:
    """Runs ``model(x)`` equation by equation and returns its output and every activation tensor.

    Works inside ``jax.grad``/``jax.jit`` (the model's weights may be tracers): the tensors are
    the traced values, so a loss built from them differentiates back to the weights.

    Args:
      model: an NNX module called as ``model(x)`` (its variables are read, never updated here).
      x: the input batch.
      min_size: tensors with fewer elements are skipped (a kurtosis needs a distribution).

    Returns:
      ``(output, [(name, tensor), ...])`` in execution order; ``name`` is ``"<equation>:<primitive>"``
      with the enclosing calls' equations as a prefix (``"3:jit/12:add"``).

    Raises:
      ValueError: ``min_size`` below 2.
    """
    _check_min_size(min_size)
    return run_activations(model, x, min_size=int(min_size))


def run_activations(model: nnx.Module, x: jax.Array, *, min_size: int = 2, perturb=None):
    """:func:`activations` with an optional ``perturb(name, tensor) -> tensor`` applied to each
    activation (and to the input, named ``"input"``) before the equations after it read it; the
    returned tensors are the perturbed ones."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)

    def call(leaves, x):
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))(x)

    def spec(a):
        return jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))

    closed, out_shapes = jax.make_jaxpr(call, return_shape=True)(jax.tree.map(spec, leaves), spec(x))
    found: list = []
    if perturb is not None:
        x = perturb("input", x)
    outs = _evaluate(
        closed.jaxpr, closed.consts, [*leaves, x], [False] * len(leaves) + [True], found, int(min_size), "", perturb
    )
    return jax.tree.unflatten(jax.tree.structure(out_shapes), outs), found


def kurtosis(t: jax.Array) -> jax.Array:
    """``E[(t - mean)^4] / var(t)^2`` over all of ``t``'s elements, in float32 (3 for a Gaussian)."""
    return kurtoses([t])[0]


def activation_kurtosis(model: nnx.Module, x: jax.Array, *, min_size: int = 2) -> dict[str, jax.Array]:
    """The kurtosis of every activation of ``model(x)`` (:func:`activations`), by name.

    Compiled (``jax.jit``): the equation-by-equation evaluation runs once, at trace time.
    """
    names: list[str] = []
    graphdef, state = nnx.split(model)

    def measure(state, x):
        _, acts = activations(nnx.merge(graphdef, state), x, min_size=min_size)
        names.extend(name for name, _ in acts)
        return kurtoses([t for _, t in acts]) if acts else jnp.zeros((0,), jnp.float32)

    values = jax.jit(measure)(state, x)
    return {name: values[i] for i, name in enumerate(names)}


def _check_min_size(min_size: int) -> None:
    if int(min_size) < 2:
        raise ValueError(f"min_size={min_size}: a kurtosis needs at least 2 values per tensor; pass min_size >= 2")


def _check(weight: float, target: float) -> None:
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
        raise ValueError(f"kurtosis weight={weight!r} must be a finite number >= 0 (0 turns the penalty off)")
    if not (isinstance(target, (int, float)) and math.isfinite(target) and target >= 1):
        raise ValueError(
            f"kurtosis target={target!r} must be a finite number >= 1 (every distribution's kurtosis is >= 1; "
            "3 is a Gaussian's)"
        )


def kurtosis_penalty(model: nnx.Module, x: jax.Array, *, target: float = 3.0, min_size: int = 2) -> jax.Array:
    """``mean over activations of max(kurtosis - target, 0)`` of ``model(x)`` (0 when it has none).

    Compiled (``jax.jit``); differentiable with respect to the model's variables when called
    inside ``jax.grad`` (e.g. through ``nnx.split``/``nnx.merge``).

    Raises:
      ValueError: ``target`` below 1 or not finite; ``min_size`` below 2.
    """
    _check(0.0, target)
    graphdef, state = nnx.split(model)

    def measure(state, x):
        _, acts = activations(nnx.merge(graphdef, state), x, min_size=min_size)
        return _penalty([t for _, t in acts], target)

    return jax.jit(measure)(state, x)


def kurtoses(tensors: list) -> jax.Array:
    """:func:`kurtosis` of each tensor, in order, as one vector.

    Tensors of the same size are stacked and reduced together (one reduction per size instead of
    one per tensor): the compiled step runs a few large kernels rather than hundreds of small ones.
    """
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(math.prod(jnp.shape(t)), []).append(i)
    out = [None] * len(tensors)
    for idx in groups.values():
        stacked = jnp.stack([jnp.ravel(tensors[i]).astype(jnp.float32) for i in idx])
        c = stacked - jnp.mean(stacked, axis=1, keepdims=True)
        c2 = c * c
        var = jnp.mean(c2, axis=1)
        k = jnp.mean(c2 * c2, axis=1) / (var * var + EPS)
        for j, i in enumerate(idx):
            out[i] = k[j]
    return jnp.stack(out)


def _penalty(tensors: list, target: float) -> jax.Array:
    if not tensors:
        return jnp.zeros((), jnp.float32)
    return jnp.mean(jnp.maximum(kurtoses(tensors) - target, 0.0))


def kurtosis_regularizer(
    weight: float, *, target: float = 3.0, min_size: int = 2, input_key: str = "x"
) -> LossTransform:
    """A loss transform adding ``weight * kurtosis_penalty(model, batch[input_key])`` to the loss.

    The penalty's value (unweighted) goes into ``aux["kurtosis_penalty"]``, so the training loop
    logs it. ``weight=0`` returns the loss function unchanged (the same object).

    Args:
      weight: the penalty's weight (``>= 0``; 0.01 on the attention + GRU zoo model).
      target: the kurtosis above which a tensor is penalised (3: a Gaussian's).
      min_size: tensors with fewer elements are not counted.
      input_key: the batch entry the model is called on.

    Returns:
      ``transform(loss_fn) -> loss_fn``.

    Raises:
      ValueError: a negative or non-finite ``weight``, a ``target`` below 1, ``min_size`` below 2.

    Example::

        from research.train import finetune
        trained = finetune(model, ds, workdir=d, steps=300, learning_rate=1e-3,
                           loss_transforms=[kurtosis_regularizer(0.01)])
    """
    _check(weight, target)
    _check_min_size(min_size)

    def transform(loss_fn: LossFn) -> LossFn:
        if weight == 0:
            return loss_fn

        def new_loss(model, batch, rng):
            loss, aux = loss_fn(model, batch, rng)
            _, acts = activations(model, batch[input_key], min_size=min_size)
            penalty = _penalty([t for _, t in acts], target)
            return loss + weight * penalty, {**aux, "kurtosis_penalty": penalty}

        return new_loss

    return transform
