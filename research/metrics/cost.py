"""FLOPs from XLA's cost analysis and wall-clock latency of compiled functions."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx


def _forward(model: nnx.Module) -> Callable[[jax.Array], jax.Array]:
    graphdef, state = nnx.split(model)

    def f(state, x):
        return nnx.merge(graphdef, state)(x)

    return lambda x: f(state, x), f, state


def flops(model_or_fn: nnx.Module | Callable, sample_input: jax.Array) -> float:
    """FLOPs of one forward pass on ``sample_input``, from XLA's cost analysis of the compiled call.

    For an NNX model the model runs in its current mode (call ``model.eval()`` first for
    inference cost). Returns ``nan`` when the backend reports no FLOP count.
    """
    if isinstance(model_or_fn, nnx.Module):
        _, f, state = _forward(model_or_fn)
        compiled = jax.jit(f).lower(state, sample_input).compile()
    else:
        compiled = jax.jit(model_or_fn).lower(sample_input).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX returned one dict per device
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", float("nan")))


def latency(fn: Callable[..., Any], *args: Any, warmup: int = 3, repeats: int = 20) -> dict[str, float]:
    """Times ``fn(*args)``: ``warmup`` untimed calls, then the median of ``repeats`` timed calls.

    Each call is synchronised with ``jax.block_until_ready``. Returns seconds:
    ``{"median", "min", "max", "repeats"}``.

    Raises:
      ValueError: ``repeats`` < 1.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be at least 1")
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "repeats": repeats}


def model_latency(
    model: nnx.Module, sample_input: jax.Array, *, warmup: int = 3, repeats: int = 20
) -> dict[str, float]:
    """Latency of the jitted forward pass of ``model`` on ``sample_input`` (see :func:`latency`)."""
    _, f, state = _forward(model)
    jf = jax.jit(f)
    return latency(jf, state, sample_input, warmup=warmup, repeats=repeats)
