"""GP math against float64 numpy references, acquisitions against closed forms,
batch diversity and compilation counts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erfcx
from scipy.stats import norm

from research.automl import GPSampler
from research.automl import Study
from research.automl import acquisition as acq
from research.automl._numerics import TRACE_COUNTS
from research.automl._numerics import bfgs_minimize
from research.automl._numerics import bucket
from research.automl._numerics import maybe_x64
from research.automl.gp import _COMPILED
from research.automl.gp import AUTO_LAMBDAS
from research.automl.gp import MIN_NOISE
from research.automl.gp import OUTPUT_WARPINGS
from research.automl.gp import _acquire_fn
from research.automl.gp import _Config
from research.automl.gp import add_point
from research.automl.gp import fit_gp
from research.automl.gp import gp_posterior
from research.automl.gp import posterior_state
from research.automl.gp import tail_warps
from research.automl.gp import warp_losses
from research.automl.space import Categorical
from research.automl.space import Float
from research.automl.space import Int
from research.automl.space import Space
from research.automl.testfunctions import BRANIN_MIN
from research.automl.testfunctions import branin
from research.automl.testfunctions import branin_space
from research.automl.testfunctions import conditional
from research.automl.testfunctions import conditional_space

SMALL_GP = dict(n_candidates=128, n_local=32, n_starts=4, ascent_steps=8, n_screen=8)


def _np_matern(a, b, ls2inv, signal, is_cat):
    diff = a[:, None, :] - b[None, :, :]
    d2 = np.where(is_cat, (np.abs(diff) > 1e-9).astype(float), diff**2)
    r = np.sqrt(np.sum(d2 * ls2inv, -1))
    return signal * (1 + math.sqrt(5) * r + 5 / 3 * r**2) * np.exp(-math.sqrt(5) * r)


def _data(n=12, d=3, pad=16, seed=0):
    rng = np.random.default_rng(seed)
    x = np.zeros((pad, d))
    x[:n] = rng.random((n, d))
    x[:n, 2] = (rng.integers(0, 3, n) + 0.5) / 3  # a categorical column
    y = np.zeros(pad)
    y[:n] = np.sin(4 * x[:n, 0]) + x[:n, 1] ** 2
    theta = np.array([0.3, -0.5, 0.1, 0.2, math.log(1e-3)])
    return x, y, n, theta, np.array([False, False, True])


def test_posterior_matches_float64_reference():
    x, y, n, theta, is_cat = _data()
    xq = np.random.default_rng(1).random((7, 3))
    xq[:, 2] = (np.arange(7) % 3 + 0.5) / 3
    with maybe_x64(True):
        mask = jnp.arange(16) < n
        st = posterior_state(jnp.asarray(theta), jnp.asarray(x), jnp.asarray(y), mask, is_cat)
        mean, var = gp_posterior(st, jnp.asarray(xq), jnp.asarray(is_cat))
    ls2inv, signal, noise = np.exp(theta[:3]), np.exp(theta[3]), MIN_NOISE + np.exp(theta[4])
    k = _np_matern(x[:n], x[:n], ls2inv, signal, is_cat) + noise * np.eye(n)
    kq = _np_matern(xq, x[:n], ls2inv, signal, is_cat)
    ref_mean = kq @ np.linalg.solve(k, y[:n])
    ref_var = signal - np.einsum("ij,ji->i", kq, np.linalg.solve(k, kq.T))
    np.testing.assert_allclose(np.asarray(mean), ref_mean, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(np.asarray(var), ref_var, rtol=1e-6, atol=1e-10)


def test_add_point_equals_refit():
    x, y, n, theta, is_cat = _data()
    with maybe_x64(True):
        th, xj, yj, cat = (jnp.asarray(a) for a in (theta, x, y, is_cat))
        st = posterior_state(th, xj, yj, jnp.arange(16) < n, cat)
        xn = jnp.asarray([0.3, 0.7, 0.5 / 3])
        st2 = jax.jit(add_point)(st, jnp.asarray(n), xn, 0.25, cat)
        full = posterior_state(th, xj.at[n].set(xn), yj.at[n].set(0.25), jnp.arange(16) < n + 1, cat)
        xq = jnp.asarray(np.random.default_rng(2).random((5, 3)))
        for a, b in zip(gp_posterior(st2, xq, cat), gp_posterior(full, xq, cat), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("z", [-3.0, -1.0, 0.0, 0.5, 2.5])
def test_acquisitions_match_closed_forms(z):
    std, best = 0.7, 0.2
    mean = best - z * std
    ei = std * (z * norm.cdf(z) + norm.pdf(z))
    with maybe_x64(True):
        assert float(acq.expected_improvement(mean, std, best)) == pytest.approx(ei, rel=1e-10)
        assert float(acq.log_expected_improvement(mean, std, best)) == pytest.approx(math.log(ei), rel=1e-8)
        assert math.exp(float(acq.probability_of_improvement(mean, std, best))) == pytest.approx(norm.cdf(z), rel=1e-10)
        assert float(acq.upper_confidence_bound(mean, std, best, beta=4.0)) == pytest.approx(-(mean - 2.0 * std))


def test_log_ei_is_accurate_far_from_the_incumbent():
    z = np.array([-6.5, -10.0, -40.0])
    # h(z) = phi(z) (1 + z sqrt(pi/2) erfcx(-z/sqrt2)), accurate in float64 for these z.
    ref = norm.logpdf(z) + np.log1p(z * math.sqrt(math.pi / 2) * erfcx(-z / math.sqrt(2)))
    with maybe_x64(True):
        got = np.asarray(acq.log_expected_improvement(-z, 1.0, 0.0))
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    g = jax.grad(lambda m: acq.log_expected_improvement(m, 1.0, 0.0))(40.0)
    assert np.isfinite(g) and g < 0


def test_batch_is_diverse_and_does_not_recompile_within_a_bucket():
    space = conditional_space()
    study = Study(space, sampler=GPSampler(seed=0, n_startup_trials=4, **SMALL_GP))
    study.optimize(conditional, n_trials=6, show_progress_bar=False)
    before = dict(TRACE_COUNTS)
    sizes = []
    for _ in range(2):  # 6 -> 14 observations: one size bucket (16)
        batch = study.ask(4)
        sizes.append(len(batch))
        u = np.stack([space.snap(space.encode(t.params)[0]) for t in batch])
        a = np.stack([space.encode(t.params)[1] for t in batch])
        feat = np.where(a, u, -1.0)
        d = np.sqrt(((feat[:, None] - feat[None]) ** 2).sum(-1))
        assert d[np.triu_indices(4, 1)].min() > 1e-3
        for t in batch:
            study.tell(t, conditional(t.params))
        if _ == 0:
            first = dict(TRACE_COUNTS)
    after = dict(TRACE_COUNTS)
    assert sizes == [4, 4]
    # The second ask (same bucket, same q, warm fit) traced nothing new.
    assert after == first
    assert after["gp_acquire"] >= before.get("gp_acquire", 0)


def test_same_shaped_spaces_share_one_program_and_suggest_the_same_points():
    """Bounds and names are values of the compiled suggestion step, not part of its key.

    The spaces have the structure of ``conditional_space`` (k = 0 is that space), so after
    the batch test above nothing here compiles.
    """

    def space(k):  # the same kinds, cell counts and conditions for every k
        m = [f"prune{k}", f"quantize{k}", f"none{k}"]
        return Space(
            {
                f"method{k}": Categorical(m),
                f"sparsity{k}": Float(0.0 - k, 0.99 + 3 * k, when={f"method{k}": m[0]}),
                f"schedule{k}": Categorical([f"oneshot{k}", f"gradual{k}"], when={f"method{k}": m[0]}),
                f"steps{k}": Int(1, 64, log=True, when={f"schedule{k}": f"gradual{k}"}),
                f"bits{k}": Int(2 + k, 8 + k, when={f"method{k}": m[1]}),
                f"lr{k}": Float(1e-5 * 10**k, 1e-1 * 10**k, log=True, when={f"method{k}": m[1]}),
                f"knob{k}": Float(-k, 1.0 + k, when={f"method{k}": m[2]}),
            }
        )

    def run(sp):
        target = np.linspace(0.2, 0.8, sp.dim)

        def objective(params):  # a function of the unit-cube point: the same for every k
            u, act = sp.encode(params)
            return float(np.sum(np.where(act, (u - target) ** 2, 0.0)) + 0.1 * u[0])

        study = Study(sp, sampler=GPSampler(seed=1, n_startup_trials=4, **SMALL_GP))
        study.optimize(objective, n_trials=6, show_progress_bar=False)
        return np.stack([sp.encode(t.params)[0] for t in study.trials])

    first = run(space(0))
    traces, keys = TRACE_COUNTS["gp_acquire"], set(_COMPILED)
    for k in (1, 2):
        np.testing.assert_allclose(run(space(k)), first, rtol=0, atol=1e-9)
    # Neither other space compiled a suggestion step: no new cache entry, no new trace.
    assert TRACE_COUNTS["gp_acquire"] == traces
    assert set(_COMPILED) == keys


def test_bfgs_stops_on_the_face_of_a_per_coordinate_box():
    # Unconstrained minimum (2.3, -0.275) lies outside the box [0, 1] x [0, 0.5]; the
    # constrained one is x0 = 1 on the face, x1 = 0.3 - 0.25 * 1 = 0.05.
    def f(x):
        return (x[0] - 2.0) ** 2 + (x[1] - 0.3) ** 2 + 0.5 * x[0] * x[1]

    with maybe_x64(True):
        lower, upper = jnp.zeros(2), jnp.array([1.0, 0.5])
        run = jax.jit(jax.vmap(lambda x0: bfgs_minimize(f, x0, maxiter=50, lower=lower, upper=upper)))
        x, fx, _ = run(jnp.array([[0.1, 0.4], [0.9, 0.0], [0.5, 0.5]]))
    np.testing.assert_allclose(np.asarray(x), np.tile([1.0, 0.05], (3, 1)), atol=1e-4)
    np.testing.assert_allclose(np.asarray(fx), f(jnp.array([1.0, 0.05])), rtol=1e-6)


def test_acquisition_maximiser_matches_a_dense_grid():
    """The suggested point's log-EI is the maximum of log-EI over a dense grid (2-D)."""
    space = Space({"a": Float(0.0, 1.0), "b": Float(0.0, 1.0)})
    rng = np.random.default_rng(3)
    n, cap = 14, 16
    u = np.full((cap, 2), 0.5)
    u[:n] = rng.random((n, 2))
    y = np.zeros(cap)
    raw = np.sin(6 * u[:n, 0]) * np.cos(4 * u[:n, 1]) + u[:n, 1]
    y[:n] = (raw - raw.mean()) / raw.std()
    act = np.zeros((cap, 2), bool)
    act[:n] = True
    theta = np.array([math.log(1 / 0.15**2), math.log(1 / 0.25**2), 0.0, math.log(1e-4)])
    cfg = _Config(
        acquisition="logei", acq_kwargs=(), n_candidates=256, n_local=32, n_starts=6,
        ascent_steps=40, min_distance=1e-4, batch_min_distance=1e-3, fit_maxiter=20,
    )  # fmt: skip
    with maybe_x64(True):
        suggest = _acquire_fn(space, cfg, 1)
        obs = (jnp.asarray(theta), jnp.asarray(u), jnp.asarray(act), jnp.asarray(y))
        no_pending = (jnp.full((4, 2), 0.5), jnp.zeros((4, 2), bool), jnp.asarray(0, jnp.int32))
        us, ss = suggest(*obs, jnp.asarray(n, jnp.int32), *no_pending, jax.random.key(0))
        mask = jnp.arange(cap) < n
        st = posterior_state(jnp.asarray(theta), jnp.asarray(u), jnp.asarray(y), mask, jnp.zeros(2, bool))
        g = np.linspace(0.0, 1.0, 301)
        grid = jnp.asarray(np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2))
        mean, var = gp_posterior(st, grid, jnp.zeros(2, bool))
        dense = float(jnp.max(acq.log_expected_improvement(mean, jnp.sqrt(var), y[:n].min())))
        mean1, var1 = gp_posterior(st, us, jnp.zeros(2, bool))
        ours = float(acq.log_expected_improvement(mean1, jnp.sqrt(var1), y[:n].min())[0])
    assert ours == pytest.approx(float(ss[0]), abs=1e-9)
    # The grid spacing (1/300) bounds how far the grid is from the true maximum.
    assert ours >= dense - 1e-3


