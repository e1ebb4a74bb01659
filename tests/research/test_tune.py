"""Tests of research.tune (``slimjax tune``): space <-> config keys, objectives, failures, resume
after kill -9, concurrent workers, multi-fidelity continuation and the best config rerun."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from research import cli
from research import config as C
from research import report as report_lib
from research import run as run_lib
from research import tune as T
from research.automl import Categorical
from research.automl import Float
from research.automl import Int
from research.automl import Space

TINY_CONFIG = """
from research.automl import Categorical, Float, Space
from research.config import Config, DataConfig, ModelConfig
from research.stages import TrainStage


def get_config(arg=None):
    return Config(
        name="tiny",
        model=ModelConfig(name="mlp", options={"widths": (8,)}),
        data=DataConfig(name="digits", limit=300),
        stages=(TrainStage(steps=int(arg or 6), batch_size=32, checkpoint_every=3, eval_every=0, log_every=3),),
    )


def get_space(arg=None):
    return Space({
        "stages.train.learning_rate": Float(1e-3, 3e-2, log=True),
        "stages.train.optimizer": Categorical(["adam", "adamw"]),
        "stages.train.weight_decay": Float(1e-4, 1e-2, log=True, when={"stages.train.optimizer": "adamw"}),
    })
"""


@pytest.fixture(scope="module", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """One persistent compilation cache for the module's runs (in-process and subprocesses): the
    tiny model compiles once; tune keeps a cache directory the user set."""
    import jax

    path = str(tmp_path_factory.mktemp("jax_cache"))
    before, env = jax.config.jax_compilation_cache_dir, os.environ.get("JAX_COMPILATION_CACHE_DIR")
    jax.config.update("jax_compilation_cache_dir", path)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    yield path
    jax.config.update("jax_compilation_cache_dir", before)
    if env is None:
        os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    else:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = env


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.py"
    path.write_text(TINY_CONFIG)
    return str(path)


@pytest.fixture(scope="module")
def base_and_space(config_file):
    run_lib.register_all_stages()
    return T.load_config_and_space(config_file)


def _states(workdir):
    with open(os.path.join(workdir, "tune.json")) as f:
        summary = json.load(f)
    return summary, [(t["number"], t["state"]) for t in summary["trials"]]


# ----------------------------------------------------------------------------- keys and spaces


def test_space_keys_map_to_set_overrides(base_and_space):
    base, space = base_and_space
    T.check_space(base, space)
    params = {"stages.train.learning_rate": 0.01, "stages.train.optimizer": "adamw", "stages.train.weight_decay": 1e-3}
    assert T.point_overrides(space, params) == [
        "stages.train.learning_rate=0.01",
        "stages.train.optimizer=adamw",
        "stages.train.weight_decay=0.001",
    ]
    cfg = T.point_config(base, space, params)
    assert (cfg.stages[0].learning_rate, cfg.stages[0].optimizer, cfg.stages[0].weight_decay) == (0.01, "adamw", 1e-3)
    # exactly what --set would give
    assert cfg == C.apply_overrides(base, T.point_overrides(space, params))
    keys = T.config_keys(base)
    assert {"stages.train.steps", "stages.0.steps", "model.options.widths", "seed"} <= set(keys)


def test_bad_space_key_fails_at_start_listing_valid_keys(base_and_space):
    base, _ = base_and_space
    with pytest.raises(C.ConfigError, match=r"stages\.train\.lr.*valid keys:.*stages\.train\.learning_rate"):
        T.check_space(base, Space({"stages.train.lr": Float(1e-3, 1e-2)}))
    with pytest.raises(C.ConfigError, match=r"no stage 'prune'.*valid keys"):
        T.check_space(base, Space({"stages.prune.sparsity": Float(0.1, 0.9)}))
    with pytest.raises(C.ConfigError, match=r"model\.options.*depthh"):
        T.check_space(base, Space({"model.options.depthh": Int(1, 3)}))
    # a value the config refuses is named with its key
    with pytest.raises(C.ConfigError, match=r"stages\.train\.steps"):
        T.check_space(base, Space({"stages.train.steps": Int(-5, 3)}))


def test_conditional_keys_only_set_when_active(base_and_space):
    base, space = base_and_space
    adam = T.point_config(base, space, {"stages.train.learning_rate": 0.002, "stages.train.optimizer": "adam"})
    assert adam.stages[0].weight_decay == 0.0  # inactive child: not overridden
    # a child whose parent choice does not hold is checked with the parent set to activate it
    bad = Space(
        {
            "stages.train.optimizer": Categorical(["adam", "sgd"]),
            "stages.train.nope": Float(0, 1, when={"stages.train.optimizer": "sgd"}),
        }
    )
    with pytest.raises(C.ConfigError, match="stages.train.nope"):
        T.check_space(base, bad)
    # list-valued fields through literal string choices
    widths = Space({"model.options.widths": Categorical(["[4]", "[8, 4]"])})
    assert T.point_config(base, widths, {"model.options.widths": "[8, 4]"}).model.options["widths"] == [8, 4]


def test_objectives_and_constraints_parse():
    assert T.Objective.parse("val_acc:max") == T.Objective("val_accuracy", "max")
    with pytest.raises(C.ConfigError, match="only reported"):
        T.Objective.parse("test_accuracy:max")
    with pytest.raises(C.ConfigError, match="only reported"):  # an exported artifact's test-split accuracy
        T.Objective.parse("tflite_int8_test_accuracy:max")
    with pytest.raises(C.ConfigError, match="test split"):
        T.Constraint.parse("onnx_fp32_test_accuracy>=0.9")
    assert T.Objective.parse("tflite_int8_latency_ms:min").name == "tflite_int8_latency_ms"
    with pytest.raises(C.ConfigError, match="NAME:max"):
        T.Objective.parse("bytes")
    c = T.Constraint.parse("bytes<=2000")
    assert c.holds(2000) and not c.holds(2001)
    with pytest.raises(C.ConfigError, match="NAME<=NUMBER"):
        T.Constraint.parse("bytes<2000")
    assert T.parse_reference("val_accuracy=0.5,bytes=3000") == {"val_accuracy": 0.5, "bytes": 3000.0}
    assert T.parse_reference(None) == "baseline" and T.parse_reference("nadir") is None


def test_hypervolume_exact():
    pts = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0], [3.5, 3.5]])
    assert T.hypervolume(pts, np.array([4.0, 4.0])) == pytest.approx(3 + 2 + 1)
    cube = np.array([[0.0, 0.0, 0.0]])
    assert T.hypervolume(cube, np.ones(3)) == pytest.approx(1.0)
    two = np.array([[0.0, 0.5, 0.5], [0.5, 0.0, 0.0]])  # union of two boxes: 0.25 + 0.5 - 0.125
    assert T.hypervolume(two, np.ones(3)) == pytest.approx(0.625)


def test_importance_ranks_the_parameter_that_matters():
    space = Space({"a": Float(0, 1), "b": Categorical(["x", "y"])})
    rng = np.random.default_rng(0)
    params = [{"a": float(rng.random()), "b": ["x", "y"][i % 2]} for i in range(20)]
    y = [3 * p["a"] + 0.1 * rng.normal() for p in params]
    imp = T.importance(space, params, y)
    assert imp["a"] > 0.8 and imp["b"] < 0.3
    assert T.importance(space, params[:3], y[:3]) == {}  # too few trials to say


# ----------------------------------------------------------------------------- fake runs (fast)


def _fake_run(config, workdir, **_):
    """A run whose val and test accuracy differ, a function of the learning rate."""
    lr = config.stages[0].learning_rate
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(C.to_json(config))
    if lr > 0.01:
        raise RuntimeError("learning rate too high for this test")
    val = 1.0 - abs(math.log10(lr) + 2.0)
    metrics = {"val_accuracy": val, "test_accuracy": val - 0.5, "params": 100, "nonzeros": 100, "bytes_fp32": 1e4 * lr}
    metrics.update({"flops": 10.0, "latency_ms": 0.1})
    if 0.007 < lr <= 0.01:
        metrics["val_accuracy"] = float("nan")
    return {"stages": [{"label": "0_train", "metrics": metrics}]}


def test_an_objective_no_stage_reports_stops_the_study_at_the_first_trial(base_and_space, tmp_path, monkeypatch):
    """A misspelt objective is the same in every trial: a config error after the first run, not
    every trial trained to the same failure."""
    base, space = base_and_space
    monkeypatch.setattr(run_lib, "run", _fake_run)
    workdir = tmp_path / "tune"
    with pytest.raises(T.UnknownMetricError, match="no metric 'val_acuracy'; did you mean 'val_accuracy'"):
        T.tune(base, space, str(workdir), trials=4, sampler="random", objectives=["val_acuracy:max"],
               reference=None, config_spec=None, compilation_cache=False, plot_every=0, echo=False)  # fmt: skip
    assert sorted(os.listdir(workdir / "trials")) == ["0000"]


def test_objectives_from_validation_failures_recorded_and_outputs(base_and_space, tmp_path, monkeypatch):
    base, space = base_and_space
    monkeypatch.setattr(run_lib, "run", _fake_run)
    workdir = str(tmp_path / "tune")
    result = T.tune(
        base,
        space,
        workdir,
        trials=8,
        sampler="random",
        objectives=["val_accuracy:max", "bytes:min"],
        constraints=["bytes<=30"],
        reference=None,
        config_spec=None,
        compilation_cache=False,
        plot_every=0,
        echo=False,
    )
    summary, states = _states(workdir)
    assert [n for n, _ in states] == list(range(8))
    done = [t for t in result.trials if t["state"] == "COMPLETE"]
    failed = result.failed
    assert done and failed
    for t in done:  # the objective is validation accuracy, never test accuracy
        assert t["values"][0] == pytest.approx(t["metrics"]["val_accuracy"])
        assert t["values"][0] != pytest.approx(t["metrics"]["test_accuracy"])
        assert t["feasible"] == (t["metrics"]["bytes_fp32"] <= 30)
    infeasible = [t for t in done if not t["feasible"]]
    assert infeasible and len(infeasible) < len(done)
    for t in infeasible:  # the sampler is told values worse than every feasible trial before it
        earlier = [f for f in done if f["feasible"] and f["number"] < t["number"]]
        assert t["study_values"] != t["values"]
        assert all(t["study_values"][0] < f["values"][0] and t["study_values"][1] > f["values"][1] for f in earlier)
    for t in failed:
        assert ("too high" in t["error"] and "Traceback" in t["traceback"]) or "not finite" in t["error"]
    assert any("too high" in t["error"] for t in failed)
    assert os.path.exists(os.path.join(workdir, "trials", f"{failed[0]['number']:04d}", "trial.json"))
    front = result.pareto
    assert front and all(t["feasible"] for t in front)
    for name in ("tune.json", "tune.txt", "pareto.png", "history.png", "hypervolume.png", "params.png"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert summary["hypervolume"] > 0
    assert "learning_rate" in open(os.path.join(workdir, "tune.txt")).read()
    assert set(summary["importance"]["val_accuracy:max"]) >= {"stages.train.learning_rate"}
    assert sorted(os.listdir(os.path.join(workdir, "best"))) == sorted([f"trial_{t['number']:04d}.json" for t in front])
    # a rerun with more trials resumes: the first 8 are kept, 2 more are added
    again = T.tune(base, space, workdir, trials=10, sampler="random", objectives=["val_accuracy:max", "bytes:min"],
                   constraints=["bytes<=30"], reference=None, compilation_cache=False, plot_every=0, echo=False)  # fmt: skip
    assert [t["number"] for t in again.trials] == list(range(10))
    assert [t["values"] for t in again.trials[:8]] == [t["values"] for t in result.trials]
    with pytest.raises(C.ConfigError, match="other"):
        T.tune(base, space, workdir, trials=10, sampler="tpe", objectives=["val_accuracy:max", "bytes:min"],
               constraints=["bytes<=30"], reference=None, compilation_cache=False, plot_every=0, echo=False)  # fmt: skip


@pytest.mark.parametrize("objectives", [["val_accuracy:max"], ["val_accuracy:max", "bytes:min"]])
def test_params_png_has_a_panel_per_objective_and_parameter_with_the_trials_where_it_was_active(
    base_and_space, tmp_path, monkeypatch, objectives
):
    base, space = base_and_space
    monkeypatch.setattr(run_lib, "run", _fake_run)
    workdir = str(tmp_path / "tune")
    result = T.tune(base, space, workdir, trials=12, sampler="random", objectives=objectives,
                    reference=None, config_spec=None, compilation_cache=False, plot_every=0, echo=False)  # fmt: skip
    figures = {}

    def keep(figure, path, **kwargs):
        figures[os.path.basename(path)] = figure
        return path

    monkeypatch.setattr(report_lib, "save_figure", keep)
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "close", lambda *a: None)  # keep the figures to look at
    T._plot(T._read_json(os.path.join(workdir, "tune.json")), workdir)
    monkeypatch.undo()
    panels = [ax for ax in figures["params.png"].axes if ax.get_visible() and ax.get_title()]  # not the colour bar
    names = list(space.names)
    assert [ax.get_title().split()[0] for ax in panels] == names * len(objectives)
    done = [t for t in result.trials if t["state"] == "COMPLETE" and t["values"] is not None]
    for j, objective in enumerate(objectives):
        pick = max if objective.endswith(":max") else min
        best = pick(done, key=lambda t, j=j: t["values"][j])["number"]
        for ax, name in zip(panels[j * len(names) : (j + 1) * len(names)], names, strict=True):
            active = [t for t in done if t["params"].get(name) is not None]
            # the feasible trials' dots (the first collection), the infeasible crosses, the best's ring
            trials = [ax.collections[0], *(c for c in ax.collections if c.get_label() == "infeasible")]
            ys = sorted(float(y) for c in trials for _, y in c.get_offsets())
            assert ys == pytest.approx(sorted(t["values"][j] for t in active)), (objective, name)
            ringed = sum(len(c.get_offsets()) for c in ax.collections) - len(active)
            assert ringed == any(t["number"] == best for t in active), (objective, name)
    by_name = dict(zip(names, panels, strict=False))
    assert by_name["stages.train.learning_rate"].get_xscale() == "log"
    assert [t.get_text() for t in by_name["stages.train.optimizer"].get_xticklabels()] == list(
        space["stages.train.optimizer"].choices
    )
    for figure in figures.values():
        plt.close(figure)


def test_a_point_whose_config_finished_before_is_not_trained_again(base_and_space, tmp_path, monkeypatch):
    """Points that become the same config (here: two learning-rate choices, six trials) take the
    earlier trial's metrics instead of a second identical run."""
    base, _ = base_and_space
    runs = []

    def counting(config, workdir, **kw):
        runs.append(config.stages[0].learning_rate)
        return _fake_run(config, workdir, **kw)

    monkeypatch.setattr(run_lib, "run", counting)
    space = Space({"stages.train.learning_rate": Categorical([0.001, 0.003])})
    workdir = str(tmp_path / "tune")
    T.tune(base, space, workdir, trials=6, sampler="random", reference=None, config_spec=None,
           compilation_cache=False, plot_every=0, echo=False)  # fmt: skip
    assert sorted(runs) == sorted(set(runs))  # each distinct config trained once
    summary, states = _states(workdir)
    assert states == [(n, "COMPLETE") for n in range(6)]
    infos = [T._trial_info(workdir, n) for n in range(6)]
    twins = [i for i in infos if "duplicate_of" in i]
    assert len(twins) == 6 - len(runs) > 0
    for info in twins:
        first = infos[info["duplicate_of"]]
        assert "duplicate_of" not in first and first["config_digest"] == info["config_digest"]
        assert info["objectives"] == first["objectives"] and info["run_dir"] == first["run_dir"]
        assert info["params"] == first["params"]


