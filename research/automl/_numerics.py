"""Small numerical helpers shared by the samplers: size buckets, batched BFGS, trace counts, and
the jit the samplers compile their programs with (:func:`sampler_jit`)."""

from __future__ import annotations

import collections
import contextlib
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["CPU_COMPILE_OPTIONS", "TRACE_COUNTS", "bfgs_minimize", "bucket", "maybe_x64", "sampler_jit"]

#: Number of times each jitted hot path was traced (compiled). Tests read it to check that
#: consecutive suggestions inside one size bucket do not recompile.
TRACE_COUNTS: collections.Counter[str] = collections.Counter()

#: XLA options of the samplers' programs on a CPU backend: no LLVM optimisation, the older
#: (faster to compile) fusion emitters. Their arrays are tiny (a few hundred observations at
#: most) and their programs large (BFGS with line searches inside vmaps and scans), so compiling
#: them took ~3x longer than running them, and the optimisations bought ~10% of run time. See
#: ``experiments/benchmarks/sampler_compile.py`` for the figures (a 48-trial GP study of Branin
#: ran 2x faster on a 2-core CPU, suggesting the same points to 1e-6). Options that the installed
#: XLA does not know are dropped (jaxlib 0.11 has no ``xla_cpu_use_fusion_emitters``). Other
#: backends get XLA's defaults. Set to ``{}`` to compile with XLA's defaults everywhere.
CPU_COMPILE_OPTIONS: dict[str, object] = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


@functools.cache
def _supported(options: tuple[tuple[str, object], ...]) -> dict[str, object]:
    """The subset of ``options`` that this XLA accepts (each tried once on a one-op program of
    the default backend)."""
    ok: dict[str, object] = {}
    for name, value in options:
        try:
            jax.jit(lambda x: x + 1, compiler_options={**ok, name: value}).lower(0.0).compile()
        except Exception as e:  # XlaRuntimeError "No such compile option" (the type moved between releases)
            if "compile option" not in str(e):
                raise
            continue
        ok[name] = value
    return ok


