"""Smoke test of the AMC-style channel-ratio search (``experiments/amc_policy/main.py --quick``)."""

import json

import numpy as np
import pytest

from experiments.amc_policy.main import main


@pytest.mark.slow  # the whole experiment in its quick configuration: a 2-trial search and both arms
def test_quick_run_writes_well_formed_results(tmp_path, capsys):
    result = main(["--quick", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "searched - uniform" in out and "uniform kept" in out

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["searched_ratios"] == result["searched_ratios"]
    assert (tmp_path / "accuracy_vs_flops.png").stat().st_size > 0
    assert len(result["trials"]) == 2
    assert all(t["state"] == "COMPLETE" for t in result["trials"])

    n = len(result["groups"])
    assert n == len(result["channels"]) == len(result["searched_ratios"]) == len(result["uniform_ratios"]) >= 2
    assert all(0.0 <= r <= result["recipe"]["max_ratio"] for r in result["searched_ratios"])
    # Uniform: one kept fraction for every group (up to whole channels).
    kept = np.asarray(result["uniform_kept"])
    channels = np.asarray(result["channels"])
    assert np.ptp(np.round(kept * channels) / channels) <= 1.0 / channels.min()
    # The repair fills the budget without exceeding it, in the model and as measured by the report.
    for arm in ("uniform", "searched"):
        assert result["modelled_flops_ratio"][arm] <= result["flops_budget"] + 1e-9
    assert [(r["seed"], r["arm"]) for r in result["rows"]] == [(0, "uniform"), (0, "searched")]
    for r in result["rows"]:
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert r["flops"] < r["dense_flops"]
        assert r["flops_ratio"] <= result["flops_budget"] + 0.02
        assert r["params"] > 0
    # Both arms start from the same dense model (one run directory, the dense stage reused).
    assert result["rows"][0]["dense_test_accuracy"] == result["rows"][1]["dense_test_accuracy"]
    s = result["summary"]
    assert s["difference"]["per_seed"] == pytest.approx(
        [result["rows"][1]["test_accuracy"] - result["rows"][0]["test_accuracy"]]
    )
    # The searched arm's model (the run directory's last stage) has exactly the kept channel counts
    # of the searched ratios: PruneStage(channel_rules=...) removed them per group.
    from flax import nnx

    from research import run as run_lib

    model = run_lib.load_stage(str(tmp_path / "seed0"), "1_prune").model
    kernels = {
        "/".join(map(str, p)): m.kernel.value.shape[-1] for p, m in nnx.iter_graph(model) if hasattr(m, "kernel")
    }
    expected = np.round(np.asarray(result["searched_kept"]) * channels).astype(int)
    assert [kernels[g] for g in result["groups"]] == expected.tolist()
