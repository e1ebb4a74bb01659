"""Side-by-side latency of a dense layer (or model) and its factorized twin on the current backend."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
from flax import nnx


def jitted_forward(module: nnx.Module, device: jax.Device | None = None) -> Callable[[jax.Array], jax.Array]:
    """``x -> module(x)`` compiled with ``jax.jit``; the module's state is an explicit argument.

    With ``device`` the state is placed there, so the call runs on that device (e.g. the host
    CPU of a GPU machine) when ``x`` is placed there too.
    """
    graphdef, state = nnx.split(module)
    if device is not None:
        state = jax.device_put(state, device)
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return lambda x: fn(state, x)


def compare_latency(
    first: nnx.Module,
    second: nnx.Module,
    x: jax.Array,
    *,
    warmup: int = 3,
    repeats: int = 20,
    device: jax.Device | None = None,
) -> tuple[float, float]:
    """Median seconds of ``first(x)`` and ``second(x)``, timed alternately in one loop.

    Both are jitted and warmed up (compilation excluded); each timed call ends with
    ``jax.block_until_ready``. Alternating the calls exposes both to the same machine load, so
    their ratio is meaningful even where absolute times drift. ``device`` runs both there
    (default: where the states already live).

    Raises:
      ValueError: ``repeats`` < 1.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be at least 1")
    fa, fb = jitted_forward(first, device), jitted_forward(second, device)
    if device is not None:
        x = jax.device_put(x, device)
    for _ in range(max(warmup, 1)):
        jax.block_until_ready(fa(x))
        jax.block_until_ready(fb(x))
    ta, tb = [], []
    for i in range(repeats):
        order = ((fa, ta), (fb, tb)) if i % 2 == 0 else ((fb, tb), (fa, ta))
        for f, times in order:
            t0 = time.perf_counter()
            jax.block_until_ready(f(x))
            times.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


_LAYER_LATENCIES: dict = {}  # (dense, factorized, input) signatures -> (dense s, factorized s), this process


def _signature(module: nnx.Module) -> tuple:
    """What a module's latency depends on: its graph (type and static settings: strides, padding,
    ranks) and its arrays' shapes and dtypes, not their values."""
    graphdef, state = nnx.split(module)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    return graphdef, tuple((jax.tree_util.keystr(p), tuple(v.shape), str(v.dtype)) for p, v in leaves)


def layer_latencies(
    dense: nnx.Module, factorized: nnx.Module, x: jax.Array, *, warmup: int = 3, repeats: int = 20
) -> tuple[float, float, bool]:
    """``(dense seconds, factorized seconds, timed before)``: :func:`compare_latency` of a layer
    and its factorized twin, timed once per process for each pair of graphs, shapes and input
    shape (the weights' values do not change a latency).

    A sweep of decompose stages times each distinct layer once, not once per trial (a
    LeNet-300-100 factorization took ~0.05 s instead of ~0.6 s on the 2-core CPU,
    ``python -m experiments.benchmarks.factorize_timings``), and trials with the same ranks keep
    or drop the same layers: timed anew, layers near 1.0x came out dense in one call and
    factorized in the next. :func:`clear_latency_cache` forgets the timings (e.g. after the machine's load changed).
    """
    try:
        key = (_signature(dense), _signature(factorized), tuple(x.shape), str(x.dtype), jax.default_backend())
        key += (warmup, repeats)
        hash(key)
    except TypeError:  # an unhashable static setting: timed every time
        return (*compare_latency(dense, factorized, x, warmup=warmup, repeats=repeats), False)
    if key in _LAYER_LATENCIES:
        return (*_LAYER_LATENCIES[key], True)
    _LAYER_LATENCIES[key] = compare_latency(dense, factorized, x, warmup=warmup, repeats=repeats)
    return (*_LAYER_LATENCIES[key], False)


def clear_latency_cache() -> None:
    """Forgets the layer timings :func:`layer_latencies` kept."""
    _LAYER_LATENCIES.clear()
