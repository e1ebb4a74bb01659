"""experiments/ofa_small's summary of a run: dominance over the zoo models and the Pareto plots."""

import os

from experiments.ofa_small.experiment import dominance
from experiments.ofa_small.experiment import format_dominance
from experiments.ofa_small.experiment import plot_results


def _result(seed, tflite=False):
    def row(model, flops, val, test, finetuned=None):
        return {"model": model, "role": "front", "flops": flops, "params": 1, "supernet_val": None,
                "finetuned_test": finetuned, "scratch_val": val, "scratch_test": test,
                "tflite_ms": flops / 1e6 if tflite else None}  # fmt: skip

    return {
        "seed": seed,
        "rows": [
            row("found small", 1_000, 0.70, 0.70, 0.60),
            row("found mid", 50_000, 0.88, 0.86, 0.80),
            row("found mid2", 55_000, 0.86, 0.90, 0.80),
            row("found big", 900_000, 0.95, 0.95, 0.90),
            row("zoo cnn1d", 60_000, 0.85, 0.85),
            row("zoo mlp", 40_000, 0.95, 0.95),
        ],
    }


def test_the_found_model_compared_with_a_zoo_model_is_chosen_on_validation_within_its_flops():
    out = {(d["seed"], d["zoo"]): d for d in dominance([_result(0), _result(1)])}
    cnn = out[(0, "zoo cnn1d")]
    # 'mid' has the best validation accuracy within 60k FLOPs; 'mid2' is better on test but is not
    # chosen on test data; 'big' is more accurate but costs more
    assert cnn["pick"] == "found mid" and cnn["dominates"] and cnn["any_better"] == ["found mid", "found mid2"]
    mlp = out[(1, "zoo mlp")]
    assert mlp["pick"] == "found small" and not mlp["dominates"] and mlp["any_better"] == []
    fine = {d["zoo"]: d for d in dominance([_result(0)], key="finetuned_test")}
    assert not fine["zoo cnn1d"]["dominates"]  # fine-tuned 'mid' (0.80) is below cnn1d's 0.85
    assert "does NOT dominate" in format_dominance(fine["zoo cnn1d"])


def test_plots_are_written(tmp_path):
    path = plot_results([_result(0), _result(1)], str(tmp_path / "pareto.png"))
    with_latency = plot_results([_result(0, tflite=True)], str(tmp_path / "latency.png"))
    assert os.path.getsize(path) > 1000 and os.path.getsize(with_latency) > os.path.getsize(path) / 2


def test_tau_members_are_spread_over_the_supernet_ranking_and_skip_chosen_architectures():
    from experiments.ofa_small.experiment import _spread  # noqa: PLC0415
    from methods.nas.search import Candidate  # noqa: PLC0415

    cands = [Candidate({"width": w}, accuracy=w / 10, flops=1.0, bytes=1.0, params=1) for w in range(10)]
    key = lambda o: (o["width"],)  # noqa: E731
    out = _spread(cands, 3, {(0,), (9,)}, key)
    assert [c.options["width"] for c in out] == [1, 5, 8]  # the lowest, middle and highest of the rest
    assert len(_spread(cands, 20, set(), key)) == 10


def test_head_control_models_and_a_short_run():
    import jax.numpy as jnp
    import pytest
    from flax import nnx

    from experiments.ofa_small.head_control import MODELS
    from experiments.ofa_small.head_control import format_controls
    from experiments.ofa_small.head_control import run_controls
    from research import metrics
    from research import nn

    sample = jnp.zeros((1, 40))
    flops = {
        label: metrics.flops(nn.build_model(name, input_shape=(40,), num_classes=10, rngs=nnx.Rngs(0), **o), sample)
        for label, (name, o) in MODELS.items()
    }
    assert list(flops) == ["zoo cnn1d", "w24-24-24 d111 k533 (flatten)", "w24-24-24 d111 k533 max"]
    # the max head reads 24 inputs instead of 24 * 5: fewer FLOPs than the flattened twin and cnn1d
    assert flops["w24-24-24 d111 k533 max"] < flops["w24-24-24 d111 k533 (flatten)"] < flops["zoo cnn1d"]
    rows = run_controls((0,), steps=2, batch_size=16, models=("w24-24-24 d111 k533 max",))
    assert [r["model"] for r in rows] == ["w24-24-24 d111 k533 max"]
    assert rows[0]["flops"] == flops["w24-24-24 d111 k533 max"]
    assert 0.0 <= rows[0]["val"] <= 1.0 and 0.0 <= rows[0]["test"] <= 1.0
    assert "mean test w24-24-24 d111 k533 max: " in format_controls(rows)
    with pytest.raises(KeyError, match="no control model.*the labels are"):
        run_controls((0,), steps=1, models=("resnet",))


