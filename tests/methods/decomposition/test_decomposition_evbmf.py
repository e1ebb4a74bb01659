"""EVBMF against Nakajima et al. (2013) and the Tucker-2 rank selection of Kim et al. (2016).

References:
  Nakajima, Tomioka, Sugiyama, Babacan, JMLR 14 (2013), https://jmlr.org/papers/v14/nakajima13a.html
  Kim et al., https://arxiv.org/abs/1511.06530
"""

import numpy as np
import pytest
from scipy.optimize import brentq

from methods.decomposition import evbmf
from methods.decomposition import select_rank
from methods.decomposition.rank import _evb_objective


def _orthonormal(rng, n, r):
    return np.linalg.qr(rng.normal(size=(n, r)))[0]


def _tucker2_kernel(rng, cin, cout, r_in, r_out, scale):
    """A kernel (3, 3, cin, cout) of exact Tucker-2 ranks (r_in, r_out), Frobenius norm ``scale``."""
    core = rng.normal(size=(3, 3, r_in, r_out))
    k = np.einsum("hwab,sa,tb->hwst", core, _orthonormal(rng, cin, r_in), _orthonormal(rng, cout, r_out))
    return scale * k / np.linalg.norm(k)


def _exact_tau(alpha):
    """Zero of log(t + 1) + alpha log(t / alpha + 1) - t (t > 0); ~2.5129 sqrt(alpha)."""
    return brentq(lambda t: np.log(t + 1) + alpha * np.log(t / alpha + 1) - t, 1e-9, 100.0)


@pytest.mark.parametrize("L, M", [(40, 40), (32, 576), (64, 288)])
def test_evb_threshold_and_shrinkage_follow_the_global_solution(L, M):
    """Given sigma2, the rank is the count of singular values above the EVB threshold and the
    kept ones are shrunk by the closed form of Nakajima et al. (2013)."""
    rng = np.random.default_rng(0)
    alpha = L / M
    sigma2 = 0.01
    tau = _exact_tau(alpha)
    threshold = np.sqrt(M * sigma2 * (1 + tau) * (1 + alpha / tau))
    # singular values well clear of the threshold on both sides
    s = np.sort(np.concatenate([threshold * np.array([3.0, 2.0, 1.4]), threshold * rng.uniform(0.1, 0.9, L - 3)]))[::-1]
    y = _orthonormal(rng, L, L) @ np.diag(s) @ _orthonormal(rng, M, L).T
    rank, d, got_sigma2 = evbmf(y, sigma2=sigma2)
    assert rank == 3 and got_sigma2 == sigma2
    sp = s[:3]
    q = 1 - (L + M) * sigma2 / sp**2
    expected = sp / 2 * (q + np.sqrt(q**2 - 4 * L * M * sigma2**2 / sp**4))
    np.testing.assert_allclose(d, expected, rtol=1e-8)
    assert np.all(d < sp)
    # the 2.5129 sqrt(alpha) approximation of the threshold's tau is within 1% of the exact one
    approx = 2.5129 * np.sqrt(alpha)
    ratio = np.sqrt((1 + approx) * (1 + alpha / approx) / ((1 + tau) * (1 + alpha / tau)))
    assert abs(ratio - 1) < 0.01


@pytest.mark.parametrize("L, M", [(32, 576), (128, 1152)])
def test_evbmf_on_pure_noise_finds_rank_zero_and_the_noise_variance(L, M):
    rng = np.random.default_rng(1)
    y = 0.05 * rng.normal(size=(L, M))
    rank, _, sigma2 = evbmf(y)
    assert rank == 0
    assert 0.8 * 0.05**2 < sigma2 < 1.2 * 0.05**2
    # the estimate minimises the free energy over its bounds (checked on a grid)
    s = np.linalg.svd(y, compute_uv=False)
    tau = 2.5129 * np.sqrt(L / M)
    xubar = (1 + tau) * (1 + (L / M) / tau)
    grid = np.linspace(0.5, 1.5, 201) * 0.05**2
    best = min(_evb_objective(g, L, M, s, 0.0, xubar) for g in grid)
    assert _evb_objective(sigma2, L, M, s, 0.0, xubar) <= best + 1e-6


def test_tucker2_vbmf_ranks_come_from_the_in_and_out_channel_unfoldings():
    """Kim et al.: EVBMF on the mode-3 (input channels) and mode-4 (output channels) unfoldings.
    Distinct planted ranks catch swapped or wrong modes."""
    rng = np.random.default_rng(2)
    k = _tucker2_kernel(rng, 24, 40, 5, 9, scale=10.0) + 0.01 * rng.normal(size=(3, 3, 24, 40))
    assert select_rank(k, "tucker2", vbmf=True) == (5, 9)
    assert select_rank(np.transpose(k, (0, 1, 3, 2)), "tucker2", vbmf=True) == (9, 5)


def test_random_init_hides_a_learned_low_rank_change_until_it_decays():
    """The kim2016 diagnosis: a trained kernel = init noise k0 + learned low-rank change. When the
    change is small next to k0 (a short run without weight decay) EVBMF sees noise and returns
    rank ~1; once weight decay has shrunk k0 the planted ranks are found."""
    rng = np.random.default_rng(3)
    cin, cout = 32, 64
    k0 = rng.normal(size=(3, 3, cin, cout)) * np.sqrt(2 / (9 * cin))  # He initialisation
    change = _tucker2_kernel(rng, cin, cout, 4, 6, scale=0.3 * np.linalg.norm(k0))
    r_in, r_out = select_rank(k0 + change, "tucker2", vbmf=True)
    assert r_in < 4 and r_out < 6
    assert select_rank(0.1 * k0 + change, "tucker2", vbmf=True) == (4, 6)


@pytest.mark.parametrize("c", [1e-3, 1e-2, 1.0, 1e3])
def test_evbmf_is_scale_invariant(c):
    """Trained kernels with weight decay have entries ~1e-2 and noise variances ~1e-5; the noise
    estimate must not depend on the scale (an absolute search tolerance broke this)."""
    rng = np.random.default_rng(4)
    y = rng.normal(size=(32, 3)) @ rng.normal(size=(3, 576)) + 0.5 * rng.normal(size=(32, 576))
    rank, d, sigma2 = evbmf(y)
    rank_c, d_c, sigma2_c = evbmf(c * y)
    assert rank_c == rank == 3
    np.testing.assert_allclose(sigma2_c, c**2 * sigma2, rtol=1e-5)
    np.testing.assert_allclose(d_c, c * d, rtol=1e-5)
    assert evbmf(c * rng.normal(size=(32, 576)))[0] == 0
