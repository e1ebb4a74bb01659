"""Training loops as one compiled program: :func:`scan_steps` (a ``lax.scan`` over steps, unless
XLA's CPU backend would run the step's convolutions slowly inside it) and :func:`train_scan`, a quick
fit for tests and benchmarks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


def has_convolution(fn: Callable, *args: Any) -> bool:
    """Whether ``fn(*args)`` traces to a convolution (``lax.conv_general_dilated``), in any nested
    program (``jit``, ``scan``, ``vmap``, ``custom_vjp`` and the like). Traces ``fn`` once."""

    def walk(jaxpr) -> bool:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                return True
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds its Jaxpr as .jaxpr
                    if hasattr(inner, "eqns") and walk(inner):
                        return True
        return False

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def loops_slow_down_convolutions(backend: str | None = None) -> bool:
    """Whether XLA runs a convolution inside a loop body (``lax.scan``, ``fori_loop``) much slower
    than the same convolution outside one on ``backend`` (default: JAX's default backend).

    True on the CPU: XLA's CPU backend hands a convolution to its fast (Eigen) kernels only in the
    canonical dimension order, and rewrites the gradient's convolutions into that order outside a
    loop but not inside one, where they run through a generic loop emitter (jax-ml/jax#12868, open).
    Measured with ``python -m experiments.benchmarks.conv_in_loop``.
    """
    return (backend or jax.default_backend()) == "cpu"


class _StepLoop:
    """What :func:`scan_steps` returns; ``mode`` says how the last call ran (``"scan"`` or ``"loop"``)."""

    def __init__(self, body: Callable, mode: str = "auto"):
        if mode not in ("auto", "scan", "loop"):
            raise ValueError(f"mode={mode!r}: use 'auto' (decide per backend and body), 'scan' or 'loop'")
        self.body, self._forced = body, None if mode == "auto" else mode
        self.mode: str | None = None
        self._scan = jax.jit(lambda carry, xs: jax.lax.scan(body, carry, xs))
        self._step = jax.jit(body)
        self._modes: dict[Any, str] = {}  # per backend and argument structure

    def __call__(self, carry: Any, xs: Any) -> tuple[Any, Any]:
        leaves = jax.tree.leaves(xs)
        if not leaves:
            raise ValueError("scan_steps needs xs with at least one array (their leading axis is the steps)")
        self.mode = self._forced or self._decide(carry, xs, leaves)
        if self.mode == "scan":
            return self._scan(carry, xs)
        ys = []
        for i in range(int(np.shape(leaves[0])[0])):
            carry, y = self._step(carry, jax.tree.map(lambda a, i=i: a[i], xs))
            ys.append(y)
        return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)

    def _decide(self, carry: Any, xs: Any, leaves: list) -> str:
        """The mode for this backend and argument structure, decided once (one trace of ``body``)."""
        key = (jax.default_backend(), jax.tree.structure((carry, xs)), tuple(np.shape(a)[1:] for a in leaves))
        if key not in self._modes:
            slow = loops_slow_down_convolutions() and has_convolution(
                self.body, carry, jax.tree.map(lambda a: a[0], xs)
            )
            self._modes[key] = "loop" if slow else "scan"  # even one step: XLA keeps a 1-trip loop
        return self._modes[key]


def scan_steps(body: Callable, mode: str = "auto") -> _StepLoop:
    """``jax.jit(lambda carry, xs: lax.scan(body, carry, xs))``, except where a loop would slow the
    body down: on a backend where :func:`loops_slow_down_convolutions` and a ``body`` that
    :func:`has_convolution`, the steps run as a Python loop over ``jax.jit(body)`` (one compiled
    step, one call per step; the same result up to rounding). Decided at the first call for each
    backend and argument structure (one extra trace of ``body`` on a CPU).

    Args:
      body: ``(carry, x) -> (carry, y)``, as for ``lax.scan``.
      mode: ``"auto"`` (above), or ``"scan"`` / ``"loop"`` to choose.

    Returns a callable ``(carry, xs) -> (carry, ys)`` with ``lax.scan``'s contract: ``xs`` stacked
    on a leading steps axis, ``ys`` stacked the same way. Its ``mode`` attribute is ``"scan"`` or
    ``"loop"`` after a call.

    Raises:
      ValueError: an unknown ``mode``; at the call, ``xs`` without arrays.
    """
    return _StepLoop(body, mode)


def train_scan(
    model: nnx.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    steps: int = 150,
    batch_size: int = 128,
    learning_rate: float = 1e-2,
    seed: int = 0,
) -> nnx.Module:
    """Trains ``model`` in place with Adam on random minibatches; the loop is one ``lax.scan``
    (:func:`scan_steps`: on a CPU, a model with convolutions runs one compiled step per call instead).

    One compilation per model, so even ResNet-56 trains in a few seconds on a CPU. No checkpoints,
    logging or resume: use :func:`research.train.fit` for real runs. BatchNorm statistics are updated (train mode); the model is left in eval mode.

    Args:
      model: the NNX model, updated in place and returned.
      x, y: training inputs and integer labels (host arrays; copied to the device once).
      steps: optimizer steps.
      batch_size: examples per step, drawn with replacement from ``seed``.
      learning_rate: Adam's learning rate.
      seed: seeds the minibatch indices.

    Raises:
      ValueError: non-positive ``steps`` or ``batch_size``.
    """
    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must be positive")
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(learning_rate)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(steps, batch_size))
    xs, ys = jnp.asarray(x), jnp.asarray(y)

    def body(carry, i):
        params, rest, opt_state = carry

        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest, copy=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(m(xs[i]), ys[i]).mean()
            return loss, nnx.split(m, nnx.Param, ...)[2]

        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), rest, opt_state), loss

    (params, rest, _), _ = scan_steps(body)((params, rest, tx.init(params)), idx)
    nnx.update(model, params, rest)
    model.eval()
    return model
