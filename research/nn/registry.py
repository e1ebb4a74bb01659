"""A decorator registry for zoo models: refuses duplicates and lists what it holds."""

from __future__ import annotations

import collections
import inspect
import os
import threading
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

import research.names as _names
from research.registry import Registry

# Created (with the built-in names declared) in the standard-library research.names, so configs are checked before JAX.
MODELS: Registry[Callable[..., nnx.Module]] = _names.MODELS


def register_model(name: str) -> Callable[[Callable[..., nnx.Module]], Callable[..., nnx.Module]]:
    """Registers a model constructor ``fn(input_shape, num_classes, *, rngs, **kwargs)``.

    Registering the same constructor again (a re-run notebook cell) is a no-op.

    Raises:
      DuplicateNameError: if another constructor is registered as ``name`` (a ``ValueError``).
    """
    return MODELS.register(name)


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return MODELS.names()


def model_kwargs(name: str) -> dict[str, Any]:
    """The keyword options a registered model accepts, with their defaults."""
    fn = get_model_fn(name)
    sig = inspect.signature(fn)
    return {k: p.default for k, p in sig.parameters.items() if p.kind == p.KEYWORD_ONLY and k != "rngs"}


def get_model_fn(name: str) -> Callable[..., nnx.Module]:
    """The constructor registered under ``name``.

    Raises:
      UnknownNameError: naming the unknown model, the closest and all registered ones (a ``KeyError``).
    """
    return MODELS.get(name)


def build_model(
    name: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    rngs: nnx.Rngs,
    **kwargs: Any,
) -> nnx.Module:
    """Builds a zoo model for inputs of ``input_shape`` (no batch dim) and ``num_classes``.

    Raises:
      KeyError: unknown model name.
      TypeError: an option the model does not take (the message lists the valid ones).
    """
    fn = get_model_fn(name)
    valid = model_kwargs(name)
    bad = sorted(set(kwargs) - set(valid))
    if bad:
        raise TypeError(f"model {name!r} has no option(s) {bad}; valid options: {valid}")
    return initialize(fn, tuple(input_shape), num_classes, rngs=rngs, **kwargs)


INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}
"""How a model's initialization program is compiled: it runs once per model, so its compile is
what costs (LLVM's level 1 compiled LeNet-5's in 0.6 s against 1.5 s at the default level, with the
same weights; level 0 was faster still but rounded differently)."""
_INIT_PROGRAMS: collections.OrderedDict = collections.OrderedDict()  # jitted initializations by model and shapes
_INIT_PROGRAMS_KEPT = 32
_INIT_LOCK = threading.Lock()
_EAGER = object()  # a constructor that does not trace: built op by op


def initialize(fn: Callable[..., nnx.Module], *args: Any, rngs: nnx.Rngs, **kwargs: Any) -> nnx.Module:
    """``fn(*args, rngs=rngs, **kwargs)``, its initializers run as one compiled program.

    Built op by op, a model compiles a program per initializer and shape (each truncated normal
    took ~0.4 s to compile on a 2-core CPU); traced once under :func:`jax.jit` and compiled at
    :data:`INIT_COMPILER_OPTIONS`, a fresh process builds the zoo models 1.9-3.3x faster (LeNet-5
    3.2 s -> 1.1 s, ResNet-20 5.8 s -> 2.4 s, MobileNetV2 8.7 s -> 3.7 s, backend start included:
    ``python -m experiments.benchmarks.model_init``; ``configs/quickstart.py``: 19.6 s -> 17.7 s). The weights are the same draws within float
    rounding: with XLA's default flags every zoo model without attention or a GRU came out
    bit-identical on that CPU, and a few weights of those two in the last bit; fused programs
    may round differently under other flags or CPUs. The program takes the keys of ``rngs`` as
    arguments, so models that differ only in their seed share it, and ``rngs`` is advanced as the
    constructor advances it. ``XLA_FLAGS`` that set ``--xla_backend_optimization_level`` are
    kept (the test suite compiles at 0). A constructor that cannot be traced (Python control
    flow on array values), arguments that are not hashable, and a call inside a transformation
    (``nnx.eval_shape`` replaying a recipe) are built op by op, as before.
    """
    if _under_trace():  # built inside a transformation (nnx.eval_shape, a jit): staged into it op by op
        return fn(*args, rngs=rngs, **kwargs)
    try:
        rngs_def, rng_state = nnx.split(rngs)
        key = (fn, _frozen(args), _frozen(kwargs), rngs_def)
        hash(key)
    except Exception:  # not an nnx.Rngs, or unhashable arguments
        return fn(*args, rngs=rngs, **kwargs)
    with _INIT_LOCK:
        entry = _INIT_PROGRAMS.get(key)
        if entry is not None:
            _INIT_PROGRAMS.move_to_end(key)
    if entry is _EAGER:
        return fn(*args, rngs=rngs, **kwargs)
    if entry is None:
        box: dict[str, Any] = {}

        def init(state):
            inner = nnx.merge(rngs_def, state)
            box["graphdef"], model_state = nnx.split(fn(*args, rngs=inner, **kwargs))
            return model_state, nnx.state(inner)

        level_set = "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", "")
        jitted = jax.jit(init, compiler_options=None if level_set else INIT_COMPILER_OPTIONS)
        try:
            model_state, new_rng_state = jitted(rng_state)
        except Exception:  # e.g. a tracer in Python control flow; a genuine error is raised again below
            with _INIT_LOCK:
                _INIT_PROGRAMS[key] = _EAGER
            return fn(*args, rngs=rngs, **kwargs)
        entry = (jitted, box["graphdef"])
        with _INIT_LOCK:
            _INIT_PROGRAMS[key] = entry
            while len(_INIT_PROGRAMS) > _INIT_PROGRAMS_KEPT:
                _INIT_PROGRAMS.popitem(last=False)
    else:
        model_state, new_rng_state = entry[0](rng_state)
    nnx.update(rngs, new_rng_state)
    return nnx.merge(entry[1], model_state)


def _under_trace() -> bool:
    """Whether JAX is tracing here (an operation gives a tracer, not an array)."""
    return isinstance(jax.numpy.zeros(()), jax.core.Tracer)


def _frozen(value: Any) -> Any:
    """A hashable stand-in for constructor arguments (lists as tuples, dicts as sorted items)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_frozen(v) for v in value))
    return value
