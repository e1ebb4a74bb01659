"""Acquisition functions for minimisation, registered by name.

Each function maps the posterior mean and standard deviation of the (standardised)
loss and the best loss seen so far to a score to *maximise*.

References:
  Jones, Schonlau and Welch (1998), Efficient global optimization of expensive
  black-box functions (EI). https://doi.org/10.1023/A:1008306431147
  Ament et al. (2023), Unexpected improvements to expected improvement for Bayesian
  optimization (log-EI). https://arxiv.org/abs/2310.20708
  Srinivas et al. (2010), Gaussian process optimization in the bandit setting (UCB).
  https://arxiv.org/abs/0912.3995
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr
from jax.scipy.special import ndtr

from research.registry import Registry

__all__ = [
    "ACQUISITIONS",
    "expected_improvement",
    "get_acquisition",
    "list_acquisitions",
    "log_expected_improvement",
    "probability_of_improvement",
    "register_acquisition",
    "upper_confidence_bound",
]

AcquisitionFn = Callable[..., jax.Array]
ACQUISITIONS: Registry[AcquisitionFn] = Registry("acquisition", hint="register one with @register_acquisition('name')")


def register_acquisition(name: str) -> Callable[[AcquisitionFn], AcquisitionFn]:
    """Decorator registering ``fn(mean, std, best, **kw)`` under ``name``.

    Raises:
      DuplicateNameError: If another function is registered as ``name`` (a ``ValueError``).
    """
    return ACQUISITIONS.register(name)


def get_acquisition(name: str) -> AcquisitionFn:
    """The acquisition registered as ``name``.

    Raises:
      UnknownNameError: Naming the closest and all registered acquisitions (a ``KeyError``).
    """
    return ACQUISITIONS.get(name)


def list_acquisitions() -> list[str]:
    """Names of the registered acquisitions."""
    return ACQUISITIONS.names()


_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _h(z):
    """``h(z) = phi(z) + z * Phi(z)``, so that ``EI = sigma * h(z)``."""
    return jnp.exp(-0.5 * z * z) * _INV_SQRT_2PI + z * ndtr(z)


@register_acquisition("ei")
def expected_improvement(mean, std, best, xi: float = 0.0):
    """``E[max(best - xi - f, 0)]`` for ``f ~ N(mean, std^2)``."""
    z = (best - xi - mean) / std
    return std * _h(z)


def _log_h(z):
    """``log h(z)``, accurate for very negative ``z`` (asymptotic series below -6)."""
    zs = jnp.where(z > -6.0, z, -6.0)
    direct = jnp.log(jnp.maximum(_h(zs), 1e-300))
    zt = jnp.where(z <= -6.0, z, -7.0)
    inv = 1.0 / (zt * zt)
    series = 1.0 - 3 * inv + 15 * inv**2 - 105 * inv**3 + 945 * inv**4 - 10395 * inv**5
    asym = -0.5 * zt * zt - _LOG_SQRT_2PI - 2.0 * jnp.log(-zt) + jnp.log(series)
    return jnp.where(z > -6.0, direct, asym)


@register_acquisition("logei")
def log_expected_improvement(mean, std, best, xi: float = 0.0):
    """``log EI`` without underflow far from the incumbent (Ament et al., 2023)."""
    z = (best - xi - mean) / std
    return _log_h(z) + jnp.log(std)


@register_acquisition("pi")
def probability_of_improvement(mean, std, best, xi: float = 0.0):
    """``log P(f < best - xi)`` (the log keeps gradients alive far from the incumbent)."""
    return log_ndtr((best - xi - mean) / std)


@register_acquisition("ucb")
def upper_confidence_bound(mean, std, best, beta: float = 2.0):
    """``-(mean - sqrt(beta) * std)``: the lower confidence bound of the loss, negated."""
    del best
    return -(mean - math.sqrt(beta) * std)