@pytest.mark.slow  # the default GP's programs compile once here (most of its time)
def test_gp_finds_the_branin_minimum():
    study = Study(branin_space(), sampler=GPSampler(seed=0))
    # 48 trials (30 before the output warping; at 30 the unwarped GP was below 1e-3 on seed 0
    # but its median over seeds 0-5 was 2e-3). Not 50, the suite's budget: trials 49 and 50
    # would open the 64-observation bucket, three more programs to compile for two
    # suggestions. With the default output_warping="auto", seeds 0-19 of this study all end
    # below 5.3e-5 after 48 trials.
    study.optimize(branin, n_trials=48, show_progress_bar=False)
    assert study.best_value - BRANIN_MIN < 1e-3


def test_size_buckets_and_a_minimum_below_two_is_refused():
    assert [bucket(n) for n in (1, 16, 17, 25, 100, 129, 1280)] == [16, 16, 24, 32, 128, 160, 1280]
    assert bucket(3, minimum=2) == 3 and bucket(1, minimum=64) == 64
    with pytest.raises(ValueError, match="minimum=1"):
        bucket(5, minimum=1)


def test_fit_of_a_deterministic_objective_reaches_the_noise_floor():
    rng = np.random.default_rng(0)
    x = rng.random((32, 2))
    y = np.sin(3 * x[:, 0]) + np.cos(2 * x[:, 1])
    y = (y - y.mean()) / y.std()
    start = np.array([0.0, 0.0, 0.0, math.log(1e-2)])
    with maybe_x64(True):
        fit = jax.jit(fit_gp, static_argnames=("n_restarts", "maxiter"))
        theta, loss, _ = fit(
            jnp.asarray(start), jnp.asarray(start[None]), jnp.asarray(x), jnp.asarray(y),
            jnp.ones(32, bool), jnp.zeros(2, bool), n_restarts=1, maxiter=200,
        )  # fmt: skip
    noise = MIN_NOISE + math.exp(float(theta[-1]))
    assert np.isfinite(float(loss))
    # A floor of exp(-12) ~ 6e-6 on the fitted noise would blur the last digits near an optimum.
    assert noise < 1e-6


