import json
import math
import os
import shutil

import pytest

from research import cli
from research import config as C
from research import report as report_lib
from research import run as run_lib
from research import sweep as sweep_lib
from research import workdir as workdir_lib

TINY_CONFIG = """
from methods.pruning import PruneStage
from research.config import Config, DataConfig, ModelConfig
from research.stages import TrainStage


def get_config(arg=None):
    return Config(
        name="tiny",
        model=ModelConfig(name="mlp", options={"widths": (16,)}),
        data=DataConfig(name="digits", limit=400),
        stages=(
            TrainStage(steps=4, batch_size=32, checkpoint_every=4, eval_every=4, log_every=2),
            PruneStage(sparsity=0.9, train=TrainStage(steps=2, batch_size=32, eval_every=0)),
        ),
    )
"""
GRID = {"stages.prune.sparsity": [0.5, 0.8], "seed": [0, 1]}


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.py"
    path.write_text(TINY_CONFIG)
    return str(path)


@pytest.fixture(scope="module")
def base(config_file):
    return C.load_config(config_file)


@pytest.fixture(scope="module")
def swept(base, tmp_path_factory):
    """The 2x2 grid, run once for the module: (workdir, report)."""
    workdir = str(tmp_path_factory.mktemp("sweep"))
    return workdir, sweep_lib.sweep(base, GRID, workdir, progress=False)


@pytest.fixture
def count_runs(monkeypatch):
    """Records the run dir of each run_lib.run call; runs whose dir name is in ``fail`` raise."""
    real = run_lib.run
    calls, fail = [], set()

    def counting(config, workdir, **kwargs):
        name = os.path.basename(workdir)
        calls.append(name)
        if name in fail:
            raise RuntimeError(f"boom in {name}")
        return real(config, workdir, **kwargs)

    monkeypatch.setattr(run_lib, "run", counting)
    return calls, fail