def test_reference_point_baseline_and_user_given(base_and_space, tmp_path, monkeypatch):
    base, space = base_and_space
    monkeypatch.setattr(run_lib, "run", _fake_run)
    kw = dict(
        trials=3, sampler="random", objectives=["val_accuracy:max", "bytes:min"], compilation_cache=False, plot_every=0
    )
    res = T.tune(base, space, str(tmp_path / "b"), reference="baseline", echo=False, **kw)
    lr = base.stages[0].learning_rate  # the unmodified config's own metrics are the reference
    assert res.summary["reference"] == pytest.approx([1.0 - abs(math.log10(lr) + 2.0), 1e4 * lr])
    res = T.tune(base, space, str(tmp_path / "u"), reference={"val_accuracy": 0.0, "bytes": 1e3}, echo=False, **kw)
    assert res.summary["reference"] == pytest.approx([0.0, 1e3])
    done = [t for t in res.trials if t["state"] == "COMPLETE"]
    pts = np.array([[-t["values"][0], t["values"][1]] for t in done])
    assert res.summary["hypervolume"] == pytest.approx(T.hypervolume(pts, np.array([0.0, 1e3])))


# ----------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def real_study(base_and_space, config_file, tmp_path_factory):
    base, space = base_and_space
    workdir = str(tmp_path_factory.mktemp("real"))
    result = T.tune(base, space, workdir, trials=2, sampler="random", config_spec=config_file, plot_every=0, echo=False)
    return workdir, result


