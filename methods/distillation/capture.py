"""Capturing intermediate outputs by path, in the same forward pass, without hooks.

Name layers by path and get their outputs from the forward pass a function runs anyway (e.g.
the task loss's), with no change to the model and no user-registered hooks:

* ``"layers/0"``: the output of the sub-module at that path (``research.nn.iter_modules``
  paths); ``""`` is the model's own output;
* ``"encoder/feat"``: a value the module at ``"encoder"`` sowed with
  ``self.sow(nnx.Intermediate, "feat", x)``, collected through NNX's own ``nnx.capture``.

Module outputs are recorded while the wrapped function runs by instrumenting the ``__call__``
of the named modules' classes (and restoring them afterwards), the mechanism of NNX's
``nnx.capture(..., method_outputs=...)``. We keep our own small recorder instead of that flag
because in flax 0.12.8 it (a) is not re-entrant: a capture inside another one, e.g. an online
teacher run inside a student's capture, makes every other instance of the instrumented classes
fail in ``sow``, and the inner capture un-instruments the classes for the outer one; and (b)
skips classes that inherit ``__call__`` (fake-quant subclasses of ``nnx.Linear``). Our recorder
only records the module instances it was asked for, passes every other call through, nests,
and handles inherited ``__call__``.

Everything happens while Python traces, so it works inside ``jax.jit``, ``jax.grad`` and
``jax.vmap``; XLA drops recorded values that nobody uses. If a sub-module is called several
times in one forward pass, the **last** call's output is returned.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from research.nn import get_module
from research.nn import iter_modules
from research.nn.flax_errors import flax_boundary

_SOWN: contextvars.ContextVar[frozenset] = contextvars.ContextVar("slimjax_sow_capture", default=frozenset())
_CALL = "__call__"
_LOCK = threading.RLock()
_RECORDERS: list[dict[int, tuple[str, dict]]] = []  # active recorders: id(module) -> (path, sink)
_PATCHED: dict[type, tuple[Any, bool, int]] = {}  # class -> (original __call__, own attr?, refcount)


class CaptureError(RuntimeError):
    """A named path produced no value, or sowed values were captured twice on one model."""


def _instrument(cls: type) -> None:
    if cls in _PATCHED:
        orig, own, n = _PATCHED[cls]
        _PATCHED[cls] = (orig, own, n + 1)
        return
    own = _CALL in cls.__dict__
    orig = cls.__call__

    def __call__(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        for rec in _RECORDERS:
            hit = rec.get(id(self))
            if hit is not None:
                hit[1][hit[0]] = out
        return out

    __call__.__wrapped__ = orig
    _PATCHED[cls] = (orig, own, 1)
    cls.__call__ = __call__


def _restore(cls: type) -> None:
    orig, own, n = _PATCHED[cls]
    if n > 1:
        _PATCHED[cls] = (orig, own, n - 1)
        return
    del _PATCHED[cls]
    if own:
        cls.__call__ = orig
    else:
        delattr(cls, _CALL)


def _flatten_sown(tree: Any, prefix: tuple = ()) -> dict[str, Any]:
    """``{path/name: last value}`` from the nested NNX state returned by ``nnx.capture``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, nnx.Variable):
            values = value.get_value()
            out["/".join(str(p) for p in (*prefix, key))] = values[-1] if isinstance(values, tuple) else values
        elif hasattr(value, "items"):
            out.update(_flatten_sown(value, (*prefix, key)))
    return out


def _resolve(model: nnx.Module, path: str) -> nnx.Module | None:
    try:
        node = get_module(model, path)
    except KeyError:
        return None
    return node if isinstance(node, nnx.Module) else None


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
      CaptureError: at call time, if a path produced no value (the message lists the module
        paths), or if sowed values of the same model are captured by two nested captures.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from research.nn import build_model
      >>> m = build_model("mlp", input_shape=(4,), num_classes=3, widths=(5,), rngs=nnx.Rngs(0))
      >>> out, feats = capture_intermediates(lambda m, x: m(x), ["layers/0"])(m, jnp.ones((2, 4)))
      >>> feats["layers/0"].shape
      (2, 5)
    """
    paths = tuple(dict.fromkeys(paths))

    def wrapped(model: nnx.Module, *args, **kwargs):
        if not paths:
            return fn(model, *args, **kwargs), {}
        sink: dict[str, Any] = {}
        targets = {p: _resolve(model, p) for p in paths}
        sown = [p for p, m in targets.items() if m is None]
        recorder = {id(m): (p, sink) for p, m in targets.items() if m is not None}
        classes = sorted({type(m) for m in targets.values() if m is not None}, key=lambda c: len(c.__mro__))
        call = fn
        token = None
        if sown:
            if id(model) in _SOWN.get():
                raise CaptureError(
                    f"sowed values {sown} of this model are captured inside another capture of sowed "
                    "values of the same model; NNX keeps them on the modules, so the outer capture "
                    "would lose them. Combine the KD losses in one transform (weighted_sum)."
                )
            token = _SOWN.set(_SOWN.get() | {id(model)})
            call = nnx.capture(fn, nnx.Intermediate)
        with _LOCK:
            for cls in classes:
                _instrument(cls)
            _RECORDERS.append(recorder)
        try:
            with flax_boundary(f"capturing the outputs of {list(paths)}", model):
                result = call(model, *args, **kwargs)
        finally:
            with _LOCK:
                del _RECORDERS[next(i for i, r in enumerate(_RECORDERS) if r is recorder)]
                for cls in reversed(classes):
                    _restore(cls)
            if token is not None:
                _SOWN.reset(token)
        if sown:
            result, state = result
            sink.update({k: v for k, v in _flatten_sown(state).items() if k in sown})
        missing = [p for p in paths if p not in sink]
        if missing:
            raise CaptureError(
                f"no output captured for path(s) {missing}: not a module that ran in this forward pass "
                f"nor a sowed value. Module paths: {[p for p, _ in iter_modules(model)]}"
            )
        return result, {p: sink[p] for p in paths}

    return wrapped


def intermediates(model: nnx.Module, x: jax.Array, paths: Sequence[str]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(model(x), {path: output})`` in one forward pass; see :func:`capture_intermediates`."""
    return capture_intermediates(lambda m, inp: m(inp), paths)(model, x)


def module_paths(model: nnx.Module) -> list[str]:
    """The module paths that :func:`capture_intermediates` accepts (plus sowed names)."""
    return [p for p, _ in iter_modules(model)]