def sampler_jit(fun: Callable, **kwargs) -> Callable:
    """``jax.jit(fun)``, compiled with :data:`CPU_COMPILE_OPTIONS` when JAX's default backend at
    the call is the CPU (one jitted function per backend, made at its first call)."""
    jitted: dict[str, Callable] = {}

    @functools.wraps(fun)
    def call(*args, **kw):
        backend = jax.default_backend()
        if backend not in jitted:
            options = _supported(tuple(CPU_COMPILE_OPTIONS.items())) if backend == "cpu" else {}
            jitted[backend] = jax.jit(fun, compiler_options=options or None, **kwargs)
        return jitted[backend](*args, **kw)

    return call


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest size bucket ``>= n``.

    Sizes: ``minimum`` and two per octave up to 128 (16, 24, 32, 48, 64, 96, 128), then four
    per octave (160, 192, 224, 256, 320, 384, 448, 512, 640, ...). Padding observation
    arrays to these sizes bounds the number of compilations over a whole study while the
    O(N^3) work stays within ~1.25-1.5x of the unpadded size.

    Raises:
      ValueError: If ``minimum < 2`` (the step from a size of 1 would be 0).
    """
    if minimum < 2:
        raise ValueError(f"bucket(minimum={minimum}) must be >= 2; use minimum=2 for the smallest buckets")
    size = minimum
    while size < n:
        octave = 1 << (size.bit_length() - 1)  # largest power of two <= size
        step = octave // 2 if octave < 128 else octave // 4
        size += step
    return size


@contextlib.contextmanager
def maybe_x64(enabled: bool):
    """Enables 64-bit floats inside the block (thread-local) when ``enabled``."""
    if not enabled:
        yield
        return
    ctx = getattr(jax, "enable_x64", None)
    if ctx is None:  # pragma: no cover - older JAX
        from jax.experimental import enable_x64 as ctx  # pylint: disable=import-outside-toplevel
    with ctx(True):
        yield


def bfgs_minimize(
    fun: Callable[[jax.Array], jax.Array],
    x0: jax.Array,
    *,
    maxiter: int,
    lower: float | jax.Array,
    upper: float | jax.Array,
    gtol: float = 1e-5,
    ftol: float = 1e-9,
    max_step: float = 1.0,
    max_fev: int | None = None,
    h0: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Minimises ``fun`` from ``x0`` by BFGS with a backtracking (Armijo) line search.

    Pure JAX (``lax.while_loop``), so it can be jitted and ``vmap``-ed over starts; iterates
    are projected onto the box ``[lower, upper]``. Coordinates that sit on a bound while the
    gradient pushes them out of the box are held there for the step (a simple active set),
    so a constrained optimum on a face of the box is approached along that face instead of
    stalling the line search.

    Args:
      fun: Scalar function of a vector ``(p,)``.
      x0: Start ``(p,)``.
      maxiter: Maximum number of BFGS iterations.
      lower: Lower bound of every coordinate (scalar or ``(p,)``).
      upper: Upper bound of every coordinate (scalar or ``(p,)``).
      gtol: Stop when the largest absolute entry of the projected gradient (the gradient
        without the entries held at a bound) is below this.
      ftol: Stop when the relative decrease of ``fun`` is below this.
      max_step: Longest first trial step of the line search.
      max_fev: Stop after this many function evaluations (default ``3 * maxiter``); under
        ``vmap`` the slowest start sets the cost, so this bounds it.
      h0: Initial inverse-Hessian approximation (e.g. from the previous, similar problem);
        identity, rescaled after the first step, if ``None``.

    Returns:
      ``(x, f, h)``: the best point found, its value (NaN if ``fun(x0)`` was not finite) and
      the final inverse-Hessian approximation.
    """
    vg = jax.value_and_grad(fun)
    max_fev = 3 * maxiter if max_fev is None else max_fev
    p = x0.shape[0]
    eye = jnp.eye(p, dtype=x0.dtype)
    f0, g0 = vg(x0)

    def cond(s):
        k, _, _, _, _, done, nfev = s
        return (k < maxiter) & ~done & (nfev < max_fev)

    def free_of(x, g):
        return ~(((x <= lower) & (g > 0)) | ((x >= upper) & (g < 0)))

    def body(s):
        k, x, f, g, h, _, nfev = s
        free = free_of(x, g)
        gf = jnp.where(free, g, 0.0)
        d = jnp.where(free, -h @ gf, 0.0)
        descent = (gf @ d) < 0
        d = jnp.where(descent, d, -gf)
        h = jnp.where(descent, h, eye)
        norm = jnp.sqrt(d @ d)
        d = d * jnp.minimum(1.0, max_step / jnp.maximum(norm, 1e-30))
        slope = g @ d

        def ls_cond(c):
            t, fn, _, _, it = c
            ok = jnp.isfinite(fn) & (fn <= f + 1e-4 * t * slope)
            return ~ok & (it < 12)

        def ls_body(c):
            t, _, _, _, it = c
            t = jnp.where(it == 0, t, 0.5 * t)
            xn = jnp.clip(x + t * d, lower, upper)
            fn, gn = vg(xn)
            return t, fn, gn, xn, it + 1

        t, fn, gn, xn, n_ls = jax.lax.while_loop(ls_cond, ls_body, (jnp.asarray(1.0, x.dtype), jnp.inf * f, g, x, 0))
        improved = jnp.isfinite(fn) & (fn <= f)
        sv = xn - x
        yv = gn - g
        sy = sv @ yv
        if h0 is None:
            h = jnp.where(k == 0, eye * jnp.clip(sy / jnp.maximum(yv @ yv, 1e-30), 1e-6, 1e6), h)
        rho = 1.0 / jnp.where(sy > 1e-12, sy, 1.0)
        a = eye - rho * jnp.outer(sv, yv)
        h_new = a @ h @ a.T + rho * jnp.outer(sv, sv)
        h = jnp.where((sy > 1e-12) & improved, h_new, h)
        x = jnp.where(improved, xn, x)
        g = jnp.where(improved, gn, g)
        pg = jnp.where(free_of(xn, gn), gn, 0.0)
        small = (jnp.max(jnp.abs(pg)) < gtol) | (jnp.abs(f - fn) <= ftol * (1.0 + jnp.abs(f)))
        f_new = jnp.where(improved, fn, f)
        done = ~improved | small
        return k + 1, x, f_new, g, h, done, nfev + n_ls

    h_init = eye if h0 is None else h0
    init = (0, x0, f0, g0, h_init, ~jnp.isfinite(f0), 1)
    _, x, f, _, h, _, _ = jax.lax.while_loop(cond, body, init)
    return x, jnp.where(jnp.isfinite(f), f, jnp.nan), h
