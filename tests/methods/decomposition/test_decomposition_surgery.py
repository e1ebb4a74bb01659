"""Rank selection, EVBMF, factorize surgery and its report; factorized models train and checkpoint."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from methods.decomposition import CPConv
from methods.decomposition import DecompositionRule
from methods.decomposition import LowRankLinear
from methods.decomposition import ModelBudget
from methods.decomposition import Tucker2Conv
from methods.decomposition import dense_cost
from methods.decomposition import evbmf
from methods.decomposition import factorize
from methods.decomposition import factorize_with_report
from methods.decomposition import factorized_cost
from methods.decomposition import select_rank
from methods.decomposition.rank import energy_spectra
from methods.decomposition.rank import rank_at_energy
from research.nn import build_model
from research.train import Checkpointer
from research.train import create_train_state
from research.train import make_train_step
from research.train import state_to_model
from research.tree.rules import RuleError


def _lenet(seed=0):
    return build_model("lenet5", input_shape=(8, 8, 1), num_classes=4, rngs=nnx.Rngs(seed))


def _eval(model, x):
    model.eval()
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)


@pytest.mark.parametrize("L, M, r", [(20, 50, 4), (60, 30, 6)])
def test_evbmf_recovers_the_rank_of_low_rank_plus_noise(L, M, r):
    rng = np.random.default_rng(0)
    y = rng.normal(size=(L, r)) @ rng.normal(size=(r, M)) + 0.1 * rng.normal(size=(L, M))
    rank, _, sigma2 = evbmf(y)
    assert rank == r
    assert 0.5 * 0.01 < sigma2 < 2 * 0.01


def test_select_rank_criteria():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 3, 16, 24))
    assert select_rank(np.diag([3.0, 2.0, 1.0, 0.0]), "svd", energy=0.9) == 2
    assert select_rank(np.diag([3.0, 2.0, 1.0, 0.0]), "svd", energy=1.0) == 3
    for method in ("svd", "tucker2", "cp"):
        kernel = w.reshape(-1, 24)[:40] if method == "svd" else w
        kw = {} if method == "svd" else {"in_spatial": (8, 8), "out_spatial": (8, 8)}
        for index, crit in ((0, "param_ratio"), (1, "flop_ratio")):
            r = select_rank(kernel, method, **{crit: 0.3}, **kw)
            budget = 0.3 * dense_cost(kernel.shape, **kw)[index]
            assert factorized_cost(method, kernel.shape, r, **kw)[index] <= budget
            bigger = (r[0] + 1, r[1] + 1) if method == "tucker2" else r + 1
            assert factorized_cost(method, kernel.shape, bigger, **kw)[index] > budget
    e1, e2 = select_rank(w, "tucker2", energy=0.5), select_rank(w, "tucker2", energy=0.95)
    assert e1[0] <= e2[0] and e1[1] <= e2[1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="svd", rank=9), r"svd rank=9 .* above the maximum 8"),
        (dict(method="tucker2", rank=(3, 25)), r"exceed the maximum \(16, 24\)"),
        (dict(method="cp", energy=0.9), r"energy .* not defined for method='cp'"),
        (dict(method="svd", rank=2, energy=0.5), r"exactly one of"),
        (dict(method="svd", param_ratio=1e-4), r"below what rank 1 costs"),
    ],
)
def test_select_rank_errors(kwargs, match):
    kernel = np.ones((8, 12)) if kwargs["method"] == "svd" else np.ones((3, 3, 16, 24))
    method = kwargs.pop("method")
    with pytest.raises(ValueError, match=match):
        select_rank(kernel, method, **kwargs)


def test_full_rank_factorized_model_reproduces_the_dense_model():
    model = _lenet()
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
    rules = [
        DecompositionRule(pattern="conv", energy=1.0),
        DecompositionRule(pattern="fc", energy=1.0),
    ]
    fact, report = factorize_with_report(model, rules, check_speed=False)
    assert isinstance(fact.conv1, Tucker2Conv) and isinstance(fact.fc1, LowRankLinear)
    assert type(fact.head) is nnx.Linear and type(model.conv1) is nnx.Conv  # original untouched
    chex.assert_trees_all_close(_eval(fact, x), _eval(model, x), atol=1e-4)
    assert {r.path for r in report.layers} == {"conv1", "conv2", "fc1", "fc2"}
    assert all(r.rel_error < 1e-5 for r in report.layers)


def test_rules_report_and_speed_decisions():
    model = _lenet()
    rules = [
        DecompositionRule(pattern="conv1", skip=True),
        DecompositionRule(pattern="conv2", method="cp", rank=4, keep_if_slower=True),
        DecompositionRule(pattern="fc1", rank=8),
    ]
    fact, report = factorize_with_report(model, rules, repeats=3, warmup=1)
    rows = {r.path: r for r in report.layers}
    assert set(rows) == {"conv2", "fc1"} and type(fact.conv1) is nnx.Conv
    assert isinstance(fact.conv2, CPConv) and rows["conv2"].decision == "factorized"
    fc1 = rows["fc1"]
    assert fc1.params_factorized == 8 * (64 + 120) + 120 and fc1.params_dense == 64 * 120 + 120
    assert (fc1.decision == "factorized") == (fc1.dense_ms / fc1.factorized_ms >= 1.0)
    assert isinstance(fact.fc1, LowRankLinear) == (fc1.decision == "factorized")
    assert np.isfinite(report.model_dense_ms) and "conv2" in report.table()


def test_a_layer_is_timed_once_per_process_for_its_shapes(monkeypatch):
    from methods.decomposition import clear_latency_cache
    from methods.decomposition import speed

    clear_latency_cache()
    timed = []

    def fake(dense, factorized, x, **kw):  # the dense layer 1.5x the factorized one, no wall clock
        timed.append((type(dense).__name__, tuple(x.shape)))
        return 3e-3, 2e-3

    monkeypatch.setattr(speed, "compare_latency", fake)
    rules = [DecompositionRule(pattern="conv1|conv2", skip=True), DecompositionRule(pattern="fc1", rank=8)]
    first = _lenet()
    _, report = factorize_with_report(first, rules, repeats=3, warmup=1)
    assert len(timed) == 2  # fc1, then the whole model
    assert report.layers[0].decision == "factorized" and "timed earlier" not in report.layers[0].reason
    # another trial's weights, the same shapes: nothing timed again, the same decision
    other = _lenet(seed=1)
    _, again = factorize_with_report(other, rules, repeats=3, warmup=1)
    assert len(timed) == 2 and again.layers[0].decision == "factorized"
    assert again.layers[0].reason == "1.50x faster (timed earlier in this process: same layer shapes)"
    assert again.model_dense_ms == report.model_dense_ms == 3.0
    # another rank is another layer; a cleared cache times again
    factorize_with_report(first, [rules[0], DecompositionRule(pattern="fc1", rank=4)], repeats=3, warmup=1)
    assert len(timed) == 4
    clear_latency_cache()
    factorize_with_report(first, rules, repeats=3, warmup=1)
    assert len(timed) == 6
    clear_latency_cache()


class _GroupedNet(nnx.Module):
    def __init__(self, rngs):
        self.dw_conv = nnx.Conv(4, 4, (3, 3), feature_group_count=4, rngs=rngs)
        self.project_conv = nnx.Conv(4, 6, (3, 3), rngs=rngs)

    def __call__(self, x):
        return self.project_conv(jax.nn.relu(self.dw_conv(x))).mean(axis=(1, 2))


def test_grouped_conv_is_left_dense_with_a_reason():
    model = _GroupedNet(nnx.Rngs(0))
    fact, report = factorize_with_report(
        model,
        [DecompositionRule(pattern="conv", rank=2)],
        sample_input=jnp.ones((1, 6, 6, 4)),
        check_speed=False,
    )
    rows = {r.path: r for r in report.layers}
    assert rows["dw_conv"].decision == "dense" and "grouped/depthwise" in rows["dw_conv"].reason
    assert type(fact.dw_conv) is nnx.Conv and isinstance(fact.project_conv, Tucker2Conv)
    with pytest.raises(ValueError, match="sample_input is needed"):
        factorize(model, [DecompositionRule(pattern="conv", rank=2)], check_speed=False)


def test_model_budget_is_met():
    model = _lenet()
    budget = ModelBudget(param_ratio=0.4)
    _, report = factorize_with_report(model, [DecompositionRule(pattern="conv2|fc")], budget=budget, check_speed=False)
    dense = sum(r.params_dense for r in report.layers)
    assert sum(r.params_factorized for r in report.layers) <= 0.4 * dense


def test_a_budget_s_bisection_computes_each_layer_s_singular_values_once(monkeypatch):
    """40-odd bisection steps read every layer's rank at the shared energy knob; the SVDs are made
    once per layer (one matrix for svd, two unfoldings for tucker2), not once per step."""
    from methods.decomposition import surgery

    model = _lenet()
    real_svd, real_allocate, calls = np.linalg.svd, surgery._allocate, []

    def counting(a, *args, **kwargs):
        calls.append(np.shape(a))
        return real_svd(a, *args, **kwargs)

    def allocate(plans, budget):  # count the SVDs of the allocation only (not the factors built after)
        monkeypatch.setattr(np.linalg, "svd", counting)
        try:
            return real_allocate(plans, budget)
        finally:
            monkeypatch.setattr(np.linalg, "svd", real_svd)

    monkeypatch.setattr(surgery, "_allocate", allocate)
    rules = [DecompositionRule(pattern="conv2", method="tucker2"), DecompositionRule(pattern="fc")]
    _, report = factorize_with_report(model, rules, budget=ModelBudget(param_ratio=0.4), check_speed=False)
    methods = [r.method for r in report.layers]
    assert methods.count("tucker2") == 1 and methods.count("svd") >= 2
    assert len(calls) == 2 * methods.count("tucker2") + methods.count("svd")


def test_rank_at_energy_is_select_rank_s_energy_criterion():
    rng = np.random.default_rng(0)
    linear, conv = rng.standard_normal((20, 12)), rng.standard_normal((3, 3, 6, 10))
    for kernel, method in ((linear, "svd"), (conv, "svd"), (conv, "tucker2")):
        spectra = energy_spectra(kernel, method)
        for energy in (1e-6, 0.2, 0.5, 0.9, 0.999, 1.0):
            assert rank_at_energy(spectra, energy) == select_rank(kernel, method, energy=energy)
    with pytest.raises(ValueError, match="not defined for method='cp'"):
        energy_spectra(conv, "cp")


def test_bad_rules_fail_clearly():
    model = _lenet()
    with pytest.raises(RuleError, match="matched no path.*'blocks'"):
        factorize(model, [DecompositionRule(pattern="blocks", rank=2)], check_speed=False)
    with pytest.raises(ValueError, match="rank=500 at 'fc1' is above the maximum 64"):
        factorize(model, [DecompositionRule(pattern="fc1", rank=500)], check_speed=False)
    with pytest.raises(ValueError, match="method='cp' for linear layer 'fc1'"):
        factorize(model, [DecompositionRule(pattern="fc1", method="cp", rank=2)], check_speed=False)
    with pytest.raises(ValueError, match="several rank criteria"):
        DecompositionRule(pattern="fc1", rank=2, vbmf=True)
    with pytest.raises(ValueError, match="no budget"):
        factorize(model, [DecompositionRule(pattern="fc1")], check_speed=False)


def test_factorized_model_trains_and_checkpoints(tmp_path):
    model = _lenet()
    fact = factorize(
        model,
        [
            DecompositionRule(pattern="conv2", method="tucker2", rank=(3, 8)),
            DecompositionRule(pattern="fc", rank=6),
        ],
        check_speed=False,
    )
    tx = optax.adam(1e-2)
    defs, state = create_train_state(fact, tx)
    step = make_train_step(defs, tx)
    batch = {"x": jax.random.normal(jax.random.key(0), (16, 8, 8, 1)), "y": jnp.arange(16) % 4}
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert "reduce" in state.params["conv2"] and "first" in state.params["fc1"]
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(8, state)
    restored = ckpt.restore(template=state)
    chex.assert_trees_all_close(restored.params, state.params)
    x = batch["x"][:2]
    chex.assert_trees_all_close(_eval(state_to_model(defs, restored), x), _eval(state_to_model(defs, state), x))