def _repeated(seed):
    """A result whose models were trained three times: the means and the first trainings disagree."""

    def row(model, flops, vals, tests):
        return {"model": model, "role": "front", "flops": flops, "params": 1, "supernet_val": None,
                "finetuned_test": None, "scratch_val": sum(vals) / len(vals), "scratch_test": sum(tests) / len(tests),
                "scratch_val_runs": vals, "scratch_test_runs": tests, "tflite_ms": None}  # fmt: skip

    return {
        "seed": seed,
        "scratch_repeats": 3,
        "rows": [
            # 'lucky' wins validation on its first training only; 'steady' wins on the mean
            row("found lucky", 40_000, [0.90, 0.80, 0.80], [0.84, 0.80, 0.80]),
            row("found steady", 50_000, [0.88, 0.88, 0.88], [0.87, 0.88, 0.89]),
            row("found big", 900_000, [0.95], [0.95]),
            row("zoo cnn1d", 60_000, [0.85, 0.86, 0.87], [0.85, 0.86, 0.90]),
        ],
    }


def test_dominance_chooses_and_compares_on_the_mean_of_the_trainings_or_on_one_training():
    mean = dominance([_repeated(0)])[0]
    assert mean["pick"] == "found steady" and mean["dominates"] and mean["runs"] == "mean"
    assert abs(mean["zoo_test"] - 0.87) < 1e-9 and abs(mean["pick_test"] - 0.88) < 1e-9
    assert "mean of 3 trainings" in format_dominance(mean)
    assert mean["paired_wins"] == (2, 3)  # 0.87 > 0.85, 0.88 > 0.86, 0.89 < 0.90
    assert "more accurate in 2 of the 3 trainings paired by seed" in format_dominance(mean)
    assert dominance([_result(0)])[0]["paired_wins"] is None  # one training each
    first = dominance([_repeated(0)], run=0)[0]
    assert first["pick"] == "found lucky" and not first["dominates"]  # 0.84 < cnn1d's first 0.85
    assert first["any_better"] == ["found steady"] and "training 0 only" in format_dominance(first)
    assert first["paired_wins"] is None
    assert dominance([_repeated(0)], run=2)[0]["pick_test"] == 0.89
    # results written before repeats existed (one training, no *_runs) still summarise with run=0
    assert dominance([_result(0)], run=0)[0]["pick"] == "found mid"


def test_dominance_refuses_a_run_that_was_not_trained_or_a_run_of_the_fine_tuned_accuracy():
    import pytest

    with pytest.raises(ValueError, match="found lucky has 3 from-scratch training.*run=3"):
        dominance([_repeated(0)], run=3)
    with pytest.raises(ValueError, match="needs key='scratch_test'"):
        dominance([_repeated(0)], key="finetuned_test", run=0)


def test_scratch_repeats_trains_with_seeds_seed_plus_1000_r_and_its_first_training_is_the_single_run():
    import dataclasses

    import jax
    import numpy as np
    import pytest
    from flax import nnx

    from experiments.ofa_small.experiment import OFAConfig
    from experiments.ofa_small.experiment import _acc
    from experiments.ofa_small.experiment import _scratch
    from research import data
    from research import nn
    from research.train import train_scan

    with pytest.raises(ValueError, match="scratch_repeats=0 must be at least 1"):
        OFAConfig(scratch_repeats=0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(96, 40)).astype(np.float32), rng.integers(0, 10, 96).astype(np.int32)
    ds = data.Dataset("tiny", x[:64], y[:64], x[64:80], y[64:80], x[80:], y[80:], 10)
    cfg = dataclasses.replace(OFAConfig(), scratch_steps=3, batch_size=16)
    first, runs = _scratch("mlp", {}, ds, cfg, seed=5, repeats=2)
    assert len(runs["scratch_val_runs"]) == len(runs["scratch_test_runs"]) == 2
    assert runs["scratch_test"] == pytest.approx(np.mean(runs["scratch_test_runs"]))
    alone = nn.build_model("mlp", input_shape=(40,), num_classes=10, rngs=nnx.Rngs(5))
    alone = train_scan(alone, ds.x_train, ds.y_train, steps=3, batch_size=16, learning_rate=cfg.learning_rate, seed=5)
    for a, b in zip(
        jax.tree.leaves(nnx.state(first, nnx.Param)), jax.tree.leaves(nnx.state(alone, nnx.Param)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    second = nn.build_model("mlp", input_shape=(40,), num_classes=10, rngs=nnx.Rngs(1005))
    second = train_scan(
        second, ds.x_train, ds.y_train, steps=3, batch_size=16, learning_rate=cfg.learning_rate, seed=1005
    )
    assert runs["scratch_val_runs"][1] == _acc(second, ds.x_val, ds.y_val)
    assert runs["scratch_test_runs"][1] == _acc(second, ds.x_test, ds.y_test)
