"""Kernel decompositions (numpy + tensorly, float64) that initialise the factorized layers.

These run once, outside ``jit``, on trained weights: truncated SVD of a linear kernel, CP
(``tensorly.decomposition.parafac``) and partial Tucker over the two channel modes
(``tensorly.decomposition.partial_tucker``) of a convolution kernel ``(*k, cin, cout)``.
tensorly runs on its numpy backend; the results are plain numpy arrays.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np


def _tl():
    import tensorly as tl

    if tl.get_backend() != "numpy":
        raise RuntimeError(
            f"tensorly backend is {tl.get_backend()!r}; slimjax decomposes on the numpy backend, "
            "call tensorly.set_backend('numpy')"
        )
    return tl


def cp_max_rank(shape: Sequence[int]) -> int:
    """An upper bound on the CP rank of a tensor: the product of all dimensions but the largest."""
    dims = sorted(int(d) for d in shape)
    return int(math.prod(dims[:-1]))


def svd_factors(kernel: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits ``kernel (in, out)`` into ``U sqrt(S): (in, rank)`` and ``sqrt(S) V^T: (rank, out)``.

    The SVD is tensorly's ``svd_interface`` (truncated SVD with sign flipping), so the factors
    are those of tensorly for the same matrix.

    Raises:
      ValueError: ``rank`` outside ``1..min(in, out)``.
    """
    tl = _tl()
    kernel = np.asarray(kernel, np.float64)
    if kernel.ndim != 2:
        raise ValueError(f"svd_factors needs a 2-D kernel, got shape {kernel.shape}")
    if not 1 <= rank <= min(kernel.shape):
        raise ValueError(
            f"rank={rank} is outside 1..{min(kernel.shape)} for a kernel of shape {kernel.shape}; "
            "pass a rank in that range"
        )
    u, s, vt = tl.svd_interface(kernel, n_eigenvecs=rank)
    root = np.sqrt(s)
    return u * root[None, :], root[:, None] * vt


def balance_cp_factors(factors: Sequence[np.ndarray], weights: np.ndarray | None = None) -> list[np.ndarray]:
    """Spreads each CP component's weight evenly over its factors (equal column norms).

    Component ``r`` of ``weights[r] f0[:, r] (x) ... (x) f_last[:, r]`` has magnitude
    ``p_r = |weights[r]| prod_m ||f_m[:, r]||``; every factor column is rescaled to norm
    ``p_r ** (1 / n_factors)`` (the sign of ``weights[r]`` goes to the last factor), so the
    product, and hence the tensor, is unchanged. ALS leaves the column norms arbitrary (on a
    weight-decayed conv kernel they differ by ~1000x), and plain SGD on such factors takes steps
    that are huge relative to the small ones; balanced factors are the standard CP scaling.
    A component with an all-zero column is returned as all-zero columns.

    Args:
      factors: ``factors[m]`` of shape ``(dim_m, rank)``.
      weights: ``(rank,)`` CP weights, folded in (default: all ones).

    Returns:
      The balanced factors (float64), same shapes.

    Raises:
      ValueError: factors with different ranks or ``weights`` of the wrong length.

    Example:
      >>> f = [np.array([[1e-3], [0.0]]), np.array([[2e3], [0.0]])]
      >>> [round(float(np.linalg.norm(b)), 6) for b in balance_cp_factors(f)]
      [1.414214, 1.414214]
    """
    factors = [np.asarray(f, np.float64) for f in factors]
    ranks = {f.shape[1] for f in factors}
    if len(ranks) != 1:
        raise ValueError(f"CP factors have ranks {[f.shape[1] for f in factors]}; all must share one rank")
    (rank,) = ranks
    weights = np.ones(rank) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    if weights.shape != (rank,):
        raise ValueError(f"weights of shape {weights.shape} for rank {rank}; pass one weight per component")
    norms = np.stack([np.linalg.norm(f, axis=0) for f in factors])  # (n_factors, rank)
    magnitude = np.abs(weights) * np.prod(norms, axis=0)
    target = magnitude ** (1.0 / len(factors))
    alive = magnitude > 0
    scale = np.where(alive, target / np.where(norms > 0, norms, 1.0), 0.0)  # (n_factors, rank)
    out = [f * s[None, :] for f, s in zip(factors, scale, strict=True)]
    out[-1] = out[-1] * np.where(weights < 0, -1.0, 1.0)[None, :]
    return out


