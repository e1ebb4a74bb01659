"""Smoke test of the KD-recovery experiment (``experiments/kd_recovery/main.py --quick``)."""

import numpy as np
import pytest

from experiments.kd_recovery.experiment import ARMS
from experiments.kd_recovery.main import main
from methods.pruning import PruneStage
from research import run as run_lib
from research.stages import TrainStage
from research.train import split_model
from research.tree import flatten_with_paths


@pytest.mark.slow  # the whole experiment, in its quick configuration
def test_quick_run_prints_the_table_and_pruned_weights_stay_zero(tmp_path, capsys):
    # The pruned pipeline only: each variant is a full 4-stage run through research.run.
    result = main(["--quick", "--variants", "prune", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    for header in ("dense teacher %", "compressed, no FT %", "FT no teacher %", "FT with KD %"):
        assert header in out
    assert "gap recovered, KD %" in out and "KD - no teacher (pp)" in out
    assert [r["variant"] for r in result["rows"]] == ["prune"]
    assert len(result["per_seed"]) == 1
    row = result["rows"][0]
    for key in ("teacher", "compressed", "plain", "kd", "recovered_plain", "recovered_kd"):
        assert " ± " in row[key] or row[key] == "n/a", (key, row[key])
    for run in result["runs"]:
        for arm in ARMS:
            assert 0.0 <= run[arm] <= 1.0
    assert result["checks"] == {"pruned_stay_zero": True, "same_teacher": True}

    prune = next(r for r in result["runs"] if r["variant"] == "prune")
    assert prune["revived"] == {"plain": 0, "kd": 0}
    nz = prune["nonzeros"]
    assert nz["compressed"] == nz["plain"] == nz["kd"] < nz["teacher"]
    # Independently of the experiment's own check: every kernel of the distilled student is
    # 90% zeros, at exactly the positions the one-shot prune zeroed.
    models = {}
    for label in ("1_prune", "3_distill"):
        model = run_lib.load_stage(str(tmp_path / "prune_s0"), label).model
        models[label] = dict(flatten_with_paths(split_model(model)[1]))
    kernels = [p for p in models["1_prune"] if p.endswith("kernel")]
    assert len(kernels) == 3
    for path in kernels:
        before, after = (np.asarray(models[k][path]) for k in ("1_prune", "3_distill"))
        assert np.mean(before == 0) == pytest.approx(0.9, abs=1e-3), path
        np.testing.assert_array_equal(after == 0, before == 0, err_msg=path)
        assert not np.array_equal(after, before), f"{path} did not train"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"schedule": "polynomial"}, "one_shot"),
        ({"schedule": "one_shot", "scorer": "saliency"}, "gradients"),
        ({"schedule": "one_shot", "train": TrainStage(steps=-1)}, r"train.steps=-1 must be >= 1"),
    ],
)
def test_prune_stage_without_training_rejects_what_needs_training(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruneStage(**{"train": None, **kwargs}).validate()