def _goldstein_price(p):
    x, y = p["x0"], p["x1"]
    a = 1 + (x + y + 1) ** 2 * (19 - 14 * x + 3 * x**2 - 14 * y + 6 * x * y + 3 * y**2)
    b = 30 + (2 * x - 3 * y) ** 2 * (18 - 32 * x + 12 * x**2 + 48 * y - 36 * x * y + 27 * y**2)
    return a * b


@pytest.mark.parametrize("method", OUTPUT_WARPINGS)
def test_output_warping_keeps_the_order_and_standardises(method):
    rng = np.random.default_rng(0)
    loss = np.exp(rng.normal(0.0, 3.0, 40))  # heavy right tail
    loss[5] = loss[7]  # a tie
    y = warp_losses(loss, method)
    order = np.argsort(loss, kind="stable")
    assert np.all(np.diff(y[order]) >= 0)
    assert y[5] == y[7]
    np.testing.assert_allclose([y.mean(), y.std()], [0.0, 1.0], atol=1e-12)


def test_halfrank_keeps_the_better_half_and_bounds_the_worse_half():
    rng = np.random.default_rng(1)
    loss = rng.normal(0.0, 1.0, 41)
    loss[:4] = [1e3, 1e5, 1e6, 3e6]  # outliers on the bad side
    y = warp_losses(loss, "halfrank")
    med = np.median(loss)
    good = loss <= med
    # The better half is an affine image of the losses (the shape of the promising region).
    slope, icpt = np.polyfit(loss[good], y[good], 1)
    np.testing.assert_allclose(y[good], slope * loss[good] + icpt, atol=1e-9)
    # The worse half is at most the largest normal quantile of the ranks above the median,
    # in units of the better half's spread, so the outliers do not dominate the scale.
    sigma = math.sqrt(np.mean((loss[good] - med) ** 2))
    worst = med + sigma * norm.ppf(1 - 0.5 / loss.size)
    assert np.max(y) <= slope * worst + icpt + 1e-9
    # Without warping the outliers squeeze the better half into a tiny interval.
    assert np.ptp(y[good]) > 100 * np.ptp(warp_losses(loss, "none")[good])


