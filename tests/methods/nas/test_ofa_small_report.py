"""experiments/ofa_small's summary of a run: dominance over the zoo models and the Pareto plot."""

import os

from experiments.ofa_small.experiment import dominance
from experiments.ofa_small.experiment import plot_results


def _result(seed):
    def row(model, flops, scratch, finetuned=None):
        return {"model": model, "flops": flops, "params": 1, "supernet_val": None, "finetuned_test": finetuned,
                "scratch_test": scratch}  # fmt: skip

    return {
        "seed": seed,
        "rows": [
            row("found small", 1_000, 0.70, 0.60),
            row("found mid", 50_000, 0.90, 0.80),
            row("found big", 900_000, 0.95, 0.90),
            row("zoo cnn1d", 60_000, 0.85),
            row("zoo mlp", 40_000, 0.95),
        ],
    }


def test_a_zoo_model_is_dominated_only_by_more_accurate_members_at_no_more_flops():
    out = {(d["seed"], d["zoo"]): d["dominated_by"] for d in dominance([_result(0), _result(1)])}
    assert out[(0, "zoo cnn1d")] == ["found mid"]  # 'big' is more accurate but costs more
    assert out[(1, "zoo mlp")] == []  # 'small' costs less but is less accurate
    fine = {d["zoo"]: d["dominated_by"] for d in dominance([_result(0)], key="finetuned_test")}
    assert fine["zoo cnn1d"] == []  # fine-tuned 'mid' (0.80) is below cnn1d's 0.85


def test_plot_is_written(tmp_path):
    path = plot_results([_result(0), _result(1)], str(tmp_path / "pareto.png"))
    assert os.path.getsize(path) > 1000
