"""FLOPs from XLA's cost analysis and wall-clock latency of compiled functions."""

from __future__ import annotations

import functools
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def _forward(model: nnx.Module) -> Callable[[jax.Array], jax.Array]:
    graphdef, state = nnx.split(model)
    f = _forward_fn(graphdef)
    return lambda x: f(state, x), f, state


@functools.lru_cache(maxsize=64)
def _forward_fn(graphdef):
    """The forward pass of a model graph, jitted once per graph: models of the same structure (the
    trials of a study, the stages of a run) reuse the traced and compiled program."""

    def f(state, x):
        return nnx.merge(graphdef, state)(x)

    return jax.jit(f)


@functools.lru_cache(maxsize=256)
def _model_flops(graphdef, avals, x_aval) -> float:
    state = jax.tree.unflatten(avals[0], avals[1])
    return _cost_flops(_forward_fn(graphdef).lower(state, x_aval).compile())


def _aval(x: Any, sharding: jax.sharding.Sharding | None) -> jax.ShapeDtypeStruct:
    dtype = x.dtype if hasattr(x, "dtype") else jnp.result_type(x)
    return jax.ShapeDtypeStruct(jnp.shape(x), dtype, sharding=sharding)


def _counting_sharding() -> jax.sharding.Sharding | None:
    """Where FLOPs are counted: the CPU, whatever the default backend.

    XLA's GPU cost analysis leaves out the convolutions it hands to cuDNN (measured on an H200,
    jax 0.11.2: LeNet-5 on 8x8 digits 37,882 FLOPs, the dense layers alone, against 90,882 on the
    CPU), so FLOPs would depend on the machine. On a CPU-only process ``None`` (the default
    placement: the program the latency timing compiles too).
    """
    if jax.default_backend() == "cpu":
        return None
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError as e:  # JAX_PLATFORMS names no cpu: the default backend's count, said once
        _warn_no_cpu(str(e).splitlines()[0])
        return None
    return jax.sharding.SingleDeviceSharding(cpu)


@functools.lru_cache(maxsize=1)
def _warn_no_cpu(why: str) -> None:
    warnings.warn(
        f"FLOPs are counted by the {jax.default_backend()} backend's cost analysis, which may leave out "
        f"convolutions, because JAX has no CPU backend here ({why}); add cpu to JAX_PLATFORMS "
        "(e.g. JAX_PLATFORMS=cuda,cpu) for FLOPs that do not depend on the machine",
        stacklevel=4,
    )


def _cost_flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX returned one dict per device
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", float("nan")))


def flops(model_or_fn: nnx.Module | Callable, sample_input: jax.Array) -> float:
    """FLOPs of one forward pass on ``sample_input``, from XLA's cost analysis of the compiled call.

    A model's program is compiled for the CPU on any machine (the GPU's analysis leaves out cuDNN
    convolutions); a plain function's for the default backend (it may close over device arrays).

    For an NNX model the model runs in its current mode (call ``model.eval()`` first for
    inference cost). Returns ``nan`` when the backend reports no FLOP count.
    """
    if isinstance(model_or_fn, nnx.Module):
        graphdef, state = nnx.split(model_or_fn)
        leaves, treedef = jax.tree.flatten(state)
        sharding = _counting_sharding()
        avals = (treedef, tuple(_aval(x, sharding) for x in leaves))
        x_aval = _aval(sample_input, sharding)
        return _model_flops(graphdef, avals, x_aval)  # depends on shapes and graph only: cached
    return _cost_flops(jax.jit(model_or_fn).lower(sample_input).compile())


def timings(call: Callable[[], Any], repeats: int, warmup: int = 3) -> list[float]:
    """Wall times of ``call()`` in seconds: ``warmup`` untimed calls, then ``repeats`` timed ones.

    The one timer of slimjax: :func:`latency`, :func:`median_ms`, the export report, the fusion
    report, TVM and TensorRT all time through it. ``call`` must block until its result is ready
    (wrap a JAX call in ``jax.block_until_ready``).

    Raises:
      ValueError: ``repeats`` < 1.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be at least 1")
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def median_ms(call: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``call()`` in milliseconds over ``repeats`` calls, after ``warmup`` calls.

    Example:
      >>> median_ms(lambda: sum(range(100)), repeats=5) >= 0.0
      True
    """
    return 1e3 * statistics.median(timings(call, repeats, warmup))


def latency(fn: Callable[..., Any], *args: Any, warmup: int = 3, repeats: int = 20) -> dict[str, float]:
    """Times ``fn(*args)``: ``warmup`` untimed calls, then the median of ``repeats`` timed calls.

    Each call is synchronised with ``jax.block_until_ready``. Returns seconds:
    ``{"median", "min", "max", "repeats"}``.

    Raises:
      ValueError: ``repeats`` < 1.
    """
    times = timings(lambda: jax.block_until_ready(fn(*args)), repeats, warmup)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "repeats": repeats}


def model_latency(
    model: nnx.Module, sample_input: jax.Array, *, warmup: int = 3, repeats: int = 20
) -> dict[str, float]:
    """Latency of the jitted forward pass of ``model`` on ``sample_input`` (see :func:`latency`)."""
    _, f, state = _forward(model)
    return latency(f, state, sample_input, warmup=warmup, repeats=repeats)
