"""Optimisation-history and Pareto-front PNGs."""

from research.automl import Float
from research.automl import RandomSampler
from research.automl import Space
from research.automl import Study
from research.automl import plot_history
from research.automl import plot_pareto_front


def test_plots_write_png(tmp_path):
    space = Space({"x": Float(0.0, 1.0)})
    s1 = Study(space, sampler=RandomSampler(seed=0))
    s1.optimize(lambda p: p["x"], n_trials=8, show_progress_bar=False)
    out = plot_history(s1, tmp_path / "h.png")
    s2 = Study(space, sampler=RandomSampler(seed=0), direction=["minimize", "minimize"])
    s2.optimize(lambda p: (p["x"], 1 - p["x"] ** 2), n_trials=8, show_progress_bar=False)
    out2 = plot_pareto_front(s2, tmp_path / "p.png", names=["error", "size"])
    for path in (out, out2):
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