def _copy(swept, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(swept[0], dst)
    return dst


def test_grid_product_runs_every_point_with_its_overrides(swept):
    workdir, report = swept
    assert [p.overrides for p in report.points] == [
        {"stages.prune.sparsity": 0.5, "seed": 0},
        {"stages.prune.sparsity": 0.5, "seed": 1},
        {"stages.prune.sparsity": 0.8, "seed": 0},
        {"stages.prune.sparsity": 0.8, "seed": 1},
    ]
    assert sorted(os.listdir(os.path.join(workdir, "runs"))) == [
        "0_sparsity=0.5_seed=0",
        "1_sparsity=0.5_seed=1",
        "2_sparsity=0.8_seed=0",
        "3_sparsity=0.8_seed=1",
    ]
    assert not report.failed
    for p in report.points:
        assert p.status == "done" and not p.reused and p.error is None
        cfg = run_lib.load_run_config(p.run_dir)
        assert cfg["seed"] == p.overrides["seed"]
        assert cfg["stages"][1]["sparsity"] == p.overrides["stages.prune.sparsity"]
        with open(os.path.join(p.run_dir, "report.json")) as f:
            assert p.metrics == json.load(f)["stages"][-1]["metrics"]
        assert p.metrics["mask_sparsity"] == pytest.approx(p.overrides["stages.prune.sparsity"], abs=1e-3)
    by = {(p.overrides["stages.prune.sparsity"], p.overrides["seed"]): p.metrics for p in report.points}
    for seed in (0, 1):
        assert by[0.8, seed]["nonzeros"] < by[0.5, seed]["nonzeros"]


def test_sequential_trials_draw_their_curves_on_one_kept_figure(base, tmp_path, monkeypatch):
    real_run, real_redraw = run_lib.run, report_lib.redraw_curves
    plots, redrawn = [], []

    def recording(config, workdir, **kwargs):
        plots.append(kwargs["hooks"].plot)
        return real_run(config, workdir, **kwargs)

    def redraw(figure, workdir, series):
        redrawn.append(workdir)
        return real_redraw(figure, workdir, series)

    monkeypatch.setattr(run_lib, "run", recording)
    monkeypatch.setattr(report_lib, "redraw_curves", redraw)
    report = sweep_lib.sweep(base, {"seed": [0, 1]}, str(tmp_path), progress=False, executor="sequential")
    assert len(plots) == 2 and plots[0] is plots[1] and isinstance(plots[0], report_lib.CurvePlotter)
    assert redrawn == [report.points[1].run_dir]  # the first drew the figure, the second updated it
    for p in report.points:
        assert os.path.getsize(os.path.join(p.run_dir, "curves.png")) > 0


def test_sweep_files_are_written(swept):
    workdir, report = swept
    with open(os.path.join(workdir, "sweep.json")) as f:
        saved = json.load(f)
    assert saved["grid"] == GRID
    assert [p["status"] for p in saved["points"]] == ["done"] * 4
    assert [p["overrides"] for p in saved["points"]] == [dict(p.overrides) for p in report.points]
    assert [p["run_dir"] for p in saved["points"]] == [p.run_dir for p in report.points]
    assert [p["metrics"] for p in saved["points"]] == [dict(p.metrics) for p in report.points]
    with open(os.path.join(workdir, "sweep.txt")) as f:
        lines = f.read().strip().splitlines()
    assert len(lines) == 2 + 4  # header, rule, one row per point
    for col in ("point", "stages.prune.sparsity", "seed", "status", "test acc", "bytes", "FLOPs", "latency ms"):
        assert col in lines[0], col
    assert lines[4].split()[:4] == ["2", "0.8", "0", "done"]
    assert lines == report.table().splitlines()
    for name in ("sweep.png", "grid.png"):
        with open(os.path.join(workdir, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_resume_reruns_only_missing_and_interrupted_points(base, swept, count_runs, tmp_path):
    workdir = _copy(swept, tmp_path)
    calls, _ = count_runs
    missing, interrupted = "1_sparsity=0.5_seed=1", "2_sparsity=0.8_seed=0"
    shutil.rmtree(os.path.join(workdir, "runs", missing))
    # An interrupted run: report.json after the train stage; the prune stage never finished.
    report_path = os.path.join(workdir, "runs", interrupted, "report.json")
    with open(report_path) as f:
        run_report = json.load(f)
    train_metrics = run_report["stages"][0]["metrics"]
    run_report["stages"] = run_report["stages"][:1]
    with open(report_path, "w") as f:
        json.dump(run_report, f)
    shutil.rmtree(os.path.join(workdir, "runs", interrupted, "stages", "1_prune", "result"))

    report = sweep_lib.sweep(base, GRID, workdir, progress=False)
    assert sorted(calls) == [missing, interrupted]
    assert [p.status for p in report.points] == ["done"] * 4
    assert [p.reused for p in report.points] == [True, False, False, True]
    assert report.points[0].metrics == swept[1].points[0].metrics
    assert report.points[3].metrics == swept[1].points[3].metrics
    # The interrupted run kept its train stage (retraining would re-measure train_steps_per_s).
    with open(report_path) as f:
        resumed = json.load(f)
    assert len(resumed["stages"]) == 2 and resumed["stages"][0]["metrics"] == train_metrics

    calls.clear()
    sweep_lib.sweep(base, GRID, workdir, progress=False)
    assert calls == []  # every point finished: nothing runs


def test_a_failing_point_is_recorded_and_the_others_finish(base, swept, count_runs, tmp_path):
    workdir = _copy(swept, tmp_path)
    calls, fail = count_runs
    for name in ("0_sparsity=0.5_seed=0", "2_sparsity=0.8_seed=0"):
        shutil.rmtree(os.path.join(workdir, "runs", name))
    fail.add("0_sparsity=0.5_seed=0")
    report = sweep_lib.sweep(base, GRID, workdir, progress=False)
    assert calls == ["0_sparsity=0.5_seed=0", "2_sparsity=0.8_seed=0"]
    assert [p.status for p in report.points] == ["failed", "done", "done", "done"]
    assert report.failed == (report.points[0],)
    assert report.points[0].error == "RuntimeError: boom in 0_sparsity=0.5_seed=0" and not report.points[0].metrics
    with open(os.path.join(report.points[0].run_dir, "error.txt")) as f:
        assert "RuntimeError: boom" in f.read()
    with open(os.path.join(workdir, "sweep.json")) as f:
        saved = json.load(f)["points"][0]
    assert saved["status"] == "failed" and "boom" in saved["error"]
    assert report.table().splitlines()[2].split()[3] == "failed"
    # The next sweep retries the failed point only.
    fail.clear()
    calls.clear()
    report = sweep_lib.sweep(base, GRID, workdir, progress=False)
    assert calls == ["0_sparsity=0.5_seed=0"] and not report.failed


@pytest.mark.parametrize(
    "grid, match",
    [
        ({"seed": [0], "stages.0.stepz": [3]}, r"sweep point 0 \(seed=0_stepz=3\).*'stepz'.*valid keys.*'steps'"),
        ({"seed": [0, "one"]}, r"sweep point 1 \(seed=one\): seed='one' must be an int"),
        ({"stages.train.steps": [4, 0]}, r"sweep point 1 .*steps=0 must be >= 1"),
        ({"stages.prune.sparsity": []}, r"empty list"),
        ({"seed": 3}, r"must be a list of values"),
        ({"seed": [float("nan")]}, r"not a Python literal"),
    ],
)
def test_invalid_grid_fails_before_anything_runs(base, count_runs, tmp_path, grid, match):
    calls, _ = count_runs
    with pytest.raises(C.ConfigError, match=match):
        sweep_lib.sweep(base, grid, str(tmp_path / "s"), progress=False)
    assert calls == [] and not (tmp_path / "s").exists()


def test_cli_sweep_parses_grid_values_and_reuses_finished_points(config_file, swept, count_runs, tmp_path, capsys):
    workdir = _copy(swept, tmp_path)
    calls, _ = count_runs
    argv = ["sweep", config_file, "--grid", "stages.prune.sparsity=0.5,0.8", "--grid", "seed=0,1"]
    assert cli.main([*argv, "--workdir", workdir, "--no-progress"]) == 0
    # The parsed values (floats, ints) give the same configs as the Python grid: nothing reruns.
    assert calls == []
    out = capsys.readouterr().out
    assert out.splitlines()[:6] == swept[1].table().splitlines()


def test_cli_sweep_default_workdir_and_exit_code_on_failure(config_file, count_runs, tmp_path, monkeypatch, capsys):
    calls, fail = count_runs
    monkeypatch.chdir(tmp_path)
    fail.add("0_steps=3")
    code = cli.main(["sweep", config_file, "--grid", "stages.train.steps=3", "--set", "seed=2", "--no-progress"])
    assert code == 1 and calls == ["0_steps=3"]
    assert "point 0 failed: RuntimeError: boom" in capsys.readouterr().err
    sweep_dir = tmp_path / "runs" / f"tiny-{workdir_lib.overrides_key(['seed=2'])}_sweep"  # --set: its own directory
    with open(sweep_dir / "sweep.json") as f:
        saved = json.load(f)
    assert saved["points"][0]["status"] == "failed"
    assert not (sweep_dir / "sweep.png").exists()  # no finished point to plot
    assert not (sweep_dir / "grid.png").exists()


@pytest.mark.parametrize(
    "grid_args, match",
    [
        (["seed"], "--grid 'seed' is not of the form KEY=V1,V2,..."),
        (["=0,1"], "--grid '=0,1' is not of the form KEY=V1,V2,..."),
        (["seed="], "--grid 'seed=' has an empty value; expected KEY=V1,V2,..."),
        (["seed=0,,1"], "--grid 'seed=0,,1' has an empty value"),
        (["seed=0", "seed=1"], "key 'seed' is given twice"),
        ([], "at least one --grid KEY=V1,V2,..."),
    ],
)
def test_cli_bad_grid_exits_2(config_file, count_runs, tmp_path, capsys, grid_args, match):
    calls, _ = count_runs
    argv = ["sweep", config_file, "--workdir", str(tmp_path / "s")]
    for g in grid_args:
        argv += ["--grid", g]
    assert cli.main(argv) == 2
    assert match in capsys.readouterr().err
    assert calls == [] and not (tmp_path / "s").exists()


def test_cli_bad_grid_key_exits_2_with_the_config_error(config_file, count_runs, tmp_path, capsys):
    calls, _ = count_runs
    code = cli.main(["sweep", config_file, "--grid", "stages.train.stepz=1,2", "--workdir", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and "config error" in err and "'stepz'" in err and "valid keys" in err
    assert calls == [] and not (tmp_path / "s").exists()


def test_parse_grid_splits_at_top_level_commas_and_parses_values():
    grid = cli.parse_grid(["stages.prune.sparsity=0.5,0.8", "model.options.widths=[64],[128, 64]", "name='a,b',c"])
    assert grid == {
        "stages.prune.sparsity": [0.5, 0.8],
        "model.options.widths": [[64], [128, 64]],
        "name": ["a,b", "c"],
    }
    assert all(isinstance(v, float) for v in grid["stages.prune.sparsity"])


def test_expand_grid_order_and_slug():
    points = sweep_lib.expand_grid({"a.x": [1, 2], "b": ["u", "v w"]})
    assert points == [{"a.x": 1, "b": "u"}, {"a.x": 1, "b": "v w"}, {"a.x": 2, "b": "u"}, {"a.x": 2, "b": "v w"}]
    assert sweep_lib.slug(points[1]) == "x=1_b=v-w"
    assert sweep_lib.slug({"model.options.widths": [128, 64]}) == "widths=-128-64"
    assert len(sweep_lib.slug({"k": "z" * 100})) == 60


@pytest.mark.parametrize(
    "acc, size, front",
    [
        ([0.9, 0.8, 0.95, 0.7], [100, 50, 200, 60], [1, 0, 2]),  # 3 (0.7 at 60) is beaten by 1 (0.8 at 50)
        ([0.9, 0.9, 0.8], [100, 100, 100], [0, 1]),  # equal points are both on the front
        ([0.9, 0.95, 0.9], [100, 100, 50], [2, 1]),  # same size: only the more accurate one
        ([0.5, math.nan, 0.6], [10, 5, math.nan], [0]),  # NaN points are left out
        ([0.5], [10], [0]),
        ([], [], []),
    ],
)
def test_pareto_front(acc, size, front):
    assert sweep_lib.pareto_front(acc, size) == front


def test_pareto_front_needs_one_size_per_accuracy():
    with pytest.raises(ValueError, match="accuracy has 2 values and size 1"):
        sweep_lib.pareto_front([0.1, 0.2], [3])


def test_report_populations_names_each_population_its_k_what_choosing_took_and_why():
    summary = {
        "populations": [
            {"population": 0, "trials": [0, 1, 2], "k": 1, "why": "sequential is faster", "separate_because": "",
             "choice": {"measuring_seconds": 9.24}},
            {"population": 1, "trials": [3], "k": 1, "why": "a single trial", "separate_because": "model differs",
             "choice": {"measuring_seconds": None}},
        ]
    }  # fmt: skip
    assert sweep_lib.report_populations(summary) == [
        "population 0: 3 trials, K=1 (choosing took 9.2 s): sequential is faster",
        "population 1: 1 trial, K=1: a single trial (separate: model differs)",
    ]
    assert sweep_lib.report_populations({"executor": "sequential"}) == []


def _report(grid, outcomes):
    """A sweep report over ``grid`` whose points finished with ``outcomes[index]`` test accuracy
    (``None``: failed; absent: pending)."""
    points = []
    for i, overrides in enumerate(sweep_lib.expand_grid(grid)):
        acc = outcomes.get(i, "pending")
        status = "pending" if acc == "pending" else ("failed" if acc is None else "done")
        metrics = {"test_accuracy": acc} if status == "done" else {}
        points.append(
            sweep_lib.SweepPoint(index=i, overrides=overrides, run_dir=f"r{i}", status=status, metrics=metrics)
        )
    return sweep_lib.SweepReport(workdir="w", grid=grid, points=tuple(points))


def test_grid_accuracy_lays_points_out_over_the_varying_keys():
    # lr (3 values) x a fixed key x wd (2 values): rows lr, columns wd, the fixed key left out.
    grid = {"stages.0.learning_rate": [1e-3, 3e-3, 1e-2], "seed": [0], "stages.0.weight_decay": [0.0, 0.1]}
    report = _report(grid, {0: 0.5, 1: 0.6, 2: 0.7, 3: None, 5: 0.9})  # 3 failed, 4 pending
    g = sweep_lib.grid_accuracy(report)
    assert g.rows == ("stages.0.learning_rate", (1e-3, 3e-3, 1e-2))
    assert g.columns == ("stages.0.weight_decay", (0.0, 0.1))
    assert g.best_over == ()
    expected = [[0.5, 0.6], [0.7, math.nan], [math.nan, 0.9]]
    assert g.accuracy.shape == (3, 2)
    for row, want in zip(g.accuracy.tolist(), expected, strict=True):
        assert row == pytest.approx(want, nan_ok=True)


def test_grid_accuracy_takes_the_best_over_keys_beyond_two():
    grid = {"a": [1, 2], "b": ["x", "y"], "seed": [0, 1, 2]}
    # point index = a * 6 + b * 3 + seed
    report = _report(grid, {0: 0.1, 1: 0.4, 2: 0.2, 3: 0.3, 9: 0.8, 10: float("nan")})
    g = sweep_lib.grid_accuracy(report)
    assert g.best_over == ("seed",)
    assert g.accuracy[0, 0] == 0.4 and g.accuracy[0, 1] == 0.3
    assert math.isnan(g.accuracy[1, 0]) and g.accuracy[1, 1] == 0.8  # a NaN accuracy is not a best


def test_grid_accuracy_of_one_key_is_a_column_and_of_none_is_nothing():
    g = sweep_lib.grid_accuracy(_report({"seed": [0, 1, 2], "x": [5]}, {0: 0.9, 2: 0.7}))
    assert g.columns is None and g.accuracy.shape == (3, 1)
    assert g.accuracy[:, 0].tolist() == pytest.approx([0.9, math.nan, 0.7], nan_ok=True)
    assert sweep_lib.grid_accuracy(_report({"seed": [0]}, {0: 0.9})) is None  # nothing varies
    assert sweep_lib.grid_accuracy(_report({"seed": [0, 1]}, {0: None})) is None  # nothing finished


@pytest.mark.parametrize(
    "grid, outcomes",
    [
        ({"a": [0.1, 0.2, 0.3]}, {0: 0.5, 2: 0.7}),
        ({"a": [0.1, 0.2], "b": [1, 2, 3]}, {0: 0.5, 4: 0.7, 5: 0.6}),
        ({"a": [0.1, 0.2], "b": [1, 2], "c": [True, False]}, {1: 0.5}),
    ],
)
def test_plot_grid_writes_an_image_for_one_two_and_more_keys(tmp_path, grid, outcomes):
    path = str(tmp_path / "grid.png")
    assert sweep_lib.plot_grid(_report(grid, outcomes), path) == path
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sweep_lib.plot_grid(_report(grid, {}), str(tmp_path / "none.png")) is None
    assert not (tmp_path / "none.png").exists()


def test_plot_grid_of_many_values_stays_a_viewable_size(tmp_path):
    from PIL import Image

    grid = {"a": list(range(60)), "b": list(range(50))}
    report = _report(grid, {i: (i % 7) / 7 for i in range(60 * 50)})
    path = sweep_lib.plot_grid(report, str(tmp_path / "grid.png"))
    width, height = Image.open(path).size
    limit = sweep_lib.MAX_INCHES * 110  # inches at the saved 110 dpi
    assert width <= limit and height <= limit