def test_best_config_reruns_to_the_same_metrics(real_study, tmp_path):
    workdir, result = real_study
    (best,) = result.pareto
    assert best["state"] == "COMPLETE" and best["compile_seconds"] > 0
    path = os.path.join(workdir, "best", f"trial_{best['number']:04d}.py")
    report = run_lib.run(C.load_config(path), str(tmp_path / "rerun"), progress=False, echo=False)
    metrics = report["stages"][-1]["metrics"]
    for key in ("val_accuracy", "test_accuracy", "nonzeros", "bytes_fp32"):
        assert metrics[key] == pytest.approx(best["metrics"][key], rel=1e-6), key


def test_asha_promotion_continues_from_checkpoint(base_and_space, config_file, tmp_path, monkeypatch):
    from research.train import checkpoint

    restored = []
    real_restore = checkpoint.Checkpointer.restore_latest

    def spy(self, template):
        out = real_restore(self, template)
        if out is not None:
            restored.append(int(out[1]))
        return out

    monkeypatch.setattr(checkpoint.Checkpointer, "restore_latest", spy)
    base, space = T.load_config_and_space(config_file + ":9")
    workdir = str(tmp_path / "asha")
    result = T.tune(base, space, workdir, trials=3, sampler="random", budget_key="stages.train.steps",
                    scheduler="asha", min_budget=3, eta=3, compilation_cache=False, plot_every=0, echo=False)  # fmt: skip
    promoted = [t for t in result.trials if t["budget"] == 9.0]
    assert len(promoted) == 1 and promoted[0]["resumed_from"] == 3
    assert 3 in restored  # the promoted run restored its step-3 checkpoint...
    run_dir = os.path.join(workdir, promoted[0]["run_dir"])
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "stages", "0_train", "metrics.jsonl"))]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 10))  # ...and ran steps 4..9 once