def test_tail_warps_are_monotone_c1_and_their_log_jacobian_is_exact():
    rng = np.random.default_rng(2)
    loss = np.exp(rng.normal(0.0, 2.0, 31))
    ys, log_jac = tail_warps(loss)
    assert ys.shape == (len(AUTO_LAMBDAS), 31) and AUTO_LAMBDAS[0] == 1.0
    np.testing.assert_allclose(ys[0], warp_losses(loss, "none"), atol=1e-12)  # lambda = 1: no warping
    med = np.median(loss)
    sigma = math.sqrt(np.mean((loss[loss <= med] - med) ** 2))
    for lam, y, lj in zip(AUTO_LAMBDAS, ys, log_jac, strict=True):
        order = np.argsort(loss)
        assert np.all(np.diff(y[order]) > 0)
        np.testing.assert_allclose([y.mean(), y.std()], [0.0, 1.0], atol=1e-12)

        def warp(v, lam=lam):  # the map with its fitted constants (median, spread) held fixed
            t = 1.0 + np.maximum(v - med, 0.0) / sigma
            tail = np.log(t) if lam == 0 else (t**lam - 1.0) / lam
            return np.where(v > med, med + sigma * tail, v)

        w = warp(loss)
        scale = w.std()
        np.testing.assert_allclose((w - w.mean()) / scale, y, atol=1e-9)
        h = 1e-6 * np.maximum(np.abs(loss), 1.0)
        slope = (warp(loss + h) - warp(loss - h)) / (2 * h) / scale
        np.testing.assert_allclose(lj, np.sum(np.log(slope)), rtol=1e-6)
        # C1 at the median: the slope just above it is 1 (before standardisation).
        assert (warp(med + 1e-9) - med) / 1e-9 == pytest.approx(1.0, rel=1e-6)


