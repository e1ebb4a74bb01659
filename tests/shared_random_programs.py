"""One compiled program per size bucket for the random draws of parameter initialisation (tests only).

Building a model calls ``jax.random.truncated_normal`` (or ``normal``/``uniform``) eagerly once per
parameter, and JAX compiles one program per distinct shape: 0.15-0.6 s each on the project's
2-core Xeon. Over the suite that was 340 programs and about 120 s of XLA compilation (measured with
a ``jax.monitoring`` listener over a full run), for draws that take microseconds.

With JAX's default partitionable Threefry (``jax_threefry_partitionable``), element ``i`` of a draw
depends only on the key and on ``i``: the first ``n`` values of a draw of size ``m >= n`` are the
draw of size ``n``, in row-major order. :func:`install` therefore replaces the three functions, for
eager calls on a single Threefry key with scalar bounds and no sharding, by a draw at the next power
of two of the size (one program per bucket), cut to size on the host. Every other call goes to
JAX's own function: under a trace (even one that closes over a concrete key), batched keys, array
bounds, another PRNG implementation or dtype. The values are bit-identical:
``tests/test_shared_random_programs.py`` checks every patched function against JAX's, and whole
zoo models built both ways. The library itself is never patched.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

#: The functions replaced, by name (in ``jax.random`` and in ``jax._src.random``, which
#: ``jax.nn.initializers`` calls).
NAMES = ("truncated_normal", "normal", "uniform")

#: JAX's own functions, as found before :func:`install`.
ORIGINAL: dict[str, Any] = {}

_MIN_BUCKET = 64

#: How many draws took the shared path (the tests check that it is taken).
shared_draws = 0


def _bucket(n: int) -> int:
    return max(_MIN_BUCKET, 1 << (n - 1).bit_length())


def _shareable(key: Any, shape: Any, dtype: Any, bounds: tuple, out_sharding: Any) -> bool:
    if out_sharding is not None or not shape or not jax.config.jax_threefry_partitionable:
        return False
    # Inside jit/vmap/grad (even with a concrete key closed over), every value may be a tracer.
    if not _trace_state_clean() or any(np.ndim(v) != 0 for v in bounds):
        return False
    try:
        tuple(int(d) for d in shape)
        canonical = np.dtype(jax.dtypes.canonicalize_dtype(float if dtype is None else dtype))
    except TypeError:
        return False
    if canonical not in (np.float32, np.float64):
        return False
    if jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
        return key.shape == () and str(jax.random.key_impl(key)) == "threefry2x32"
    # a raw uint32[2] key: the default implementation's
    return np.shape(key) == (2,) and jax.config.jax_default_prng_impl == "threefry2x32"


def _draw(draw, key: Any, shape: Any, dtype: Any, bounds: tuple, out_sharding: Any) -> jax.Array:
    """``draw(shape, out_sharding)`` (JAX's function with the other arguments bound) at the size
    bucket of ``shape``, cut to ``shape``; or as called when the call cannot be shared."""
    global shared_draws
    if not _shareable(key, shape, dtype, bounds, out_sharding):
        return draw(shape, out_sharding)
    shape = tuple(int(d) for d in shape)
    n = int(np.prod(shape, dtype=np.int64))
    flat = draw((_bucket(n),), None)
    shared_draws += 1
    return jax.numpy.asarray(np.asarray(flat)[:n].reshape(shape))


def _shared(name: str):
    original = ORIGINAL[name]

    if name == "truncated_normal":

        @functools.wraps(original)
        def truncated_normal(key, lower, upper, shape=None, dtype=None, *, out_sharding=None):
            def draw(s, o):
                return original(key, lower, upper, s, dtype, out_sharding=o)

            return _draw(draw, key, shape, dtype, (lower, upper), out_sharding)

        return truncated_normal

    if name == "normal":

        @functools.wraps(original)
        def normal(key, shape=(), dtype=None, *, out_sharding=None):
            return _draw(lambda s, o: original(key, s, dtype, out_sharding=o), key, shape, dtype, (), out_sharding)

        return normal

    @functools.wraps(original)
    def uniform(key, shape=(), dtype=None, minval=0.0, maxval=1.0, *, out_sharding=None):
        def draw(s, o):
            return original(key, s, dtype, minval, maxval, out_sharding=o)

        return _draw(draw, key, shape, dtype, (minval, maxval), out_sharding)

    return uniform


def _trace_state_clean() -> bool:
    from jax._src import core

    return core.trace_state_clean()


def _modules() -> list[Any]:
    import jax._src.random as private

    return [jax.random, private]


def install() -> bool:
    """Replaces the functions in ``jax.random`` and ``jax._src.random``; False (nothing replaced)
    when this JAX lays them out differently, so the suite then runs with JAX's own."""
    try:
        modules = _modules()
        found = {name: getattr(jax.random, name) for name in NAMES}
        _trace_state_clean()
    except (ImportError, AttributeError):
        return False
    if any(getattr(m, name, None) is not found[name] for m in modules for name in NAMES):
        return False  # not the same function object in both: unknown layout (or installed already)
    ORIGINAL.update(found)
    for name in NAMES:
        shared = _shared(name)
        for m in modules:
            setattr(m, name, shared)
    return True


def uninstall() -> None:
    """Puts JAX's own functions back."""
    if not ORIGINAL:
        return
    for m in _modules():
        for name in NAMES:
            setattr(m, name, ORIGINAL[name])
    ORIGINAL.clear()
