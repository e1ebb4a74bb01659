"""Smoke test of the HAQ-style bit-width search (``experiments/haq_bits/main.py --quick``)."""

import json

import pytest

from experiments.haq_bits.main import main


@pytest.mark.slow  # the whole experiment in its quick configuration: a 2-trial search and both arms
def test_quick_run_writes_well_formed_results(tmp_path, capsys):
    result = main(["--quick", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "searched - uniform" in out and "searched bits" in out

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["searched_bits"] == result["searched_bits"]
    assert (tmp_path / "accuracy_vs_bytes.png").stat().st_size > 0
    assert len(result["trials"]) == 2
    assert all(t["state"] == "COMPLETE" for t in result["trials"])

    weights = result["kernel_weights"]
    assert len(result["layers"]) == len(weights) == len(result["searched_bits"]) >= 2
    assert set(result["searched_bits"]) <= {2, 4, 8}
    assert result["uniform_bits"] == [4] * len(weights)
    # The budget is the kernels at uniform 4-bit; every trial (repaired) and the searched policy meet it.
    assert result["budget_bytes"] == sum(weights) * 4 / 8
    for t in result["trials"]:
        assert t["modelled_bytes"] <= result["budget_bytes"]
    assert [(r["seed"], r["arm"]) for r in result["rows"]] == [(0, "uniform"), (0, "searched")]
    for r in result["rows"]:
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert r["modelled_bytes"] <= result["budget_bytes"]
        assert r["bytes"] > 0
    assert result["rows"][0]["modelled_bytes"] == result["budget_bytes"]
    # Both arms start from the same float model (one run directory, the dense stage reused).
    assert result["rows"][0]["dense_test_accuracy"] == result["rows"][1]["dense_test_accuracy"]


def test_bits_repair_meets_the_budget_and_keeps_points_under_it():
    import itertools

    from experiments.haq_bits.experiment import QUICK
    from experiments.haq_bits.experiment import bits_policy
    from experiments.haq_bits.experiment import make_config

    policy = bits_policy(make_config(QUICK, 0), QUICK)
    assert policy.budget_bytes == sum(policy.sizes) * 4 / 8
    for point in itertools.product((2, 4, 8), repeat=len(policy.layers)):
        repaired = policy.repair(list(point))
        assert policy.cost(repaired) <= policy.budget_bytes
        assert all(r <= p for r, p in zip(repaired, point, strict=True))  # only ever lowered
        if policy.cost(point) <= policy.budget_bytes:
            assert repaired == list(point)
    # A small layer raised to 8 bits stays at 8: the repair lowers a layer the point left at 4.
    small = min(range(len(policy.sizes)), key=policy.sizes.__getitem__)
    point = [4] * len(policy.layers)
    point[small] = 8
    assert policy.repair(point)[small] == 8
