"""Rank selection: kept energy, parameter/FLOP budgets, and empirical variational Bayes (EVBMF).

Costs are analytical and per example: parameters (bias included) and FLOPs = 2 x multiply-adds
of the layer's matrix products/convolutions, given the spatial size of its input and output.

References:
  Nakajima, Tomioka, Sugiyama, Babacan, "Global analytic solution of fully-observed variational
  Bayesian matrix factorization", JMLR 14 (2013).
  Kim et al., https://arxiv.org/abs/1511.06530 (VBMF ranks for Tucker-2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Literal

import numpy as np

from methods.decomposition.decompose import cp_max_rank
from methods.decomposition.decompose import mode_unfold

Method = Literal["svd", "cp", "tucker2"]
Rank = int | tuple[int, int]


# ----------------------------------------------------------------------------- costs


def dense_cost(
    kernel_shape: Sequence[int],
    *,
    in_spatial: Sequence[int] = (),
    out_spatial: Sequence[int] = (),
    bias: bool = True,
) -> tuple[int, int]:
    """``(params, flops)`` of a dense linear ``(in, out)`` or conv ``(*k, cin, cout)`` kernel.

    For a linear layer ``out_spatial`` is the product of extra token dims (empty for ``(B, in)``).
    """
    shape = tuple(int(d) for d in kernel_shape)
    positions = math.prod(out_spatial) if out_spatial else 1
    params = math.prod(shape) + (shape[-1] if bias else 0)
    return params, 2 * positions * math.prod(shape)


def factorized_cost(
    method: Method,
    kernel_shape: Sequence[int],
    rank: Rank,
    *,
    in_spatial: Sequence[int] = (),
    out_spatial: Sequence[int] = (),
    bias: bool = True,
) -> tuple[int, int]:
    """``(params, flops)`` of the factorized form of a kernel at ``rank`` (see module docstring)."""
    shape = tuple(int(d) for d in kernel_shape)
    cin, cout = shape[-2:]
    k = shape[:-2]
    b = cout if bias else 0
    pin = math.prod(in_spatial) if in_spatial else 1
    pout = math.prod(out_spatial) if out_spatial else 1
    if method == "svd":
        r = int(rank)
        if len(shape) == 2:
            return r * (cin + cout) + b, 2 * pout * r * (cin + cout)
        return r * (cin * math.prod(k) + cout) + b, 2 * pout * r * (cin * math.prod(k) + cout)
    if method == "tucker2":
        r1, r2 = rank
        params = cin * r1 + math.prod(k) * r1 * r2 + r2 * cout + b
        return params, 2 * (pin * cin * r1 + pout * math.prod(k) * r1 * r2 + pout * r2 * cout)
    if method == "cp":
        r = int(rank)
        params = r * (cin + sum(k) + cout) + b
        flops = pin * cin * r + pout * r * cout
        spatial = list(in_spatial) if in_spatial else [1] * len(k)
        for a, ka in enumerate(k):
            if out_spatial:
                spatial[a] = out_spatial[a]
            flops += math.prod(spatial) * ka * r
        return params, 2 * flops
    raise ValueError(f"method={method!r} is not one of 'svd', 'cp', 'tucker2'")


def max_rank(method: Method, kernel_shape: Sequence[int]) -> Rank:
    """The largest allowed rank: ``min(in, out)`` (svd), ``(cin, cout)`` (tucker2), the CP bound."""
    shape = tuple(int(d) for d in kernel_shape)
    if method == "svd":
        return min(shape[-2], shape[-1]) if len(shape) == 2 else min(math.prod(shape[:-1]), shape[-1])
    if method == "tucker2":
        return (shape[-2], shape[-1])
    if method == "cp":
        return cp_max_rank(shape)
    raise ValueError(f"method={method!r} is not one of 'svd', 'cp', 'tucker2'")


def check_rank(method: Method, kernel_shape: Sequence[int], rank: Rank, where: str = "") -> Rank:
    """Validates ``rank`` against :func:`max_rank`; returns it normalised (int or pair).

    Raises:
      ValueError: naming the layer, the rank and the allowed maximum.
    """
    top = max_rank(method, kernel_shape)
    at = f" at {where!r}" if where else ""
    if method == "tucker2":
        if isinstance(rank, int):
            rank = (rank, rank)
        rank = tuple(int(r) for r in rank)
        if len(rank) != 2 or not all(1 <= r <= t for r, t in zip(rank, top, strict=False)):
            raise ValueError(
                f"tucker2 ranks={rank}{at} exceed the maximum {top} (input, output channels) of kernel "
                f"{tuple(kernel_shape)}; pass ranks with 1 <= r_in <= {top[0]} and 1 <= r_out <= {top[1]}"
            )
        return rank
    if not isinstance(rank, (int, np.integer)):
        raise ValueError(f"{method} rank{at} must be an int, got {rank!r}")
    if not 1 <= int(rank) <= top:
        raise ValueError(
            f"{method} rank={rank}{at} is above the maximum {top} for kernel {tuple(kernel_shape)}; "
            f"pass a rank in 1..{top}"
        )
    return int(rank)


# ----------------------------------------------------------------------------- EVBMF


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))


def _evb_objective(sigma2: float, L: int, M: int, s: np.ndarray, residual: float, xubar: float) -> float:
    H = len(s)
    alpha = L / M
    x = s**2 / (M * sigma2)
    z1 = x[x > xubar]
    z2 = x[x <= xubar]
    tau_z1 = _tau(z1, alpha)
    term1 = np.sum(z2 - np.log(z2))
    term2 = np.sum(z1 - tau_z1)
    term3 = np.sum(np.log((tau_z1 + 1) / z1))
    term4 = alpha * np.sum(np.log(tau_z1 / alpha + 1))
    return float(term1 + term2 + term3 + term4 + residual / (M * sigma2) + (L - H) * np.log(sigma2))


def evbmf(y: np.ndarray, sigma2: float | None = None) -> tuple[int, np.ndarray, float]:
    """Empirical variational Bayesian matrix factorization (global analytic solution).

    The noise variance is estimated by minimising the EVB free energy over its analytic bounds
    (``sigma2=None``; the search runs over ``log sigma2`` so that the result is invariant to the
    scale of ``y``: ``evbmf(c y)`` gives the same rank and ``c**2`` times the variance).
    Components whose singular value exceeds the EVB threshold
    ``sqrt(M sigma2 (1 + tau) (1 + alpha / tau))`` are kept, ``tau = 2.5129 sqrt(alpha)`` (the
    approximation Nakajima et al. use; within 1% of the exact threshold for ``alpha >= 0.05``).

    Args:
      y: an ``(L, M)`` matrix (transposed internally so that ``L <= M``).
      sigma2: the noise variance, or ``None`` to estimate it.

    Returns:
      ``(rank, shrunk_singular_values (rank,), sigma2)``.

    References:
      Nakajima et al., JMLR 14 (2013), Theorem and Algorithm for EVBMF.
    """
    from scipy.optimize import minimize_scalar

    y = np.asarray(y, np.float64)
    if y.ndim != 2:
        raise ValueError(f"evbmf needs a matrix, got shape {y.shape}")
    if y.shape[0] > y.shape[1]:
        y = y.T
    L, M = y.shape
    H = L
    alpha = L / M
    tauubar = 2.5129 * math.sqrt(alpha)
    s = np.linalg.svd(y, compute_uv=False)[:H]
    residual = 0.0  # H == L: the SVD keeps all the energy
    if sigma2 is None:
        xubar = (1 + tauubar) * (1 + alpha / tauubar)
        eh_ub = int(min(math.ceil(L / (1 + alpha)) - 1, H)) - 1
        upper = (np.sum(s**2) + residual) / (L * M)
        idx = min(max(eh_ub + 1, 0), H - 1)
        lower = max(s[idx] ** 2 / (M * xubar), float(np.mean(s[idx:] ** 2)) / M)
        if not upper > lower:
            lower = upper * 1e-6
        # Minimise over log(sigma2): the bounded search's tolerance is absolute, so in sigma2
        # itself it would depend on the scale of ``y`` (small trained weights lost the noise
        # estimate to the tolerance); in log space it is a relative tolerance.
        res = minimize_scalar(
            lambda t: _evb_objective(math.exp(t), L, M, s, residual, xubar),
            bounds=(math.log(lower), math.log(upper)),
            method="bounded",
            options={"xatol": 1e-8},
        )
        sigma2 = math.exp(float(res.x))
    threshold = math.sqrt(M * sigma2 * (1 + tauubar) * (1 + alpha / tauubar))
    pos = int(np.sum(s > threshold))
    sp = s[:pos]
    d = (
        sp
        / 2
        * (1 - (L + M) * sigma2 / sp**2 + np.sqrt((1 - (L + M) * sigma2 / sp**2) ** 2 - 4 * L * M * sigma2**2 / sp**4))
    )
    return pos, d, sigma2


# ----------------------------------------------------------------------------- selection


def energy_rank(singular_values: np.ndarray, energy: float) -> int:
    """Smallest ``r`` whose top-``r`` singular values keep ``energy`` of the squared sum."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy={energy} is outside (0, 1]; pass the fraction of energy to keep")
    s2 = np.asarray(singular_values, np.float64) ** 2
    total = s2.sum()
    if total <= 0:
        return 1
    kept = np.cumsum(s2) / total
    return int(min(np.searchsorted(kept, energy - 1e-12) + 1, len(s2)))


