"""Observers: collect a tensor's range over calibration batches (host-side numpy).

An observer is fed arrays with :meth:`Observer.update` and returns ``(lo, hi)`` from
:meth:`Observer.range`, per tensor (scalars) or per channel along ``axis`` (``(C,)`` vectors).
Registered observers (:func:`register_observer`, :func:`make_observer`):

* ``"minmax"``: the smallest and largest value seen.
* ``"moving_average"``: an exponential moving average of each batch's min and max
  (``momentum`` 0.9; the first batch initialises it).
* ``"percentile"``: the ``100 - p`` and ``p`` percentiles (``p = 99.99``) of a uniform
  subsample of the values seen (at most ``max_samples`` per channel).
* ``"mse"``: the clipping range ``[c * lo, c * hi]`` minimising the mean squared quantization
  error at the target bit width, searched over ``c`` in ``(0, 1]`` on the subsample.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from methods.quantization import names as _names
from methods.quantization import quantizers as Q
from research.registry import Registry

# Created (with the built-in names declared) in the standard-library names module, so configs are checked before JAX.
OBSERVERS: Registry[type[Observer]] = _names.OBSERVERS


def register_observer(name: str) -> Callable[[type[Observer]], type[Observer]]:
    """Class decorator registering an :class:`Observer` under ``name``.

    Registering the same class again is a no-op.

    Raises:
      DuplicateNameError: another class is registered as ``name`` (a ``ValueError``).
    """

    def deco(cls):
        OBSERVERS.register(name, cls)
        cls.name = name
        return cls

    return deco


def list_observers() -> tuple[str, ...]:
    """Names of the registered observers."""
    return tuple(OBSERVERS.names())


def make_observer(
    name: str,
    *,
    axis: int | None = None,
    bits: int = 8,
    signed: bool | None = True,
    symmetric: bool = True,
    **options,
) -> Observer:
    """Builds the observer registered as ``name``.

    Args:
      name: a registered observer (see :func:`list_observers`).
      axis: channel axis for per-channel ranges (``None``: per tensor).
      bits: target bit width (used by ``"mse"``).
      signed: target grid signedness (``None``: decided from the data, used by ``"mse"``).
      symmetric: target zero point 0 (used by ``"mse"``).
      **options: observer-specific options (``momentum``, ``percentile``, ``max_samples``...).

    Raises:
      UnknownNameError: naming an unknown observer, the closest and all registered ones (a ``ValueError``).
    """
    return OBSERVERS.get(name)(axis=axis, bits=bits, signed=signed, symmetric=symmetric, **options)


class Observer:
    """Base observer. Subclasses implement :meth:`update` and :meth:`range`."""

    name: str

    def __init__(self, *, axis=None, bits=8, signed=True, symmetric=True):
        self.axis, self.bits, self.signed, self.symmetric = (
            axis,
            Q.check_bits(bits),
            signed,
            symmetric,
        )
        self.count = 0

    def _channels_first(self, x: np.ndarray) -> np.ndarray:
        """``x`` as ``(C, n)`` (per channel) or ``(1, n)`` (per tensor)."""
        x = np.asarray(x, np.float32)
        if self.axis is None:
            return x.reshape(1, -1)
        return np.moveaxis(x, Q.normalize_axis(self.axis, x.ndim), 0).reshape(x.shape[self.axis], -1)

    def _out(self, v: np.ndarray) -> np.ndarray:
        return v.reshape(()) if self.axis is None else v

    def update(self, x: np.ndarray) -> None:
        raise NotImplementedError

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        """``(lo, hi)``: scalars, or ``(C,)`` vectors per channel.

        Raises:
          RuntimeError: when nothing was observed.
        """
        raise NotImplementedError

    def _check_seen(self):
        if self.count == 0:
            raise RuntimeError(f"observer {self.name!r} has seen no data; feed it batches first")


@register_observer("minmax")
class MinMaxObserver(Observer):
    """Running minimum and maximum."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.lo = self.hi = None

    def update(self, x):
        x = self._channels_first(x)
        lo, hi = x.min(axis=1), x.max(axis=1)
        self.lo = lo if self.lo is None else np.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else np.maximum(self.hi, hi)
        self.count += 1

    def range(self):
        self._check_seen()
        return self._out(self.lo), self._out(self.hi)


