"""Call tracing and BatchNorm folding.

**How conv -> BN pairs are found.** Module attribute names and registration order say nothing
reliable about data flow (ResNet's ``proj_conv`` sits next to ``conv1``; VGG keeps convs and
BNs in two separate lists). Instead the model is run once, eagerly, on a sample input with
every Linear, Conv and BatchNorm wrapped by a recorder that logs the identity of the array
each one receives and returns. A BatchNorm is paired with the Conv/Linear whose *output
array object* is the BatchNorm's input, provided no other recorded layer consumed that array.
The model runs under ``jax.eval_shape`` (abstract values: nothing is computed or
compiled), so tracing is cheap. The same trace gives the layers' execution order (used to skip the first/last layer).

Folding (BN in inference mode, statistics ``mean``/``var``, affine ``gamma``/``beta``)::

    w' = w * gamma / sqrt(var + eps)            (per output channel, the kernel's last axis)
    b' = (b - mean) * gamma / sqrt(var + eps) + beta

The BN is replaced by :class:`~methods.quantization.modules.Identity`. With ``check=True`` the
folded model is compared with the original (both in eval mode) on the sample input and on a
random input, so a pair that a non-module op also consumed cannot go unnoticed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from methods.quantization.modules import Identity
from methods.quantization.modules import QuantLayer
from research import recipe as recipe_lib
from research.nn import iter_modules
from research.nn import replace_module

_TRACED_TYPES = (nnx.Linear, nnx.Conv, nnx.BatchNorm, QuantLayer)
_LOG: list[CallRecord] | None = None


@dataclasses.dataclass(frozen=True)
class CallRecord:
    """One recorded layer call: path, module type, identities of its input and output arrays."""

    path: str
    module_type: type
    input_id: int
    output_id: int


class _Recorder(nnx.Module):
    def __init__(self, inner: nnx.Module, path: str):
        self.inner = inner
        self.path = path

    def __call__(self, x, *args, **kwargs):
        y = self.inner(x, *args, **kwargs)
        if _LOG is not None:
            _KEEP.extend([x, y])  # keep the arrays alive so their ids stay unique
            _LOG.append(CallRecord(self.path, type(self.inner), id(x), id(y)))
        return y


_KEEP: list[Any] = []


def sample_input_for(model: nnx.Module, sample_input: Any = None) -> jax.Array:
    """A one-example input for tracing: ``sample_input`` or zeros of ``model.input_shape``.

    Raises:
      ValueError: when neither is available.
    """
    if sample_input is not None:
        return jnp.asarray(sample_input)
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise ValueError(
            f"{type(model).__name__} has no input_shape attribute; pass sample_input=<one batch "
            "of inputs> (e.g. dataset.x_train[:2])"
        )
    return jnp.zeros((2, *shape), jnp.float32)


def _outside_quant_layers(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    mods = iter_modules(model)
    quant_paths = [p for p, m in mods if isinstance(m, QuantLayer)]
    return [
        (p, m) for p, m in mods if isinstance(m, _TRACED_TYPES) and not any(p.startswith(q + "/") for q in quant_paths)
    ]


def trace_calls(model: nnx.Module, sample_input: Any = None) -> list[CallRecord]:
    """Runs ``model`` (a copy, eval mode) once and records every Linear/Conv/BatchNorm call.

    Args:
      model: the model.
      sample_input: an input batch (default: zeros of ``model.input_shape``).

    Returns:
      The calls in execution order.
    """
    global _LOG
    x = sample_input_for(model, sample_input)
    traced = nnx.clone(model)
    traced.eval()
    targets = _outside_quant_layers(traced)
    targets.sort(key=lambda pm: -pm[0].count("/"))
    for path, module in targets:
        traced = replace_module(traced, path, _Recorder(module, path), copy=False)
    _LOG = []
    try:
        # abstract evaluation: tracer identities, no computation and no compilation
        jax.eval_shape(lambda inp: traced(inp), x)
        return list(_LOG)
    finally:
        _LOG = None
        _KEEP.clear()


def layer_order(model: nnx.Module, sample_input: Any = None) -> list[str]:
    """Paths of the Linear/Conv layers (float or fake-quant) in execution order."""
    return [r.path for r in trace_calls(model, sample_input) if not issubclass(r.module_type, nnx.BatchNorm)]


def find_conv_bn_pairs(model: nnx.Module, sample_input: Any = None) -> list[tuple[str, str]]:
    """``(layer_path, batchnorm_path)`` pairs where the BN consumes only that layer's output."""
    calls = trace_calls(model, sample_input)
    producers = {r.output_id: r.path for r in calls if issubclass(r.module_type, (nnx.Linear, nnx.Conv))}
    consumers: dict[int, int] = {}
    for r in calls:
        consumers[r.input_id] = consumers.get(r.input_id, 0) + 1
    pairs = []
    for r in calls:
        if issubclass(r.module_type, nnx.BatchNorm) and r.input_id in producers:
            if consumers[r.input_id] == 1:
                pairs.append((producers[r.input_id], r.path))
    return pairs