def test_kill_minus_9_mid_trial_then_rerun_resumes(config_file, tmp_path):
    workdir = str(tmp_path / "killed")
    argv = [sys.executable, "-m", "research.cli", "tune", config_file + ":30", "--trials", "2", "--sampler", "random",
            "--workdir", workdir, "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    target = os.path.join(workdir, "trials", "0001", "stages", "0_train", "checkpoints")
    deadline = time.time() + 120
    while not os.path.exists(target) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert os.path.exists(target), "the first run never reached trial 1"
    _, states = _states(workdir)
    assert states == [(0, "COMPLETE")]  # trial 1 was running, not told
    assert cli.main(["tune", config_file + ":30", "--trials", "3", "--sampler", "random", "--workdir", workdir,
                     "--no-progress"]) == 0  # fmt: skip
    summary, states = _states(workdir)
    assert states == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "COMPLETE")]
    assert [t["attempts"] for t in summary["trials"]] == [1, 2, 1]


def test_two_workers_no_duplicate_or_lost_trial(base_and_space, config_file, tmp_path):
    base, space = base_and_space
    workdir = str(tmp_path / "workers")
    result = T.tune(
        base, space, workdir, trials=3, sampler="random", workers=2, config_spec=config_file, plot_every=0, echo=False
    )
    assert [t["number"] for t in result.trials] == [0, 1, 2]
    assert all(t["state"] == "COMPLETE" for t in result.trials)
    assert len({t["run_dir"] for t in result.trials}) == 3
    assert len({json.dumps(t["params"], sort_keys=True) for t in result.trials}) == 3
    assert len({t["worker"] for t in result.trials}) == 2  # both processes ran trials


