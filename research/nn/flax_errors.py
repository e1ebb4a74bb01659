"""Flax errors raised inside slimjax's tracing, re-raised with the layer, the operation and a fix.

When calibration, intermediate capture, export or structured-pruning tracing runs a user's model,
an error from inside Flax (a scan whose carry changed structure, an ``Rngs`` stream advanced at
another trace level) names Flax internals only. :func:`flax_boundary` wraps such a run: an error
raised from Flax (a ``flax.errors.FlaxError``, or any error whose innermost frame is in Flax or in
JAX's control-flow checks that Flax transforms call) becomes a :class:`FlaxContextError` naming

* the operation slimjax was doing (``"calibrating activation ranges"``),
* the innermost module of the model on the failing call stack, by path (``'rnn'``) and type,
* the known fix, from the fixes registered with :func:`register_flax_fix`.

The original error is chained (``raise ... from error``). Other errors pass through unchanged.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

from flax import errors as flax_errors
from flax import nnx

from research.registry import Registry

FixFn = Callable[[BaseException, str, nnx.Module | None], str | None]
FLAX_FIXES: Registry[FixFn] = Registry("known fix of a Flax error", hint="register one with @register_flax_fix('name')")


def register_flax_fix(name: str) -> Callable[[FixFn], FixFn]:
    """Registers ``fix(error, module_path, module) -> advice or None`` (None: does not apply).

    Fixes are tried in name order; the first that returns advice is quoted.

    Raises:
      DuplicateNameError: another fix is registered as ``name`` (a ``ValueError``).
    """
    return FLAX_FIXES.register(name)


class FlaxContextError(RuntimeError):
    """An error from Flax internals, with slimjax's context.

    Attributes:
      operation: what slimjax was doing (e.g. ``"calibrating activation ranges"``).
      module_path: path of the innermost model module on the failing call stack (``""`` for the
        model itself, ``None`` when none was found).
      module_type: that module's class name.
      fix: the known fix, or a pointer to Flax's message.
    """

    def __init__(self, operation: str, module_path: str | None, module_type: str, fix: str, error: BaseException):
        self.operation = operation
        self.module_path = module_path
        self.module_type = module_type
        self.fix = fix
        if module_path is None:
            where = ""
        elif module_path == "":
            where = f" in the model's own __call__ ({module_type})"
        else:
            where = f" in layer {module_path!r} ({module_type})"
        said = " ".join(str(error).split())
        if len(said) > 400:
            said = said[:400] + " ..."
        super().__init__(f"{operation} failed{where}: Flax raised {type(error).__name__}: {said}\nFix: {fix}")


def _module_paths(model: Any) -> dict[int, tuple[str, nnx.Module]]:
    if not isinstance(model, nnx.Module):
        return {}
    out = {}
    for path, module in nnx.iter_modules(model):
        out[id(module)] = ("/".join(str(p) for p in path), module)
    return out


def _from_flax(error: BaseException) -> bool:
    if isinstance(error, flax_errors.FlaxError):
        return True
    tb = error.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return False
    name = last.tb_frame.f_code.co_filename
    return f"{os.sep}flax{os.sep}" in name or f"{os.sep}control_flow{os.sep}" in name


def _innermost_module(error: BaseException, paths: dict[int, tuple[str, nnx.Module]]) -> tuple[str, nnx.Module] | None:
    found = None
    seen: set[int] = set()
    err: BaseException | None = error
    while err is not None and id(err) not in seen:  # the error and what it was raised from
        seen.add(id(err))
        tb = err.__traceback__
        while tb is not None:
            owner = tb.tb_frame.f_locals.get("self")
            if owner is not None and id(owner) in paths:
                found = paths[id(owner)]
            tb = tb.tb_next
        err = err.__cause__ or err.__context__
    return found


@contextlib.contextmanager
def flax_boundary(operation: str, model: Any) -> Iterator[None]:
    """Re-raises errors from Flax internals inside the block as :class:`FlaxContextError`.

    Args:
      operation: what the block does, for the message (``"capturing intermediate outputs"``).
      model: the NNX model the block runs (its module objects name the failing layer).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> m = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> with flax_boundary("running the model", m):
      ...     y = m(jnp.ones((1, 2)))
    """
    try:
        yield
    except FlaxContextError:
        raise
    except Exception as error:
        if not _from_flax(error):
            raise
        hit = _innermost_module(error, _module_paths(model))
        path, module = hit if hit is not None else (None, None)
        if hit is None and isinstance(model, nnx.Module):
            path, module = "", model
        fix = None
        for _, fix_fn in FLAX_FIXES.items():
            fix = fix_fn(error, path or "", module)
            if fix:
                break
        raise FlaxContextError(
            operation,
            path,
            type(module).__name__ if module is not None else "?",
            fix or "no known slimjax fix; Flax's message above names the failing transform",
            error,
        ) from error


@register_flax_fix("trace_level_rngs")
def _trace_level(error: BaseException, path: str, module: nnx.Module | None) -> str | None:
    text = str(error)
    if "trace level" not in text and not isinstance(error, flax_errors.TraceContextError):
        return None
    if isinstance(module, nnx.RNN) or "RngCount" in text or "RngKey" in text:
        at = f" at {path!r}" if path else ""
        return (
            f"the module{at} holds an nnx.Rngs stream that it advances on every call (nnx.RNN keeps one to "
            "initialise its carry, RNN cells built with keep_rngs=True too), and slimjax runs the model under "
            "jax.jit / jax2tf, a different trace level. Build nnx.RNN(cell, rngs=False) and pass "
            "initial_carry=jnp.zeros((batch, hidden)) in __call__ (or step the cell in a Python loop), and keep "
            "cells' default keep_rngs=False"
        )
    return (
        "a Flax module or variable created outside this trace is used inside an NNX transform (nnx.RNN, "
        "nnx.scan, nnx.vmap). Build nnx.RNN(cell, rngs=False) with an explicit initial_carry, or step the "
        "cell in a Python loop, so the model holds no Rngs stream the transform would have to advance"
    )


@register_flax_fix("scan_carry_structure")
def _scan_carry(error: BaseException, path: str, module: nnx.Module | None) -> str | None:
    if "carry" not in str(error) or "structure" not in str(error):
        return None
    at = f"under {path!r}" if path else "inside the scanned module"
    pattern = f"^{path}/" if path else "<the scanned layers>"
    return (
        f"a layer {at} adds state while it is scanned (nnx.RNN runs its cell in nnx.scan, whose carry must "
        "keep its structure; fake-quant layers record activations during calibration). Keep those layers in "
        f"float (QuantRule(pattern={pattern!r}, keep_float=True) before the catch-all rule) or step the cell "
        "in a Python loop over time"
    )