@register_observer("moving_average")
class MovingAverageObserver(Observer):
    """Exponential moving average of per-batch minima and maxima."""

    def __init__(self, *, momentum: float = 0.9, **kw):
        super().__init__(**kw)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum} must lie in [0, 1)")
        self.momentum = momentum
        self.lo = self.hi = None

    def update(self, x):
        x = self._channels_first(x)
        lo, hi = x.min(axis=1), x.max(axis=1)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            m = self.momentum
            self.lo = m * self.lo + (1 - m) * lo
            self.hi = m * self.hi + (1 - m) * hi
        self.count += 1

    def range(self):
        self._check_seen()
        return self._out(self.lo), self._out(self.hi)


class _SampleObserver(Observer):
    """Keeps a uniform random subsample of at most ``max_samples`` values per channel."""

    def __init__(self, *, max_samples: int = 65536, seed: int = 0, **kw):
        super().__init__(**kw)
        self.max_samples = max_samples
        self._rng = np.random.default_rng(seed)
        self._chunks: list[np.ndarray] = []
        self._lo = self._hi = None

    def update(self, x):
        x = self._channels_first(x)
        lo, hi = x.min(axis=1), x.max(axis=1)
        self._lo = lo if self._lo is None else np.minimum(self._lo, lo)
        self._hi = hi if self._hi is None else np.maximum(self._hi, hi)
        self._chunks.append(x)
        self.count += 1
        data = np.concatenate(self._chunks, axis=1)
        if data.shape[1] > self.max_samples:
            keep = self._rng.choice(data.shape[1], self.max_samples, replace=False)
            data = data[:, np.sort(keep)]
        self._chunks = [data]

    def samples(self) -> np.ndarray:
        self._check_seen()
        return self._chunks[0]


@register_observer("percentile")
class PercentileObserver(_SampleObserver):
    """Percentile range: ``[pct(100 - p), pct(p)]`` of the observed values."""

    def __init__(self, *, percentile: float = 99.99, **kw):
        super().__init__(**kw)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile={percentile} must lie in (50, 100]")
        self.percentile = percentile

    def range(self):
        data = self.samples()
        lo = np.percentile(data, 100.0 - self.percentile, axis=1)
        hi = np.percentile(data, self.percentile, axis=1)
        return self._out(lo.astype(np.float32)), self._out(hi.astype(np.float32))


@register_observer("mse")
class MSEObserver(_SampleObserver):
    """MSE-optimal clipping: the range ``c * [lo, hi]`` minimising ``E[(x - fq(x))^2]``.

    ``c`` is searched over ``num_candidates`` values in ``[min_ratio, 1]``, per channel.
    """

    def __init__(self, *, num_candidates: int = 100, min_ratio: float = 0.1, **kw):
        super().__init__(**kw)
        self.ratios = np.linspace(min_ratio, 1.0, num_candidates, dtype=np.float32)

    def range(self):
        data = self.samples()  # (C, n)
        lo, hi = np.minimum(self._lo, 0.0), np.maximum(self._hi, 0.0)
        signed = bool(np.min(lo) < 0) if self.signed is None else self.signed
        qmin, qmax = Q.qrange(self.bits, signed)
        best_err = np.full(data.shape[0], np.inf, np.float32)
        best_lo, best_hi = lo.copy(), hi.copy()
        for c in self.ratios:
            clo, chi = c * lo, c * hi
            if self.symmetric:
                bound = np.maximum(-clo, chi) if signed else chi
                scale = np.maximum(bound / qmax, 1e-8)
                zp = np.zeros_like(scale)
            else:
                scale = np.maximum((chi - clo) / (qmax - qmin), 1e-8)
                zp = np.clip(np.round(qmin - clo / scale), qmin, qmax)
            s, z = scale[:, None], zp[:, None]
            deq = (np.clip(np.round(data / s) + z, qmin, qmax) - z) * s
            err = np.mean((deq - data) ** 2, axis=1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_lo, best_hi = np.where(better, clo, best_lo), np.where(better, chi, best_hi)
        return self._out(best_lo.astype(np.float32)), self._out(best_hi.astype(np.float32))
