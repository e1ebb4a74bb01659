import json
import os

import jax
import pytest

from research import cli
from research import config as C
from research import run as run_lib
from research import tune as tune_lib


@pytest.mark.slow  # the whole smoke pipeline, export included
def test_quickstart_smoke_end_to_end(tmp_path, capsys):
    workdir = tmp_path / "qs"
    assert cli.main(["run", "configs/quickstart.py:smoke", "--workdir", str(workdir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "test acc" in out and "0_train" in out
    for name in (
        "config.json",
        "report.json",
        "report.txt",
        "curves.png",
        "stages/0_train/metrics.jsonl",
        "stages/0_train/result/recipe.json",
        "stages/0_train/result/state.npz",
        "stages/0_train/result/record.json",
    ):
        assert (workdir / name).exists(), name
    report = json.loads((workdir / "report.json").read_text())
    m = report["stages"][0]["metrics"]
    assert m["test_accuracy"] > 0.5 and m["params"] > 0 and m["flops"] > 0 and m["latency_ms"] > 0
    assert m["train_steps_per_s"] > 0
    env = report["environment"]
    assert env["backend"] == jax.default_backend() and env["device"] == jax.devices()[0].device_kind
    assert f"on: {env['device']} x{env['device_count']}" in (workdir / "report.txt").read_text()
    # Every exported artifact's measured latency is a metric that `slimjax tune` can optimise.
    last = report["stages"][-1]
    artifacts = [r["artifact"] for r in last["tables"]["artifacts"] if r["artifact"] != "jax"]
    assert last["kind"] == "export" and "tflite_fp32" in artifacts
    for name in artifacts:
        objective = tune_lib.Objective.parse(f"{name}_latency_ms:min")
        assert tune_lib.metric_value(last["metrics"], objective.name) > 0
    # Running again resumes: the finished stage is loaded, not retrained.
    report2 = run_lib.run(C.load_config("configs/quickstart.py:smoke"), str(workdir), progress=False)
    assert report2["stages"][0]["metrics"] == m
    assert "finished earlier" in capsys.readouterr().err
    assert cli.main(["report", str(workdir)]) == 0
    _, model, _ = run_lib.load_run(str(workdir))
    assert model is not None


def test_bad_set_key_fails_before_training(tmp_path, capsys):
    workdir = tmp_path / "bad"
    code = cli.main(["run", "configs/quickstart.py:smoke", "--workdir", str(workdir), "--set", "stages.0.stepz=3"])
    err = capsys.readouterr().err
    assert code == 2 and "stepz" in err and "valid keys" in err and "'steps'" in err
    assert not workdir.exists()  # nothing was trained or written


def test_workdir_of_other_config_is_refused(tmp_path):
    cfg = C.apply_overrides(C.load_config("configs/quickstart.py:smoke"), ["stages.0.steps=4"])
    # The workdir of a finished run of ``cfg``: its config.json is what the check reads (written
    # here directly instead of training and exporting the smoke pipeline).
    config_json = C.to_json(cfg) + "\n"
    (tmp_path / "config.json").write_text(config_json)
    (tmp_path / "report.json").write_text('{"stages": []}')
    other = C.apply_overrides(cfg, ["stages.0.steps=5"])
    with pytest.raises(C.ConfigError, match="different config"):
        run_lib.run(other, str(tmp_path), progress=False, echo=False)
    # The refused run changed nothing: the earlier run's files are as they were.
    assert (tmp_path / "config.json").read_text() == config_json
    assert (tmp_path / "report.json").read_text() == '{"stages": []}'
    assert not os.path.exists(tmp_path / "stages")
