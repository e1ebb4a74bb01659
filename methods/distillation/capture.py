"""Capturing intermediate outputs by path, in the same forward pass, without hooks.

A thin adapter over Flax NNX's ``nnx.capture`` (flax >= 0.12.8): with
``method_outputs=nnx.Intermediate`` NNX sows the output of every sub-module's ``__call__``
while the wrapped function runs, and values a model ``sow``-s itself are collected too. This
module turns that NNX state into a flat ``{path: array}`` dict for the paths you name:

* ``"layers/0"`` is the output of the sub-module at that path (``research.nn.iter_modules``
  paths), ``""`` the model's own output;
* ``"encoder/feat"`` is a value the module at ``"encoder"`` sowed as
  ``self.sow(nnx.Intermediate, "feat", x)``.

The capture is Python-level (NNX instruments the module classes while the function runs and
restores them afterwards), so it works inside ``jax.jit``, ``jax.grad`` and ``jax.vmap`` and XLA
drops every captured value nobody uses. Only one capture may be active at a time: NNX keeps the
captured values on the modules, so a nested capture would erase the outer one's. The KD
transforms therefore merge into a single capture (see :mod:`methods.distillation.transforms`)
and :func:`capture_intermediates` raises if it is nested.

If a sub-module is called several times in one forward pass, the **last** call's output is
returned.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx

from research.nn import iter_modules

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "slimjax_capture_active", default=False
)
_CALL = "__call__"


class CaptureError(RuntimeError):
    """A capture was nested inside another one, or a named path produced no value."""


def _flatten_captures(tree: Any, prefix: tuple = ()) -> dict[str, Any]:
    """``{path: last value}`` from the nested NNX state of ``nnx.capture``.

    A module's own output (method ``__call__``) is stored under the module's path; any other
    sowed name ``n`` under ``path/n``.
    """
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, nnx.Variable):
            values = value.get_value()
            last = values[-1] if isinstance(values, tuple) else values
            path = prefix if key == _CALL else (*prefix, key)
            out["/".join(str(p) for p in path)] = last
        elif hasattr(value, "items"):
            out.update(_flatten_captures(value, (*prefix, key)))
    return out


def capture_intermediates(
    fn: Callable[..., Any], paths: Sequence[str]
) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
    """Wraps ``fn(model, *args)`` to also return the outputs at ``paths`` from the same call.

    Args:
      fn: a function whose first argument is the NNX model (e.g. a loss function
        ``loss_fn(model, batch, rng)``, or ``lambda m, x: m(x)``).
      paths: module paths (output of that module) or ``module_path/sow_name`` (a sowed value).

    Returns:
      ``wrapped(model, *args, **kwargs) -> (fn's result, {path: array})``.

    Raises:
      CaptureError: at call time, if a path produced no value (the message lists those that
        did) or if called while another capture is active.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from research.nn import build_model
      >>> m = build_model("mlp", input_shape=(4,), num_classes=3, widths=(5,), rngs=nnx.Rngs(0))
      >>> out, feats = capture_intermediates(lambda m, x: m(x), ["layers/0"])(m, jnp.ones((2, 4)))
      >>> feats["layers/0"].shape
      (2, 5)
    """
    paths = tuple(paths)
    captured = nnx.capture(fn, nnx.Intermediate, method_outputs=nnx.Intermediate)

    def wrapped(model: nnx.Module, *args, **kwargs):
        if not paths:
            return fn(model, *args, **kwargs), {}
        if _ACTIVE.get():
            raise CaptureError(
                f"capture_intermediates({list(paths)}) was called inside another capture; NNX keeps "
                "captured values on the modules, so nesting would lose the outer ones. Combine the "
                "feature-based KD losses into one transform (methods.distillation.weighted_sum) or "
                "apply them directly one after another, so they share a single capture."
            )
        token = _ACTIVE.set(True)
        try:
            result, state = captured(model, *args, **kwargs)
        finally:
            _ACTIVE.reset(token)
        found = _flatten_captures(state)
        missing = [p for p in paths if p not in found]
        if missing:
            raise CaptureError(
                f"no output captured for path(s) {missing}; the forward pass produced values at "
                f"{sorted(found)}. Use research.nn.iter_modules(model) to list module paths (NNX "
                "instruments only methods a class defines itself, so a subclass that inherits "
                "__call__ is not captured: name its parent module or one of its sub-modules)."
            )
        return result, {p: found[p] for p in paths}

    return wrapped


def intermediates(
    model: nnx.Module, x: jax.Array, paths: Sequence[str]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(model(x), {path: output})`` in one forward pass; see :func:`capture_intermediates`."""
    return capture_intermediates(lambda m, inp: m(inp), paths)(model, x)


def module_paths(model: nnx.Module) -> list[str]:
    """The module paths that :func:`capture_intermediates` accepts (plus sowed names)."""
    return [p for p, _ in iter_modules(model)]
