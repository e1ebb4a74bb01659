"""research.workdir without training: the lock across real processes, stage keys, reconcile, --overwrite."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from research import cli
from research import config as C
from research import workdir as W
from research.stages import TrainStage

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HOLD = textwrap.dedent(
    """
    import sys
    from research.workdir import WorkdirLock
    lock = WorkdirLock(sys.argv[1], command="holder").acquire()
    print("locked", flush=True)
    sys.stdin.read()  # hold until the test closes stdin (or kills us)
    lock.release()
    """
)


def _holder(workdir):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(workdir)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _config(*steps):
    return C.Config(name="t", stages=tuple(TrainStage(steps=s) for s in steps))


CONFIG_FILE = textwrap.dedent(
    """
    from research.config import Config, ModelConfig
    from research.stages import TrainStage

    def get_config(arg=None):
        return Config(name="tiny", model=ModelConfig(name="mlp", options={"widths": (8,)}),
                      stages=(TrainStage(steps=4, checkpoint_every=2),))
    """
)


def test_second_process_is_refused_at_once_and_a_killed_holders_lock_is_taken_over(tmp_path, capsys):
    workdir = tmp_path / "run"
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(CONFIG_FILE)
    proc = _holder(workdir)
    try:
        holder = json.loads((workdir / ".lock").read_text())
        assert holder["pid"] == proc.pid and holder["host"] == socket.gethostname() and holder["command"] == "holder"
        with pytest.raises(W.WorkdirInUseError) as info:
            W.WorkdirLock(workdir).acquire()
        msg = str(info.value)
        assert f"workdir {workdir} is in use by pid {proc.pid} on {socket.gethostname()} since " in msg
        assert holder["started"] in msg and "another --workdir" in msg
        # The command line: one line, exit 2, and nothing written in the directory.
        for args in (["run", str(cfg_file)], ["sweep", str(cfg_file), "--grid", "seed=0,1"]):
            assert cli.main([*args, "--workdir", str(workdir), "--no-progress"]) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"slimjax: workdir {workdir} is in use by pid {proc.pid}") and "\n" not in err
        assert os.listdir(workdir) == [".lock"]
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    # Released cleanly: the file is empty and the next holder gets no warning.
    assert (workdir / ".lock").read_text() == ""
    with W.WorkdirLock(workdir):
        pass

    proc = _holder(workdir)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    with pytest.warns(
        W.WorkdirWarning, match=f"taking over the lock of .* left by pid {proc.pid} on .*no longer running"
    ):
        lock = W.WorkdirLock(workdir).acquire()
    assert json.loads((workdir / ".lock").read_text())["pid"] == os.getpid()
    with pytest.raises(W.WorkdirInUseError, match=f"pid {os.getpid()}"):  # even this process, a second time
        W.WorkdirLock(workdir).acquire()
    lock.release()
    # A lock file left by hand (or copied with the directory) whose holder holds no lock: taken over.
    (workdir / ".lock").write_text(json.dumps({"pid": 4194304, "host": "elsewhere", "started": "2026-01-01T00:00:00Z"}))
    with pytest.warns(W.WorkdirWarning, match="left by pid 4194304 on elsewhere since 2026-01-01T00:00:00Z"):
        W.WorkdirLock(workdir).acquire().release()


def test_stage_keys_depend_on_the_prefix_only():
    a = W.stage_keys(_config(10, 20, 30))
    assert len(set(a)) == 3
    assert W.stage_keys(_config(10, 20, 31))[:2] == a[:2] and W.stage_keys(_config(10, 20, 31))[2] != a[2]
    assert W.stage_keys(_config(10, 21, 30))[0] == a[0] and W.stage_keys(_config(10, 21, 30))[1] != a[1]
    assert W.stage_keys(_config(10))[0] == a[0]
    assert W.stage_keys(C.apply_overrides(_config(10, 20, 30), ["name='other'"])) == a  # the name is a label
    for key in ("seed=1", "data.val_fraction=0.2", "model.name='lenet5'", "latency_batch_size=4"):
        assert W.stage_keys(C.apply_overrides(_config(10, 20, 30), [key]))[0] != a[0], key
    # The dict in config.json gives the same keys as the Config.
    assert W.stage_keys(json.loads(C.to_json(_config(10, 20, 30)))) == a


def _make_run(workdir, config):
    """What run() leaves before training: config.json and keyed stage directories with a file each."""
    W.reconcile(str(workdir), config)
    for i, (label, key) in enumerate(zip(W.stage_labels(config), W.stage_keys(config), strict=True)):
        W.prepare_stage_dir(str(workdir), label, key, W.stage_prefix(config, i))
        (workdir / "stages" / label / "result.txt").write_text(f"{label} of {key}")


def test_reconcile_keeps_the_prefix_moves_the_rest_aside_and_moves_it_back(tmp_path):
    old = _config(10, 20, 30)
    _make_run(tmp_path, old)
    new = _config(10, 25, 30)
    notes = W.reconcile(str(tmp_path), new)
    assert sorted(os.listdir(tmp_path / "stages")) == ["0_train"]
    moved = sorted(os.listdir(tmp_path / "replaced"))
    assert [m.rsplit("-", 1)[0] for m in moved] == ["1_train", "2_train"]
    assert len(notes) == 2
    assert (
        notes[0].startswith("[1_train] config changed (stages.1.steps: 20 -> 25)") and "replaced/1_train-" in notes[0]
    )
    assert json.loads((tmp_path / "config.json").read_text())["stages"][1]["steps"] == 25
    _make_run(tmp_path, new)
    # Back to the old config: its stages 1 and 2 come back from replaced/, the new ones go there.
    W.reconcile(str(tmp_path), old)
    for i, (label, key) in enumerate(zip(W.stage_labels(old), W.stage_keys(old), strict=True)):
        W.prepare_stage_dir(str(tmp_path), label, key, W.stage_prefix(old, i))
        assert (tmp_path / "stages" / label / "result.txt").read_text() == f"{label} of {key}"
    assert sorted(os.listdir(tmp_path / "replaced")) == [f"{i}_train-{W.stage_keys(new)[i][:12]}" for i in (1, 2)]
    # Fewer stages: the extra one is set aside, with a note saying why.
    notes = W.reconcile(str(tmp_path), _config(10, 20))
    assert notes == [notes[0]] and notes[0].startswith("[2_train] the config has no such stage now")


def test_a_different_first_stage_is_refused_with_one_line(tmp_path):
    _make_run(tmp_path, _config(10, 20))
    before = (tmp_path / "config.json").read_text()
    for changed in (_config(11, 20), C.apply_overrides(_config(10, 20), ["seed=3"])):
        with pytest.raises(C.ConfigError) as info:
            W.reconcile(str(tmp_path), changed)
        msg = str(info.value)
        assert "\n" not in msg and "holds a run of a different config" in msg
        assert "use a new --workdir, or --overwrite" in msg
    assert "(stages.0.steps: 10 -> 11)" in str(
        pytest.raises(C.ConfigError, W.reconcile, str(tmp_path), _config(11, 20)).value
    )
    assert (tmp_path / "config.json").read_text() == before and sorted(os.listdir(tmp_path / "stages")) == [
        "0_train",
        "1_train",
    ]


def test_legacy_stage_dirs_are_adopted_and_an_unreadable_config_json_is_survived(tmp_path):
    cfg = _config(10, 20)
    _make_run(tmp_path, cfg)
    for label in W.stage_labels(cfg):  # a run directory from before key.json
        os.remove(tmp_path / "stages" / label / "key.json")
    notes = W.reconcile(str(tmp_path), _config(10, 21))
    assert len(notes) == 1 and notes[0].startswith("[1_train] config changed (stages.1.steps: 20 -> 21)")
    assert sorted(os.listdir(tmp_path / "stages")) == ["0_train"]
    assert json.loads((tmp_path / "stages" / "0_train" / "key.json").read_text())["key"] == W.stage_keys(cfg)[0]

    (tmp_path / "config.json").write_text('{"name": "t", "se')  # truncated
    with pytest.warns(W.WorkdirWarning, match="config.json is unreadable; using the stage directories' key.json"):
        assert W.reconcile(str(tmp_path), _config(10, 21)) == []
    (tmp_path / "config.json").write_text('{"name": "t", "se')
    os.remove(tmp_path / "stages" / "0_train" / "key.json")
    with pytest.raises(W.RunFileError, match=r"config.json is not valid JSON.*--overwrite or a new --workdir"):
        W.reconcile(str(tmp_path), _config(10, 21))


def test_overwrite_clears_only_run_directories(tmp_path):
    _make_run(tmp_path / "run", _config(10))
    assert W.clear(str(tmp_path / "run"), markers=("config.json", "stages")) == ["config.json", "stages"]
    assert os.listdir(tmp_path / "run") == []
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("years of work")
    with pytest.raises(C.ConfigError, match="not a slimjax run directory"):
        W.clear(str(tmp_path / "home"), markers=("config.json", "stages"))
    assert (tmp_path / "home" / "thesis.tex").exists()


def test_default_workdir_of_overrides_differs_from_the_base_configs():
    base = W.default_workdir("quickstart")
    a = W.default_workdir("quickstart", ["stages.train.steps=1000", "model.name=resnet20"])
    assert base == os.path.join("runs", "quickstart") and a.startswith(os.path.join("runs", "quickstart-"))
    assert a == W.default_workdir("quickstart", ["model.name = resnet20", "stages.train.steps=1000"])
    assert a != W.default_workdir("quickstart", ["stages.train.steps=999", "model.name=resnet20"])
    assert W.default_workdir("q", ["seed=1"], suffix="_sweep").endswith("_sweep")


def test_sweep_overwrite_deletes_the_previous_sweep(tmp_path, monkeypatch, capsys):
    from research import run as run_lib

    calls = []

    def fake_run(config, workdir, **kwargs):  # a finished one-stage run, without training
        calls.append(os.path.basename(workdir))
        os.makedirs(workdir, exist_ok=True)
        report = {"stages": [{"label": "0_train", "metrics": {"test_accuracy": 0.5, "bytes": 100}}]}
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(C.to_json(config) + "\n")
        with open(os.path.join(workdir, "report.json"), "w") as f:
            json.dump(report, f)
        return report

    monkeypatch.setattr(run_lib, "run", fake_run)
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(CONFIG_FILE)
    sweep_dir = tmp_path / "sweep"
    args = ["sweep", str(cfg_file), "--grid", "seed=0,1", "--workdir", str(sweep_dir), "--no-progress"]
    assert cli.main(args) == 0 and calls == ["0_seed=0", "1_seed=1"]
    assert cli.main(args) == 0 and len(calls) == 2  # finished points are read, not rerun
    (sweep_dir / "runs" / "7_seed=9").mkdir()  # a point of an earlier grid
    assert cli.main([*args, "--overwrite"]) == 0 and calls[2:] == ["0_seed=0", "1_seed=1"]
    assert sorted(os.listdir(sweep_dir / "runs")) == ["0_seed=0", "1_seed=1"]
    assert "overwrite: deleted grid.png, runs, sweep.json, sweep.png, sweep.txt" in capsys.readouterr().err