def test_output_warping_rejects_an_unknown_name():
    with pytest.raises(ValueError, match="output_warping='rank'"):
        warp_losses(np.arange(5.0), "rank")
    with pytest.raises(ValueError, match="output_warping='rank'"):
        GPSampler(output_warping="rank")


def _goldstein_price_on_branins_box(p):
    lo, hi = np.array([-5.0, 0.0]), np.array([10.0, 15.0])  # Branin's box, mapped to [-2, 2]^2
    u = (np.array([p["x1"], p["x2"]]) - lo) / (hi - lo)
    x = -2.0 + 4.0 * u
    return _goldstein_price({"x0": x[0], "x1": x[1]})


@pytest.mark.slow  # the default GP on Branin's box for 48 trials: the Branin test's programs
def test_default_warping_solves_goldstein_price():
    # The losses span six orders of magnitude on [-2, 2]^2: standardised alone, the GP
    # fitted the walls and left the minimum (3 at (0, -1)) unrefined (median regret 7.9
    # over 20 seeds after 50 trials). With the default output_warping="auto", seeds 0-19
    # of exactly this study all end below 0.06 after 48 trials (median 0.0012, worst 0.053;
    # seed 0: 0.035), so the bound is not a lucky seed and a trajectory that rounds
    # differently on another CPU still passes. It fails for a broken sampler: random
    # search's best of seeds 0-19 after 50 trials is 0.27 (median 21.6); "halfrank" (the
    # previous default) ends above 0.1 on 6 of 20 seeds of the suite's Goldstein-Price
    # after 50 trials (experiments/benchmarks/automl_suite.py); 48 trials can only do worse.
    study = Study(branin_space(), sampler=GPSampler(seed=0))
    study.optimize(_goldstein_price_on_branins_box, n_trials=48, show_progress_bar=False)
    assert study.best_value - 3.0 < 0.1