def cp_factors(
    kernel: np.ndarray,
    rank: int,
    *,
    n_iter_max: int = 200,
    init: str = "svd",
    tol: float = 1e-8,
    random_state: int = 0,
    balance: bool = True,
) -> list[np.ndarray]:
    """CP decomposition of a convolution kernel ``(*k, cin, cout)`` with tensorly's ``parafac``.

    ``kernel ~ sum_r f0[:, r] (x) f1[:, r] (x) ... (x) f_last[:, r]`` with the CP weights folded
    into the factors. With ``balance`` (default) each component's weight is spread evenly over
    its factors (:func:`balance_cp_factors`: equal column norms, the same product), so
    gradient-descent fine-tuning sees well-scaled factors; ``balance=False`` returns tensorly's
    factors with the weights folded into the last (``cout``) factor.

    Returns:
      One factor per kernel mode, ``factors[m]`` of shape ``(kernel.shape[m], rank)``.

    Raises:
      ValueError: ``rank`` outside ``1..cp_max_rank(kernel.shape)``.

    References:
      Lebedev et al., https://arxiv.org/abs/1412.6553
    """
    from tensorly.decomposition import parafac

    _tl()
    kernel = np.asarray(kernel, np.float64)
    bound = cp_max_rank(kernel.shape)
    if not 1 <= rank <= bound:
        raise ValueError(f"rank={rank} is outside 1..{bound} for a CP kernel of shape {kernel.shape}")
    with warnings.catch_warnings():  # SVD init pads ranks above a mode size with random columns
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        weights, factors = parafac(kernel, rank, n_iter_max=n_iter_max, init=init, tol=tol, random_state=random_state)
    factors = [np.asarray(f) for f in factors]
    if balance:
        return balance_cp_factors(factors, np.asarray(weights))
    factors[-1] = factors[-1] * np.asarray(weights)[None, :]
    return factors


def tucker2_factors(
    kernel: np.ndarray,
    ranks: Sequence[int],
    *,
    n_iter_max: int = 100,
    tol: float = 1e-4,
    random_state: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Partial Tucker (HOOI, SVD init) of ``kernel (*k, cin, cout)`` over the channel modes.

    Returns:
      ``(core (*k, r_in, r_out), u_in (cin, r_in), u_out (cout, r_out))`` with orthonormal
      columns in ``u_in`` and ``u_out``; ``kernel ~ core x_cin u_in x_cout u_out``.

    Raises:
      ValueError: a rank outside ``1..cin`` / ``1..cout``.

    References:
      Kim et al., https://arxiv.org/abs/1511.06530
    """
    from tensorly.decomposition import partial_tucker

    _tl()
    kernel = np.asarray(kernel, np.float64)
    nd = kernel.ndim - 2
    r_in, r_out = (int(r) for r in ranks)
    cin, cout = kernel.shape[-2:]
    if not (1 <= r_in <= cin and 1 <= r_out <= cout):
        raise ValueError(
            f"ranks={(r_in, r_out)} are outside 1..{cin} x 1..{cout} for a kernel of shape "
            f"{kernel.shape}; pass ranks within the channel counts"
        )
    with warnings.catch_warnings():  # a rank above an unfolding's size is padded by tensorly
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        (core, (u_in, u_out)), _ = partial_tucker(
            kernel,
            rank=[r_in, r_out],
            modes=[nd, nd + 1],
            n_iter_max=n_iter_max,
            tol=tol,
            init="svd",
            random_state=random_state,
        )
    return np.asarray(core), np.asarray(u_in), np.asarray(u_out)


def cp_reconstruct(factors: Sequence[np.ndarray]) -> np.ndarray:
    """The full tensor of CP ``factors`` (weights already folded in)."""
    letters = "abcdefgh"[: len(factors)]
    return np.einsum(",".join(f"{c}r" for c in letters) + "->" + letters, *factors)


def tucker2_reconstruct(core: np.ndarray, u_in: np.ndarray, u_out: np.ndarray) -> np.ndarray:
    """The full kernel of a Tucker-2 decomposition."""
    return np.einsum("...ab,sa,tb->...st", core, u_in, u_out)


def relative_error(original: np.ndarray, approx: np.ndarray) -> float:
    """``||original - approx||_F / ||original||_F`` (0 for an all-zero original equal to approx)."""
    original = np.asarray(original, np.float64)
    diff = float(np.linalg.norm(original - np.asarray(approx, np.float64)))
    norm = float(np.linalg.norm(original))
    return diff / norm if norm > 0 else diff


def mode_unfold(kernel: np.ndarray, mode: int) -> np.ndarray:
    """The mode-``mode`` unfolding: ``(shape[mode], prod(other dims))``."""
    kernel = np.asarray(kernel)
    return np.moveaxis(kernel, mode, 0).reshape(kernel.shape[mode], -1)