# ----------------------------------------------------------------------------- per-layer policies


def _prune_config(model="mlp", options=None):
    from methods.pruning import PruneStage
    from methods.quantization import QuantizeStage
    from research.stages import TrainStage

    return C.Config(
        name="policy",
        model=C.ModelConfig(name=model, options=options or {}),
        data=C.DataConfig(name="digits", limit=300),
        stages=(
            TrainStage(steps=4, batch_size=32),
            PruneStage(sparsity=0.5, train=TrainStage(steps=2, batch_size=32, eval_every=0)),
            QuantizeStage(bits=8, calibration_examples=32),
        ),
    )


@pytest.mark.parametrize(
    "model", ["cnn1d", "lenet300", "lenet5", "mlp", "mobilenetv2", "resnet20", "resnet56", "vgg_small"]
)
def test_layer_policy_on_every_zoo_model(model):
    from methods.pruning import SparsityRule
    from methods.quantization import QuantRule
    from research.nn import list_models

    assert model in list_models()
    run_lib.register_all_stages()
    cfg = _prune_config(model)
    sp = T.layer_policy(cfg, key="stages.prune.rules", rule=SparsityRule, field="sparsity", domain=Float(0.0, 0.9))
    assert sp.layers and all(layer.endswith("kernel") for layer in sp.layers) and min(sp.sizes) > 0
    point = {n: 0.25 for n in sp.names}
    new, values = sp.apply(cfg, point)
    rules = new.stages[1].rules
    assert [r.sparsity for r in rules] == values == [0.25] * len(sp.layers)
    assert all(r.matches(layer) for r, layer in zip(rules, sp.layers, strict=True))
    qp = T.layer_policy(cfg, key="stages.quantize.rules", rule=QuantRule, field="bits", domain=Categorical([2, 4, 8]),
                        module_paths=True)  # fmt: skip
    assert [f"{m}/kernel" for m in qp.layers] == list(sp.layers)


