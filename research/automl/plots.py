"""Plots of a study: optimisation history and Pareto front, written as PNG files.

matplotlib is imported when a plot is made (``pip install matplotlib``); the Agg backend
is used so no display is needed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from research.automl.study import Study
from research.automl.trial import TrialState
from research.figures import save_figure

__all__ = ["plot_history", "plot_pareto_front"]


def _pyplot():
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    except ImportError as e:  # pragma: no cover
        raise ImportError("plots need matplotlib; pip install matplotlib") from e
    return plt


def plot_history(study: Study, path: str | os.PathLike, objective: int = 0) -> str:
    """Objective value of each complete trial and the best so far, against trial number.

    Args:
      study: The study.
      path: Output PNG path.
      objective: Which objective to plot.

    Returns:
      The path written.
    """
    plt = _pyplot()
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not done:
        raise ValueError(f"study {study.name!r} has no complete trial to plot")
    num = np.array([t.number for t in done])
    val = np.array([t.values[objective] for t in done])
    best = np.minimum.accumulate(val) if study.directions[objective] == "minimize" else np.maximum.accumulate(val)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(num, val, s=10, alpha=0.5, label="trial")
    ax.step(num, best, where="post", color="C3", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"objective {objective} ({study.directions[objective]})")
    ax.set_title(f"{study.name}: optimisation history")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return os.fspath(path)


def plot_pareto_front(
    study: Study,
    path: str | os.PathLike,
    objectives: Sequence[int] = (0, 1),
    names: Sequence[str] | None = None,
) -> str:
    """Complete trials of a two-objective study, Pareto-optimal ones highlighted.

    Returns:
      The path written.
    """
    if len(study.directions) < 2:
        raise ValueError("plot_pareto_front needs a study with at least two objectives")
    plt = _pyplot()
    i, j = objectives
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    front = study.pareto_front()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter([t.values[i] for t in done], [t.values[j] for t in done], s=10, alpha=0.4,
               label="trial")  # fmt: skip
    pts = sorted((t.values[i], t.values[j]) for t in front)
    if pts:
        ax.plot(*zip(*pts, strict=True), "o-", color="C3", label="Pareto front")
    names = names or [f"objective {i}", f"objective {j}"]
    ax.set_xlabel(f"{names[0]} ({study.directions[i]})")
    ax.set_ylabel(f"{names[1]} ({study.directions[j]})")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return os.fspath(path)
