"""Pruning schedules: the target sparsity at each step and when masks are recomputed.

A schedule is a frozen dataclass with two traceable methods, ``sparsity(step)`` (the global
target at ``step``) and ``is_update_step(step)`` (whether masks are recomputed at ``step``), and a
``final_sparsity`` field. Layers with their own target (a :class:`SparsityRule` with a
``sparsity``) follow the same curve scaled to their target:
``layer_target(step) = rule.sparsity * sparsity(step) / final_sparsity``.

``values()`` returns the numbers ``sparsity`` computes with that depend on the target (as Python
computes them), and ``sparsity(step, values)`` accepts them as arrays: the pruning wrapper keeps them
in its optimizer state, so one compiled train step serves every target sparsity (the trials of a
``slimjax tune`` study) and computes exactly what the constants would.

References:
  Zhu & Gupta, "To prune, or not to prune", https://arxiv.org/abs/1710.01878
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from methods.pruning.masks import check_sparsity


def _check_steps(begin_step: int, end_step: int, frequency: int) -> None:
    if begin_step < 0:
        raise ValueError(f"begin_step={begin_step} must be >= 0")
    if end_step < begin_step:
        raise ValueError(f"end_step={end_step} is before begin_step={begin_step}; pass end_step >= begin_step")
    if frequency < 1:
        raise ValueError(f"frequency={frequency} must be >= 1 (steps between mask updates)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OneShot:
    """Prune to ``final_sparsity`` once, at ``step``; masks stay fixed afterwards."""

    final_sparsity: float
    step: int = 0

    def __post_init__(self):
        check_sparsity(self.final_sparsity, "final_sparsity")

    def values(self) -> dict[str, float]:
        """The target-dependent numbers of :meth:`sparsity` (see the module docstring)."""
        return {"final": self.final_sparsity}

    def sparsity(self, step: jax.Array, values: dict[str, jax.Array] | None = None) -> jax.Array:
        v = self.values() if values is None else values
        return jnp.where(step >= self.step, v["final"], 0.0).astype(jnp.float32)

    def is_update_step(self, step: jax.Array) -> jax.Array:
        return jnp.asarray(step) == self.step


@dataclasses.dataclass(frozen=True, kw_only=True)
class Constant:
    """Constant ``final_sparsity``, masks recomputed every ``frequency`` steps in [begin, end]."""

    final_sparsity: float
    begin_step: int = 0
    end_step: int = 0
    frequency: int = 100

    def __post_init__(self):
        check_sparsity(self.final_sparsity, "final_sparsity")
        _check_steps(self.begin_step, self.end_step, self.frequency)

    def values(self) -> dict[str, float]:
        """The target-dependent numbers of :meth:`sparsity` (see the module docstring)."""
        return {"final": self.final_sparsity}

    def sparsity(self, step: jax.Array, values: dict[str, jax.Array] | None = None) -> jax.Array:
        v = self.values() if values is None else values
        return jnp.where(step >= self.begin_step, v["final"], 0.0).astype(jnp.float32)

    def is_update_step(self, step: jax.Array) -> jax.Array:
        step = jnp.asarray(step)
        on = (step - self.begin_step) % self.frequency == 0
        return (step >= self.begin_step) & (step <= self.end_step) & on


@dataclasses.dataclass(frozen=True, kw_only=True)
class Iterative:
    """``num_rounds`` equal-rate rounds between ``begin_step`` and ``end_step``.

    Round ``r`` (1-based) prunes to ``1 - (1 - final_sparsity) ** (r / num_rounds)``, so each
    round removes the same fraction of the remaining weights (as iterative magnitude pruning).
    """

    final_sparsity: float
    num_rounds: int
    begin_step: int = 0
    end_step: int = 0

    def __post_init__(self):
        check_sparsity(self.final_sparsity, "final_sparsity")
        if self.num_rounds < 1:
            raise ValueError(f"num_rounds={self.num_rounds} must be >= 1")
        _check_steps(self.begin_step, self.end_step, 1)

    def _interval(self) -> int:
        if self.num_rounds == 1:
            return max(self.end_step - self.begin_step, 1)
        return max((self.end_step - self.begin_step) // (self.num_rounds - 1), 1)

    def _round(self, step):
        r = jnp.floor_divide(jnp.asarray(step) - self.begin_step, self._interval()) + 1
        return jnp.clip(jnp.where(jnp.asarray(step) >= self.begin_step, r, 0), 0, self.num_rounds)

    def values(self) -> dict[str, float]:
        """The target-dependent numbers of :meth:`sparsity` (see the module docstring)."""
        return {"kept": 1.0 - self.final_sparsity}

    def sparsity(self, step, values=None):
        v = self.values() if values is None else values
        r = self._round(step).astype(jnp.float32)
        return 1.0 - v["kept"] ** (r / self.num_rounds)

    def is_update_step(self, step):
        step = jnp.asarray(step)
        rel = step - self.begin_step
        return (
            (rel >= 0)
            & (rel % self._interval() == 0)
            & (self._round(step) <= self.num_rounds)
            & (rel // self._interval() < self.num_rounds)
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Polynomial:
    """Zhu & Gupta's gradual pruning.

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** power`` for ``t`` in
    ``{t0, t0 + dt, ..., t0 + n * dt}`` where ``t0 = begin_step``, ``t0 + n*dt = end_step`` and
    ``dt = frequency``; the sparsity is held between updates and after ``end_step``.
    """

    final_sparsity: float
    initial_sparsity: float = 0.0
    begin_step: int = 0
    end_step: int = 1000
    frequency: int = 100
    power: float = 3.0

    def __post_init__(self):
        check_sparsity(self.final_sparsity, "final_sparsity")
        check_sparsity(self.initial_sparsity, "initial_sparsity")
        _check_steps(self.begin_step, self.end_step, self.frequency)

    def values(self) -> dict[str, float]:
        """The target-dependent numbers of :meth:`sparsity` (see the module docstring)."""
        return {"final": self.final_sparsity, "delta": self.initial_sparsity - self.final_sparsity}

    def sparsity(self, step, values=None):
        v = self.values() if values is None else values
        step = jnp.asarray(step)
        # Held constant between updates: evaluate at the last update step at or before `step`.
        last = self.begin_step + (jnp.maximum(step - self.begin_step, 0) // self.frequency) * self.frequency
        last = jnp.minimum(last, self.end_step)
        span = max(self.end_step - self.begin_step, 1)
        frac = jnp.clip((last - self.begin_step) / span, 0.0, 1.0)
        s = v["final"] + v["delta"] * (1.0 - frac) ** self.power
        return jnp.where(step >= self.begin_step, s, 0.0).astype(jnp.float32)

    def is_update_step(self, step):
        step = jnp.asarray(step)
        rel = step - self.begin_step
        at_end = step == self.end_step
        return ((rel >= 0) & (step <= self.end_step) & (rel % self.frequency == 0)) | at_end


Schedule = OneShot | Constant | Iterative | Polynomial


def program_key(schedule: Schedule) -> tuple:
    """What ``schedule`` bakes into a compiled train step: its type and every field but
    ``final_sparsity`` (the pruning wrapper keeps the target-dependent numbers in its state)."""
    fields = tuple(
        (f.name, getattr(schedule, f.name)) for f in dataclasses.fields(schedule) if f.name != "final_sparsity"
    )
    return (type(schedule).__name__, fields, schedule.final_sparsity > 0)


def one_shot_schedule(final_sparsity: float, step: int = 0) -> OneShot:
    """Prune once to ``final_sparsity`` at ``step``."""
    return OneShot(final_sparsity=final_sparsity, step=step)


def constant_schedule(final_sparsity: float, begin_step: int = 0, end_step: int = 0, frequency: int = 100) -> Constant:
    """Constant sparsity; masks recomputed every ``frequency`` steps between begin and end."""
    return Constant(final_sparsity=final_sparsity, begin_step=begin_step, end_step=end_step, frequency=frequency)


def iterative_schedule(final_sparsity: float, num_rounds: int, begin_step: int = 0, end_step: int = 0) -> Iterative:
    """``num_rounds`` equal-rate pruning rounds spread over ``[begin_step, end_step]``."""
    return Iterative(
        final_sparsity=final_sparsity,
        num_rounds=num_rounds,
        begin_step=begin_step,
        end_step=end_step,
    )


def polynomial_schedule(
    final_sparsity: float,
    *,
    initial_sparsity: float = 0.0,
    begin_step: int = 0,
    end_step: int = 1000,
    frequency: int = 100,
    power: float = 3.0,
) -> Polynomial:
    """Zhu & Gupta's polynomial (cubic by default) sparsity ramp.

    Example:
      >>> s = polynomial_schedule(0.9, begin_step=0, end_step=100, frequency=10)
      >>> round(float(s.sparsity(100)), 3), round(float(s.sparsity(50)), 4)
      (0.9, 0.7875)

    References:
      Zhu & Gupta, "To prune, or not to prune", https://arxiv.org/abs/1710.01878
    """
    return Polynomial(
        final_sparsity=final_sparsity,
        initial_sparsity=initial_sparsity,
        begin_step=begin_step,
        end_step=end_step,
        frequency=frequency,
        power=power,
    )
