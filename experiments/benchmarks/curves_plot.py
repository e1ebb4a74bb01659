"""A run's ``curves.png``: drawn on a new figure against redrawn on a kept one.

Every run writes ``curves.png`` (training loss and validation accuracy over its stages); in a
sweep of small models that is a visible part of each trial. :class:`research.report.CurvePlotter`
keeps one figure for many runs and only replaces the lines' data after the first
(:func:`research.report.redraw_curves`); the sequential and population executors give one to
their trials. This benchmark writes the metrics of ``--runs`` train -> prune runs (300 + 100 logged
steps, one validation row each, different values per run) and times, interleaved,
:func:`research.report.plot_curves` (a new figure per run) against one ``CurvePlotter``.

Run:
  python -m experiments.benchmarks.curves_plot
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

from research import report as report_lib
from research.report import format_table


def write_runs(root: str, runs: int) -> list[list[tuple[str, str]]]:
    """``runs`` run directories with a train (300 steps) and a prune (100 steps) stage's metrics."""
    rng = np.random.default_rng(0)
    out = []
    for r in range(runs):
        stages = []
        for label, steps in (("0_train", 300), ("1_prune", 100)):
            d = os.path.join(root, f"run{r}", "stages", label)
            os.makedirs(d)
            loss = np.exp(-np.linspace(0, 3, steps)) * (1.5 + 0.3 * rng.random()) + 0.05 * rng.random(steps)
            rows = [{"split": "train", "step": i + 1, "loss": float(v)} for i, v in enumerate(loss)]
            rows.append({"split": "val", "step": steps, "accuracy": float(0.8 + 0.1 * rng.random())})
            with open(os.path.join(d, "metrics.jsonl"), "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
            stages.append((label, d))
        out.append(stages)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="passes over the runs")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        runs = write_runs(root, args.runs)
        plotter = report_lib.CurvePlotter()
        new, kept = [], []
        try:
            plotter(os.path.join(root, "run0"), runs[0])  # the kept figure's first drawing
            for _ in range(args.repeats):
                for r, stages in enumerate(runs):
                    workdir = os.path.join(root, f"run{r}")
                    t0 = time.perf_counter()
                    report_lib.plot_curves(workdir, stages)
                    new.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    plotter(workdir, stages)
                    kept.append(time.perf_counter() - t0)
        finally:
            plotter.close()
    rows = [
        {"figure": "new per run (plot_curves)", "ms per run (median)": 1e3 * statistics.median(new)},
        {"figure": "kept (CurvePlotter)", "ms per run (median)": 1e3 * statistics.median(kept)},
    ]
    print(f"curves.png of {args.runs} train -> prune runs, {args.repeats} passes, interleaved:")
    print(format_table(rows))
    print(f"new / kept: {statistics.median(new) / statistics.median(kept):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