def test_budget_repair_is_exact():
    from methods.pruning import SparsityRule

    sizes = (1000, 200, 50)
    sp = T.LayerPolicy("stages.prune.rules", SparsityRule, "sparsity", ("a", "b", "c"), sizes, Float(0.0, 0.9),
                       budget_bytes=600.0, bits=8)  # fmt: skip
    assert sp.repair([0.9, 0.9, 0.9]) == [0.9, 0.9, 0.9]  # within budget: unchanged
    fixed = sp.repair([0.2, 0.5, 0.0])  # 950 bytes -> 600
    assert sp.cost(fixed) == pytest.approx(600.0, rel=1e-9)
    kept = [1 - v for v in fixed]  # one factor scales every kept fraction (none clipped here)
    assert kept[0] / 0.8 == pytest.approx(kept[1] / 0.5) == pytest.approx(kept[2] / 1.0)
    with pytest.raises(C.ConfigError, match="raise the budget"):
        dataclass_replace = __import__("dataclasses").replace
        dataclass_replace(sp, budget_bytes=10.0).repair([0.0, 0.0, 0.0])
    bits = T.LayerPolicy("stages.quantize.rules", SparsityRule, "bits", ("a", "b", "c"), sizes, Categorical([2, 4, 8]),
                         budget_bytes=4 * sum(sizes) / 8)  # fmt: skip
    out = bits.repair([8, 8, 8])
    assert bits.cost(out) <= bits.budget_bytes and set(out) <= {2, 4, 8}
    assert out[0] < 8  # the largest layer gives up bits first
    assert bits.repair([4, 4, 4]) == [4, 4, 4]