def apply_jit(model: nnx.Module, x: Any) -> jax.Array:
    """``model(x)`` (eval mode, on a copy) through one jitted function."""
    model = nnx.clone(model)
    model.eval()
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, inp: nnx.merge(graphdef, s)(inp))(state, jnp.asarray(x))


def _fold_one(layer: nnx.Module, bn: nnx.BatchNorm) -> nnx.Module:
    if bn.axis != -1:
        raise ValueError(f"BatchNorm axis={bn.axis} is not the channel axis -1; cannot fold it")
    mean, var = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
    gamma = np.asarray(bn.scale[...]) if bn.scale is not None else np.ones_like(mean)
    beta = np.asarray(bn.bias[...]) if bn.bias is not None else np.zeros_like(mean)
    factor = gamma / np.sqrt(var + bn.epsilon)
    kernel = np.asarray(layer.kernel[...])
    bias = np.asarray(layer.bias[...]) if layer.bias is not None else np.zeros_like(mean)
    new = nnx.clone(layer)
    new.kernel.set_value(jnp.asarray(kernel * factor, kernel.dtype))
    new_bias = jnp.asarray((bias - mean) * factor + beta, kernel.dtype)
    if new.bias is None:
        new.bias = nnx.data(nnx.Param(new_bias))
        new.use_bias = True
    else:
        new.bias.set_value(new_bias)
    return new


def fold_batchnorm(
    model: nnx.Module,
    sample_input: Any = None,
    *,
    check: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> nnx.Module:
    """Folds every BatchNorm that directly follows a Conv/Linear into that layer.

    Args:
      model: the model (left untouched).
      sample_input: an input batch for tracing (default: zeros of ``model.input_shape``).
      check: compare the folded model's outputs with the original's (eval mode).
      atol: absolute tolerance of the check.
      rtol: relative tolerance of the check (relative to the largest output magnitude).

    Returns:
      A new model in eval mode with folded layers and :class:`Identity` where the BNs were.

    Raises:
      ValueError: the model already holds fake-quant layers (fold first, then quantize), or
        the check fails.

    Example:
      >>> from research.nn import build_model
      >>> m = build_model("resnet20", input_shape=(8, 8, 1), num_classes=10, rngs=nnx.Rngs(0))
      >>> folded = fold_batchnorm(m)
    """
    if any(isinstance(m, QuantLayer) for _, m in iter_modules(model)):
        raise ValueError(
            "fold_batchnorm must run before quantize_model (the model already has fake-quant "
            "layers); fold the float model, then quantize it"
        )
    x = sample_input_for(model, sample_input)
    pairs = find_conv_bn_pairs(model, x)
    out = nnx.clone(model)
    out.eval()
    for layer_path, bn_path in pairs:
        from research.nn import get_module

        folded = _fold_one(get_module(out, layer_path), get_module(out, bn_path))
        out = replace_module(out, layer_path, folded, copy=False)
        out = replace_module(out, bn_path, Identity(), copy=False)
    if check and pairs:
        xr = jax.random.uniform(jax.random.key(0), x.shape, x.dtype)
        both = jnp.concatenate([x, xr])
        a, b = np.asarray(apply_jit(model, both)), np.asarray(apply_jit(out, both))
        tol = atol + rtol * float(np.max(np.abs(a)))
        err = float(np.max(np.abs(a - b)))
        if err > tol:
            raise ValueError(
                f"BatchNorm folding changed the outputs by {err:.3g} > {tol:.3g}; a folded "
                f"layer's output is probably also used elsewhere. Pairs: {pairs}. Pass "
                "check=False only if you accept this"
            )
    return out


def fold_recipe_step(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """The :mod:`research.recipe` step replaying the folding of ``pairs`` (layer path, BN path)."""
    return recipe_lib.step("fold_batchnorm", pairs=[[a, b] for a, b in pairs])


@recipe_lib.register_step("fold_batchnorm")
def _replay_fold(model: nnx.Module, data: dict[str, Any]) -> nnx.Module:
    from research.nn import get_module

    out = nnx.clone(model)
    out.eval()
    for layer_path, bn_path in data["pairs"]:
        folded = _fold_one(get_module(out, layer_path), get_module(out, bn_path))
        out = replace_module(out, layer_path, folded, copy=False)
        out = replace_module(out, bn_path, Identity(), copy=False)
    return out
