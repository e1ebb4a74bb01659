"""`slimjax nas` on the smoke config: supernet, search, extraction, fine-tuning, then int8 quantization."""

import json

import numpy as np
import pytest
from flax import nnx

from research import cli
from research import nn
from research import run as run_lib


@pytest.mark.slow  # the whole nas pipeline: supernet, search, fine-tuning, int8 quantization
def test_nas_cli_smoke_runs_the_stage_and_prints_the_front(tmp_path, capsys):
    # max_flops below the largest member's, so the chosen member is not the config's default model
    argv = ["nas", "configs/nas_mnist1d.py:smoke", "--workdir", str(tmp_path), "--no-progress"]
    assert cli.main([*argv, "--set", "stages.nas.max_flops=100000"]) == 0
    out = capsys.readouterr().out
    assert "Pareto front of conv1d_family" in out and "chosen:" in out
    found = json.loads((tmp_path / "stages" / "0_nas" / "nas.json").read_text())
    assert len(found["candidates"]) == 4 and any(r["pareto"] for r in found["candidates"])
    assert (tmp_path / "report.json").exists()
    # the finished stage is stored as the chosen member's recipe and rebuilds from it (load_run)
    steps = json.loads((tmp_path / "stages" / "0_nas" / "result" / "recipe.json").read_text())["steps"]
    assert steps[0]["kind"] == "zoo_model" and steps[0]["data"]["options"] == found["chosen"]
    _, model, _ = run_lib.load_run(str(tmp_path))
    assert nn.param_count(model) < nn.param_count(
        nn.build_model("conv1d_family", input_shape=(40,), num_classes=10, rngs=nnx.Rngs(0))
    )
    x = np.ones((2, 40), np.float32)
    assert np.all(np.isfinite(np.asarray(model(x))))


def test_nas_cli_refuses_a_config_without_a_nas_stage(capsys):
    assert cli.main(["nas", "configs/quickstart.py:smoke"]) == 2
    assert "has no nas stage" in capsys.readouterr().err