@pytest.mark.parametrize(
    "objective, expected",
    [
        (lambda p: math.sin(3 * p["x1"] / 15) + math.cos(2 * p["x2"] / 15), 1.0),  # smooth: no warp
        (lambda p: math.exp(0.8 * p["x1"] + 0.4 * p["x2"]), 0.0),  # six orders of magnitude: log tail
    ],
)
def test_auto_warping_chooses_by_marginal_likelihood(objective, expected):
    # Branin's box again, so that the acquisition program compiled above is reused.
    sampler = GPSampler(seed=0, n_startup_trials=12, output_warping="auto")
    Study(branin_space(), sampler=sampler).optimize(objective, n_trials=13, show_progress_bar=False)
    assert sampler.last_warp == expected


def test_compile_options_this_xla_does_not_know_are_dropped():
    from research.automl._numerics import _supported

    options = (("xla_backend_optimization_level", 0), ("xla_no_such_option_anywhere", True))
    assert _supported(options) == {"xla_backend_optimization_level": 0}


def test_sampler_programs_get_the_cpu_options_only_on_a_cpu(monkeypatch):
    from research.automl import _numerics

    seen = []
    real_jit = jax.jit
    monkeypatch.setattr(jax, "jit", lambda f, **kw: seen.append(kw.get("compiler_options")) or real_jit(f, **kw))
    monkeypatch.setattr(_numerics, "CPU_COMPILE_OPTIONS", {"xla_backend_optimization_level": 0})
    assert float(_numerics.sampler_jit(lambda x: 2 * x)(3.0)) == 6.0
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the jit is made at the first call
    _numerics.sampler_jit(lambda x: 2 * x)(3.0)
    assert seen[-2:] == [{"xla_backend_optimization_level": 0}, None]


def test_gp_suggestions_with_and_without_the_cpu_compile_options_agree(monkeypatch):
    from research.automl import _numerics
    from research.automl import gp

    def points(options):
        monkeypatch.setattr(_numerics, "CPU_COMPILE_OPTIONS", options)
        monkeypatch.setattr(gp, "_COMPILED", {})  # compile afresh with these options
        study = Study(branin_space(), sampler=GPSampler(seed=0, n_startup_trials=4, **SMALL_GP))
        study.optimize(branin, n_trials=7, show_progress_bar=False)
        return np.array([[t.params["x1"], t.params["x2"]] for t in study.trials])

    with_options = points(dict(_numerics.CPU_COMPILE_OPTIONS))
    defaults = points({})
    np.testing.assert_allclose(with_options, defaults, rtol=1e-6, atol=1e-9)
