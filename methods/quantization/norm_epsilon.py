"""Norm epsilon floors for full-integer export: keep the variance a LayerNorm divides by away from 0 on its int8 grid.

A LayerNorm computes ``(x - mean) * rsqrt(var + epsilon)`` per token. In a full-integer file
(TFLite ``int8``, its ONNX Q/DQ file) the tensor ``var + epsilon`` of all tokens shares one int8
grid whose step is its largest value / 255. When the tokens' variances span a wide range (the
pre-norm residual stream of a transformer: quiet tokens next to loud ones), a quiet token's
variance is a few grid steps or less, rounding changes it by tens of percent, and ``rsqrt``
passes half of that relative error to every feature of the token. A tensor-by-tensor comparison of
the attention + GRU zoo model's int8 TFLite file with its float file found this at the first
LayerNorm: the ``rsqrt`` output's relative error was 0.24 on the input with the largest logit
error against 0.04 on ordinary ones (its ``var + epsilon`` grid step 0.09 for variances from
about 0.05 to 23), where the inputs before it were within 3 %.

:func:`int8_norm_epsilon` raises each norm's ``epsilon`` to ``steps`` grid steps of that grid,
``epsilon = max(epsilon, steps * v_max / (2**bits - 1))`` with ``v_max`` the largest per-token
variance (mean square for ``RMSNorm``) of the norm's input on calibration data. The rounding error
of ``var + epsilon`` is then at most ``1 / (2 * steps)`` of its value (10 % at the default 5 steps;
~5 % after ``rsqrt``) for every token. Quiet tokens are normalised less than before, which changes
the float model, so a short fine-tuning follows (any ``train``/``qat``/``kurtosis`` stage, or
``research.train.finetune``); the export compares the file with that fine-tuned float model.

Measured (``python -m experiments.int8_seq.norm_eps``, tables in ``experiments/int8_seq/README.md``):
on the attention + GRU zoo model (MNIST-1D, five init/data-order variations), 5 steps + 300
fine-tuning steps + ``export(..., activation_calibration="percentile")`` gave top-1 agreement of the
int8 TFLite file with JAX 0.9911-0.9950 (ONNX 0.9911-0.9941) against 0.9832-0.9921 for the same
fine-tuning without the floor, at the same test accuracy (0.942 vs 0.941 mean). With the
converter's min/max ranges it was 0.9822-0.9931, and 10 steps left one variation at 0.9891: the
margin over 0.99 is a few inputs in a thousand.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
from flax import nnx

from research import recipe as recipe_lib
from research.nn import get_module
from research.nn import iter_modules
from research.nn import replace_module

#: The norm layers whose ``epsilon`` is raised: ``rsqrt(var + epsilon)`` (LayerNorm) and
#: ``rsqrt(mean(x**2) + epsilon)`` (RMSNorm).
NORMS = (nnx.LayerNorm, nnx.RMSNorm)


class _Recorder(nnx.Module):
    """Runs ``inner`` and records the largest per-token statistic its ``rsqrt`` sees."""

    def __init__(self, inner: nnx.Module, sink: list):
        self.inner = inner
        self.sink = sink

    def __call__(self, x, *args, **kwargs):
        axes = self.inner.reduction_axes
        x32 = jnp.asarray(x, jnp.float32)
        if isinstance(self.inner, nnx.LayerNorm):
            stat = jnp.var(x32, axis=axes)
        else:
            stat = jnp.mean(x32 * x32, axis=axes)
        self.sink.append(float(jnp.max(stat)))
        return self.inner(x, *args, **kwargs)


def norm_statistics(model: nnx.Module, x: Any) -> dict[str, float]:
    """The largest per-token variance (LayerNorm) or mean square (RMSNorm) of each norm's input.

    Runs ``model(x)`` once in eval mode on a copy (``model`` is not changed). A norm called several
    times in the forward pass gets the largest value over its calls.

    Returns:
      ``{module path: value}`` for every ``nnx.LayerNorm``/``nnx.RMSNorm`` the forward pass called.
    """
    probe = nnx.clone(model)
    probe.eval()
    sinks: dict[str, list] = {}
    for path, module in iter_modules(model):
        if isinstance(module, NORMS):
            sinks[path] = []
            probe = replace_module(probe, path, _Recorder(get_module(probe, path), sinks[path]), copy=False)
    probe(jnp.asarray(x))
    return {path: max(values) for path, values in sinks.items() if values}


def int8_norm_epsilon(
    model: nnx.Module, calibration: Any, *, steps: float = 5.0, bits: int = 8
) -> tuple[nnx.Module, dict[str, tuple[float, float]]]:
    """A copy of ``model`` whose norms' ``epsilon`` is at least ``steps`` steps of an int8 grid.

    ``epsilon = max(epsilon, steps * v_max / (2**bits - 1))`` per ``nnx.LayerNorm``/``nnx.RMSNorm``,
    ``v_max`` from :func:`norm_statistics` on ``calibration`` (the inputs a full-integer export is
    calibrated on). Fine-tune the result before exporting it (the module docstring says why).

    Args:
      model: the float model (not changed).
      calibration: a batch of inputs (e.g. the export's calibration set).
      steps: the floor in grid steps (``> 0``); the rounding error of ``var + epsilon`` is at most
        ``1 / (2 * steps)`` of it.
      bits: the activations' bit width (8 for a full-int8 export).

    Returns:
      ``(new model, {path: (old epsilon, new epsilon)})`` for every norm the forward pass called.

    Raises:
      ValueError: ``steps`` not a positive finite number, ``bits`` outside [2, 16], or a model with
        no LayerNorm/RMSNorm (nothing to change; the message says so).

    Example::

        model, changed = int8_norm_epsilon(model, ds.x_train[:256])
        model, _ = finetune(model, ds, workdir=d, steps=300, learning_rate=1e-3, schedule="constant")
        export(model, ..., quantize="int8", calibration=ds.x_train[:256])
    """
    if not (isinstance(steps, (int, float)) and math.isfinite(steps) and steps > 0):
        raise ValueError(f"steps={steps!r} must be a finite number > 0 (5: rounding error <= 10% of var + epsilon)")
    if not (isinstance(bits, int) and 2 <= bits <= 16):
        raise ValueError(f"bits={bits!r} must be an int in [2, 16] (8 for a full-int8 export)")
    stats = norm_statistics(model, calibration)
    if not stats:
        raise ValueError(
            "the model has no nnx.LayerNorm or nnx.RMSNorm called in its forward pass: there is no epsilon to raise"
        )
    changed = {}
    for path, v_max in stats.items():
        old = float(get_module(model, path).epsilon)
        changed[path] = (old, max(old, float(steps) * v_max / (2**bits - 1)))
    return _with_epsilons(model, {path: new for path, (_, new) in changed.items()}), changed


def _with_epsilons(model: nnx.Module, epsilons: dict[str, float]) -> nnx.Module:
    """A copy of ``model`` with the norms at ``epsilons``' paths set to those epsilons."""
    out = nnx.clone(model)
    for path, eps in epsilons.items():
        get_module(out, path).epsilon = float(eps)
    return out


def norm_epsilon_recipe_step(changed: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """The :mod:`research.recipe` step replaying :func:`int8_norm_epsilon` (``{path: (old, new)}``):
    epsilon is a static setting of the norm, so a stored model is rebuilt with it."""
    return recipe_lib.step("norm_epsilon", epsilons={path: float(new) for path, (_, new) in changed.items()})


@recipe_lib.register_step("norm_epsilon")
def _replay_norm_epsilon(model: nnx.Module, data: dict[str, Any]) -> nnx.Module:
    return _with_epsilons(model, data["epsilons"])
