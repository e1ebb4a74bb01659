"""Smoke test of the population reproduction (``experiments/population_lr_wd``) at a tiny size."""

import json
import os

import pytest

from experiments.population_lr_wd.main import main


@pytest.mark.slow  # both executors over a 2 x 2 grid of train -> prune runs
def test_quick_grid_gives_identical_points_a_results_file_and_a_heatmap(tmp_path, capsys):
    out = tmp_path / "lrwd"
    argv = ["--lrs", "2", "--wds", "2", "--steps", "12", "--prune-steps", "6", "--interleave", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 points, lenet300 on mnist5k" in printed and "test accuracy over the grid" in printed
    with open(out / "results.json") as f:
        results = json.load(f)
    assert results["points"] == 4
    seq, pop = (results["points_test_accuracy"][k] for k in ("sequential", "population"))
    assert pop == pytest.approx(seq, abs=2e-3)  # the same trials on the same batches
    with open(out / "grid.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(out / "population")) == ["row0", "row1"]  # one sweep per learning rate