def _channel_spectra(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    nd = kernel.ndim - 2
    s_in = np.linalg.svd(mode_unfold(kernel, nd).astype(np.float64), compute_uv=False)
    s_out = np.linalg.svd(mode_unfold(kernel, nd + 1).astype(np.float64), compute_uv=False)
    return s_in, s_out


def _as_matrix(kernel: np.ndarray) -> np.ndarray:
    return kernel if kernel.ndim == 2 else kernel.reshape(-1, kernel.shape[-1])


def energy_spectra(kernel: np.ndarray, method: Method) -> tuple[np.ndarray, ...]:
    """The singular values an ``energy`` criterion reads: the kernel matrix's (svd), or both channel
    unfoldings' (tucker2). Compute them once to select ranks at many energies
    (:func:`rank_at_energy`), as a budget's bisection does.

    Raises:
      ValueError: ``method="cp"`` (energy is not defined for it).
    """
    kernel = np.asarray(kernel)
    if method == "svd":
        return (np.linalg.svd(_as_matrix(kernel).astype(np.float64), compute_uv=False),)
    if method == "tucker2":
        return _channel_spectra(kernel)
    raise ValueError("energy is not defined for method='cp'; use rank, param_ratio or flop_ratio")


def rank_at_energy(spectra: tuple[np.ndarray, ...], energy: float) -> Rank:
    """The rank that keeps ``energy`` of :func:`energy_spectra`'s values: an int (svd) or a pair (tucker2)."""
    ranks = tuple(energy_rank(s, energy) for s in spectra)
    return ranks[0] if len(ranks) == 1 else ranks


def _largest_feasible(candidates: Sequence[Rank], cost: Callable[[Rank], float], budget: float) -> Rank | None:
    """The last candidate (costs increase along the list) with cost <= budget (bisection)."""
    lo, hi = 0, len(candidates) - 1
    if cost(candidates[0]) > budget:
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(candidates[mid]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return candidates[lo]


def rank_candidates(method: Method, kernel_shape: Sequence[int]) -> list[Rank]:
    """Ranks in increasing cost order: ``1..max`` (svd, cp) or channel-proportional pairs (tucker2)."""
    top = max_rank(method, kernel_shape)
    if method != "tucker2":
        return list(range(1, top + 1))
    cin, cout = top
    if cin <= cout:
        return [(r, max(1, min(cout, round(r * cout / cin)))) for r in range(1, cin + 1)]
    return [(max(1, min(cin, round(r * cin / cout))), r) for r in range(1, cout + 1)]


def select_rank(
    kernel: np.ndarray,
    method: Method,
    *,
    rank: Rank | None = None,
    energy: float | None = None,
    param_ratio: float | None = None,
    flop_ratio: float | None = None,
    vbmf: bool = False,
    in_spatial: Sequence[int] = (),
    out_spatial: Sequence[int] = (),
    bias: bool = True,
    where: str = "",
) -> Rank:
    """Chooses the rank of one layer's factorization by exactly one criterion.

    Args:
      kernel: the dense kernel, ``(in, out)`` or ``(*k, cin, cout)``.
      method: ``"svd"`` (linear; a conv kernel is treated as ``(prod(k) cin, cout)``), ``"cp"``
        or ``"tucker2"`` (convolutions).
      rank: a fixed rank (an int, or ``(r_in, r_out)`` for tucker2); checked against the maximum.
      energy: keep this fraction of the squared singular values (svd; tucker2 per channel
        unfolding). Not defined for cp.
      param_ratio: the largest rank whose parameters are at most this fraction of the dense ones.
      flop_ratio: the same for FLOPs (needs ``in_spatial``/``out_spatial`` for convolutions).
      vbmf: EVBMF rank of the matrix (svd) or of both channel unfoldings (tucker2, Kim et al.).
      in_spatial, out_spatial: spatial size of the layer's input and output (convolutions).
      bias: whether the layer has a bias (counted in parameters).
      where: the layer path, for error messages.

    Returns:
      An int rank, or ``(r_in, r_out)`` for tucker2.

    Raises:
      ValueError: no criterion or several, a criterion that does not apply to ``method``, a rank
        above the maximum, or a budget that even rank 1 exceeds.

    Example:
      >>> w = np.diag([3.0, 2.0, 1.0, 0.0])
      >>> select_rank(w, "svd", energy=0.9)
      2
    """
    kernel = np.asarray(kernel)
    given = {
        "rank": rank is not None,
        "energy": energy is not None,
        "param_ratio": param_ratio is not None,
        "flop_ratio": flop_ratio is not None,
        "vbmf": bool(vbmf),
    }
    chosen = [k for k, v in given.items() if v]
    at = f" for {where!r}" if where else ""
    if len(chosen) != 1:
        raise ValueError(
            f"select_rank{at} needs exactly one of rank, energy, param_ratio, flop_ratio, vbmf; got {chosen}"
        )
    shape = kernel.shape
    if rank is not None:
        return check_rank(method, shape, rank, where)
    if energy is not None:
        if method == "cp":
            raise ValueError(f"energy{at} is not defined for method='cp'; use rank, param_ratio or flop_ratio")
        return rank_at_energy(energy_spectra(kernel, method), energy)
    if vbmf:
        if method == "svd":
            return max(1, evbmf(_as_matrix(kernel))[0])
        if method == "tucker2":
            nd = kernel.ndim - 2
            return (
                max(1, evbmf(mode_unfold(kernel, nd))[0]),
                max(1, evbmf(mode_unfold(kernel, nd + 1))[0]),
            )
        raise ValueError(f"vbmf{at} applies to svd and tucker2 (Kim et al.); for cp use rank or a budget")
    ratio, index = (param_ratio, 0) if param_ratio is not None else (flop_ratio, 1)
    if not ratio > 0:
        raise ValueError(f"{chosen[0]}={ratio}{at} must be positive")
    kw = {"in_spatial": in_spatial, "out_spatial": out_spatial, "bias": bias}
    budget = ratio * dense_cost(shape, **kw)[index]
    cands = rank_candidates(method, shape)
    if method == "cp":  # the CP bound is huge; costs are linear in R so cap at the budget first
        per = factorized_cost("cp", shape, 2, **kw)[index] - factorized_cost("cp", shape, 1, **kw)[index]
        cands = cands[: max(1, min(len(cands), int(budget // max(per, 1)) + 1))]
    best = _largest_feasible(cands, lambda r: factorized_cost(method, shape, r, **kw)[index], budget)
    if best is None:
        raise ValueError(
            f"{chosen[0]}={ratio}{at} is below what rank 1 costs for kernel {shape} ({method}); "
            "raise the ratio or leave the layer dense"
        )
    return best