def test_tune_with_a_policy_writes_rules_and_best_config(tmp_path, monkeypatch):
    from methods.pruning import SparsityRule

    run_lib.register_all_stages()
    cfg = _prune_config(options={"widths": (8,)})
    policy = T.layer_policy(cfg, key="stages.prune.rules", rule=SparsityRule, field="sparsity", domain=Float(0.0, 0.9),
                            budget_bytes=300.0, bits=8)  # fmt: skip
    space = Space({"stages.train.learning_rate": Float(1e-3, 1e-2, log=True), **policy.parameters()})
    seen = []

    def fake(config, workdir, **_):
        rules = config.stages[1].rules
        seen.append(policy.cost([r.sparsity for r in rules]))
        kept = sum(n * (1 - r.sparsity) for n, r in zip(policy.sizes, rules, strict=True))
        m = {"val_accuracy": kept / sum(policy.sizes), "test_accuracy": 0.0, "params": 1, "nonzeros": 1}
        return {"stages": [{"metrics": {**m, "bytes_fp32": kept, "flops": 1.0, "latency_ms": 1.0}}]}

    monkeypatch.setattr(run_lib, "run", fake)
    workdir = str(tmp_path / "policy")
    result = T.tune(cfg, space, workdir, trials=4, sampler="random", policies=[policy], compilation_cache=False, plot_every=0,
                    echo=False)  # fmt: skip
    assert len(seen) == 4 and max(seen) <= 300.0 * (1 + 1e-9)  # every trained point met the budget
    best = result.pareto[0]  # trials repaired to the same budget can tie
    assert len(best["rules"]["stages.prune.rules"]) == len(policy.layers)
    # The base config was given in Python (no config file), so best/ holds the trial as data, not code.
    with open(os.path.join(workdir, "best", f"trial_{best['number']:04d}.json")) as f:
        saved = json.load(f)
    rules = [eval(src, {"SparsityRule": SparsityRule}) for src in saved["rules"]["stages.prune.rules"]]  # noqa: S307
    rerun = C.apply_overrides(cfg, saved["overrides"])
    rerun = C._set(rerun, ["stages", "prune", "rules"], tuple(rules), "stages.prune.rules")
    assert [r.sparsity for r in rerun.stages[1].rules] == [best["repaired"][n] for n in policy.names]
    with pytest.raises(C.ConfigError, match="no policy provides"):
        T.check_space(cfg, space)


def test_hyperband_runs_every_rung_and_stops(config_file, tmp_path, monkeypatch):
    monkeypatch.setattr(run_lib, "run", _fake_run)
    base, space = T.load_config_and_space(config_file + ":9")
    with pytest.raises(C.ConfigError, match="first bracket starts 9"):
        T.tune(base, space, str(tmp_path / "hb0"), trials=6, budget_key="stages.train.steps", scheduler="hyperband",
               min_budget=1, compilation_cache=False)  # fmt: skip
    result = T.tune(base, space, str(tmp_path / "hb"), trials=9, sampler="random", budget_key="stages.train.steps",
                    scheduler="hyperband", min_budget=1, eta=3, compilation_cache=False, plot_every=0,
                    echo=False)  # fmt: skip
    assert [t["number"] for t in result.trials] == list(range(9))
    assert not [t for t in result.trials if t["state"] == "RUNNING"]
    assert {t["budget"] for t in result.trials} >= {3.0, 9.0}  # promotions happened
    with pytest.raises(C.ConfigError, match="one objective"):
        T.tune(base, space, str(tmp_path / "hb2"), trials=2, objectives=["val_accuracy:max", "bytes:min"],
               budget_key="stages.train.steps", scheduler="asha", compilation_cache=False)  # fmt: skip


def test_cli_errors_before_anything_trains(config_file, tmp_path, capsys):
    no_space = tmp_path / "no_space.py"
    no_space.write_text(TINY_CONFIG.split("def get_space")[0])
    workdir = str(tmp_path / "w")
    assert cli.main(["tune", str(no_space), "--trials", "2", "--workdir", workdir]) == 2
    assert "has no get_space" in capsys.readouterr().err
    bad = tmp_path / "bad.py"
    bad.write_text(TINY_CONFIG.replace('"stages.train.learning_rate"', '"stages.train.lr"'))
    assert cli.main(["tune", str(bad), "--trials", "2", "--workdir", workdir]) == 2
    err = capsys.readouterr().err
    assert "'stages.train.lr' is not a config key" in err and "stages.train.learning_rate" in err
    assert (
        cli.main(["tune", config_file, "--trials", "2", "--objective", "test_accuracy:max", "--workdir", workdir]) == 2
    )
    assert "only reported" in capsys.readouterr().err
    assert cli.main(["tune", config_file, "--trials", "2", "--sampler", "tpee", "--workdir", workdir]) == 2
    assert "sampler='tpee': unknown sampler 'tpee'; did you mean 'tpe'?" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(workdir, "trials"))
