"""Grid sweeps over a config: one run per point of the Cartesian product of override values.

``sweep(config, {"stages.prune.sparsity": [0.5, 0.8], "seed": [0, 1]}, "runs/s")`` runs
:func:`research.run.run` four times, each in its own run directory, and writes::

    WORKDIR/runs/<index>_<slug>/   each point's run directory (config.json, stages/, report.json)
    WORKDIR/sweep.json             the grid and, per point: overrides, run dir, status, final-stage metrics
    WORKDIR/sweep.txt              one row per point: override values, test acc, bytes, FLOPs, latency
    WORKDIR/sweep.png              final test accuracy vs bytes, with the Pareto front
    WORKDIR/grid.png               final test accuracy over the grid's values (a heatmap for two
                                   keys or more, a line for one; keys with one value are left out)

Grid keys are the dotted override keys of ``slimjax run --set`` (see :mod:`research.config`).
Every point is built and validated before the first one runs. The sweep resumes: a point whose
run directory holds a finished ``report.json`` is read, not rerun, and an interrupted point
resumes from its run's per-stage checkpoints. ``sweep.json`` is rewritten (atomically) after
every point. A point that raises is recorded as ``failed`` and the sweep goes on.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import sys
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import Literal

import numpy as np

from research import config as config_lib
from research import executors as executors_lib
from research import report as report_lib
from research import run as run_lib
from research import workdir as workdir_lib

Status = Literal["pending", "done", "failed"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepPoint:
    """One point of a sweep and its outcome.

    Attributes:
      index: position in the grid's Cartesian product (row-major, first key slowest).
      overrides: ``{dotted key: value}`` applied to the base config.
      run_dir: the point's run directory.
      status: ``pending`` (not run yet), ``done`` or ``failed``.
      metrics: the final stage's metrics from the run's ``report.json`` (empty unless done).
      error: ``"ExceptionType: message"`` of a failed point.
      seconds: wall time of this sweep's call for the point (0 when its report was reused).
      reused: the run had finished earlier and its report was read.
      note: how the executor ran it (e.g. ``population 0, chunk of 8``).
    """

    index: int
    overrides: Mapping[str, Any]
    run_dir: str
    status: Status = "pending"
    metrics: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    reused: bool = False
    note: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepReport:
    """The outcome of :func:`sweep`: the grid and every point (``sweep.json`` holds the same)."""

    workdir: str
    grid: Mapping[str, Sequence[Any]]
    points: tuple[SweepPoint, ...]
    executor: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {"executor": "sequential"})

    @property
    def failed(self) -> tuple[SweepPoint, ...]:
        """The points whose run raised."""
        return tuple(p for p in self.points if p.status == "failed")

    def rows(self) -> list[dict[str, Any]]:
        """One dict per point: ``point``, the override values, status and the summary metrics."""
        rows = []
        for p in self.points:
            m = p.metrics
            rows.append(
                {
                    "point": p.index,
                    **p.overrides,
                    "status": p.status,
                    "test_accuracy": m.get("test_accuracy"),
                    "bytes": report_lib.best_bytes(m) if m else None,
                    "flops": m.get("flops"),
                    "latency_ms": m.get("latency_ms"),
                }
            )
        return rows

    def table(self) -> str:
        """The ``sweep.txt`` table (:func:`research.report.format_table`), one row per point."""
        columns = [("point", "point", "{}")]
        columns += [(k, k, "{}") for k in self.grid]
        columns += [("status", "status", "{}")]
        columns += [c for c in report_lib.COLUMNS if c[0] in ("test_accuracy", "bytes", "flops", "latency_ms")]
        return report_lib.format_table(self.rows(), columns)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-friendly dict written to ``sweep.json``."""
        return {
            "workdir": self.workdir,
            "grid": {k: list(v) for k, v in self.grid.items()},
            "points": [dataclasses.asdict(p) for p in self.points],
            "executor": dict(self.executor),
        }


# ----------------------------------------------------------------------------- grid


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The Cartesian product of ``grid`` as override dicts, first key varying slowest.

    Raises:
      ConfigError: the grid is empty, a value list is empty, or a value list is not a sequence.

    Example:
      >>> expand_grid({"seed": [0, 1], "stages.prune.sparsity": [0.5]})
      [{'seed': 0, 'stages.prune.sparsity': 0.5}, {'seed': 1, 'stages.prune.sparsity': 0.5}]
    """
    if not grid:
        raise config_lib.ConfigError("the sweep grid is empty; give e.g. {'stages.prune.sparsity': [0.5, 0.8]}")
    for key, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise config_lib.ConfigError(f"grid[{key!r}]={values!r} must be a list of values, e.g. [0.5, 0.8]")
        if not values:
            raise config_lib.ConfigError(f"grid[{key!r}] is an empty list; give at least one value")
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def slug(overrides: Mapping[str, Any], max_len: int = 60) -> str:
    """A short, file-name-safe label: the last part of each key with its value, e.g. ``sparsity=0.5_seed=1``."""
    parts = [f"{k.split('.')[-1]}={v}" for k, v in overrides.items()]
    text = re.sub(r"[^A-Za-z0-9._=+-]+", "-", "_".join(parts)).strip("-")
    return text[:max_len] or "point"


def _override_strings(overrides: Mapping[str, Any]) -> list[str]:
    """``key=repr(value)`` items that :func:`research.config.apply_overrides` parses back to ``value``."""
    out = []
    for key, value in overrides.items():
        text = repr(value)
        if config_lib.parse_value(text) != value or type(config_lib.parse_value(text)) is not type(value):
            raise config_lib.ConfigError(
                f"grid value {key}={value!r} is not a Python literal; use numbers, strings, bools, None, lists"
            )
        out.append(f"{key}={text}")
    return out


def _point_configs(config: config_lib.Config, points: Sequence[Mapping[str, Any]]) -> list[config_lib.Config]:
    configs = []
    for i, overrides in enumerate(points):
        try:
            cfg = config_lib.apply_overrides(config, _override_strings(overrides))
            config_lib.validate(cfg)
        except (ValueError, KeyError, TypeError) as e:  # ConfigError is a ValueError
            raise config_lib.ConfigError(f"sweep point {i} ({slug(overrides)}): {e}") from e
        configs.append(cfg)
    return configs


# ----------------------------------------------------------------------------- Pareto front


def pareto_front(accuracy: Sequence[float], size: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both (max ``accuracy``, min ``size``).

    Points with a NaN coordinate are left out. Equal points are all on the front.

    Returns:
      The indices, ordered by size (then accuracy, descending); along them accuracy rises.

    Example:
      >>> pareto_front([0.9, 0.8, 0.95, 0.7], [100, 50, 200, 60])
      [1, 0, 2]
    """
    from research.automl.samplers import nondominated_rank

    if len(accuracy) != len(size):
        raise ValueError(f"accuracy has {len(accuracy)} values and size {len(size)}; give one of each per point")
    keep = [i for i in range(len(size)) if not (math.isnan(accuracy[i]) or math.isnan(size[i]))]
    if not keep:
        return []
    losses = np.array([[size[i], -accuracy[i]] for i in keep], dtype=np.float64)
    rank = nondominated_rank(losses)
    front = [i for i, r in zip(keep, rank, strict=True) if r == 0]
    return sorted(front, key=lambda i: (size[i], -accuracy[i]))


def plot_sweep(report: SweepReport, path: str) -> str | None:
    """Final test accuracy vs bytes (best encoding), one labelled dot per finished point.

    The Pareto front (max accuracy, min bytes) is a step line: the best accuracy reachable
    within each byte budget.

    Returns:
      ``path``, or ``None`` when no point has finished.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [p for p in report.points if p.status == "done"]
    if not done:
        return None
    acc = [float(p.metrics.get("test_accuracy", float("nan"))) for p in done]
    size = [float(report_lib.best_bytes(p.metrics)) for p in done]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(size, acc, s=25, color="C0", zorder=3, label="run")
    for p, x, y in zip(done, size, acc, strict=True):
        ax.annotate(f"{p.index}: {slug(p.overrides)}", (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front = pareto_front(acc, size)
    if front:
        fx = [size[i] for i in front]
        fy = [acc[i] for i in front]
        # The best accuracy within each byte budget, held up to the largest run.
        ax.step(
            [*fx, max(s for s in size if math.isfinite(s))],
            [*fy, fy[-1]],
            where="post",
            color="C3",
            lw=1.5,
            label="Pareto front",
            zorder=2,
        )
        ax.scatter(fx, fy, s=70, facecolors="none", edgecolors="C3", zorder=4)
    finite = [s for s in size if math.isfinite(s) and s > 0]
    if finite and max(finite) / min(finite) > 10:
        ax.set_xscale("log")
    ax.set(xlabel="bytes (best encoding), final stage", ylabel="test accuracy, final stage")
    ax.set_title(f"sweep: {len(done)} runs", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    report_lib.save_figure(fig, path)
    plt.close(fig)
    return path


@dataclasses.dataclass(frozen=True)
class GridAccuracy:
    """Final test accuracy laid out over the grid's varying keys (what ``grid.png`` shows).

    Attributes:
      rows: ``(key, values)`` of the first key with more than one value.
      columns: ``(key, values)`` of the second such key, or ``None`` when only one key varies.
      accuracy: ``[len(rows values), len(columns values) or 1]``; NaN where no point finished. With
        more than two varying keys each cell is the best over the others.
      best_over: the varying keys beyond the first two (their best value per cell).
    """

    rows: tuple[str, tuple[Any, ...]]
    columns: tuple[str, tuple[Any, ...]] | None
    accuracy: np.ndarray
    best_over: tuple[str, ...]


def grid_accuracy(report: SweepReport) -> GridAccuracy | None:
    """Lays the finished points' final test accuracy out over the grid (``None``: no key has more
    than one value, or no point finished)."""
    varying = [k for k, v in report.grid.items() if len(v) > 1]
    done = [p for p in report.points if p.status == "done"]
    if not varying or not done:
        return None
    rows = (varying[0], tuple(report.grid[varying[0]]))
    columns = (varying[1], tuple(report.grid[varying[1]])) if len(varying) > 1 else None
    accuracy = np.full((len(rows[1]), len(columns[1]) if columns else 1), np.nan)
    keys, shape = list(report.grid), [len(v) for v in report.grid.values()]
    for p in done:  # a point's index is its place in the product, first key slowest (expand_grid)
        where = np.unravel_index(p.index, shape)
        value = float(p.metrics.get("test_accuracy", np.nan))
        i = int(where[keys.index(rows[0])])
        j = int(where[keys.index(columns[0])]) if columns else 0
        if not np.isnan(value) and (np.isnan(accuracy[i, j]) or value > accuracy[i, j]):
            accuracy[i, j] = value
    return GridAccuracy(rows, columns, accuracy, tuple(varying[2:]))


def _label(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


MAX_INCHES = 20.0
"""The largest side of ``grid.png`` (a grid of hundreds of values keeps a viewable image)."""


def plot_grid(report: SweepReport, path: str) -> str | None:
    """Final test accuracy over the grid: for two varying keys a heatmap (rows the first key,
    columns the second, each cell labelled, the best outlined; with more keys, each cell the best
    over the rest), for one a line over its values.

    Returns:
      ``path``, or ``None`` when :func:`grid_accuracy` has nothing to show.
    """
    grid = grid_accuracy(report)
    if grid is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (row_key, row_values), acc = grid.rows, grid.accuracy
    n_done = sum(p.status == "done" for p in report.points)
    title = f"test accuracy, final stage ({n_done} of {len(report.points)} runs)"
    if grid.columns is None:
        fig, ax = plt.subplots(figsize=(min(MAX_INCHES, max(5.0, 0.6 * len(row_values) + 2)), 3.8))
        x = np.arange(len(row_values))
        ax.plot(x, acc[:, 0], "o-", color="C0")
        if np.isfinite(acc).any():
            best = int(np.nanargmax(acc[:, 0]))
            ax.plot([best], [acc[best, 0]], "o", ms=12, mfc="none", mec="C3", label="best")
            ax.legend(fontsize=8)
        ax.set_xticks(x, [_label(v) for v in row_values], rotation=45 if len(row_values) > 8 else 0)
        ax.set(xlabel=row_key, ylabel="test accuracy")
        ax.grid(alpha=0.3)
    else:
        col_key, col_values = grid.columns
        width = min(MAX_INCHES, max(5.0, 0.75 * len(col_values) + 2.5))
        fig, ax = plt.subplots(figsize=(width, min(MAX_INCHES, max(3.5, 0.45 * len(row_values) + 1.8))))
        cmap = plt.get_cmap("viridis").with_extremes(bad="0.85")  # grey: no finished run
        image = ax.imshow(np.ma.masked_invalid(acc), cmap=cmap, aspect="auto")
        fig.colorbar(image, ax=ax, label="test accuracy")
        ax.set_xticks(
            np.arange(len(col_values)), [_label(v) for v in col_values], rotation=45 if len(col_values) > 6 else 0
        )
        ax.set_yticks(np.arange(len(row_values)), [_label(v) for v in row_values])
        ax.set(xlabel=col_key, ylabel=row_key)
        if acc.size <= 400 and np.isfinite(acc).any():
            low, high = np.nanmin(acc), np.nanmax(acc)
            for (i, j), value in np.ndenumerate(acc):
                if np.isfinite(value):
                    dark = high == low or (value - low) / (high - low) < 0.6
                    ax.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=7, color="w" if dark else "k")
        if np.isfinite(acc).any():
            i, j = np.unravel_index(int(np.nanargmax(acc)), acc.shape)
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="C3", lw=2))
        if grid.best_over:
            title += f"; each cell the best over {', '.join(grid.best_over)}"
        if np.isnan(acc).any():
            title += "; grey: no finished run"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    report_lib.save_figure(fig, path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- running


FILES = ("sweep.json", "sweep.txt", "sweep.png", "grid.png")
"""What :func:`sweep` writes in the sweep directory besides ``runs/`` (the plots only when there is
something to plot)."""


def report_populations(summary: Mapping[str, Any]) -> list[str]:
    """One line per population of an executor summary: its trials, chunk size and why."""
    lines = []
    for p in summary.get("populations", []):
        sep = f" (separate: {p['separate_because']})" if p.get("separate_because") else ""
        took = (p.get("choice") or {}).get("measuring_seconds")
        took = f" (choosing took {took:.1f} s)" if took else ""
        n = len(p["trials"])
        lines.append(f"population {p['population']}: {n} trial{'s' * (n != 1)}, K={p['k']}{took}: {p['why']}{sep}")
        for a in p.get("later_alone", []):
            lines.append(f"  trial {a['trial']}, stage {a['stage']}: fine-tuned alone: {a['why']}")
    return lines


def _write(report: SweepReport) -> None:
    report_lib.write_text_atomic(
        os.path.join(report.workdir, "sweep.json"), json.dumps(report.to_dict(), indent=2, default=float) + "\n"
    )
    report_lib.write_text_atomic(os.path.join(report.workdir, "sweep.txt"), report.table() + "\n")


def sweep(
    config: config_lib.Config,
    grid: Mapping[str, Sequence[Any]],
    workdir: str,
    *,
    progress: bool = True,
    overwrite: bool = False,
    executor: str | executors_lib.Executor = "sequential",
) -> SweepReport:
    """Runs ``config`` once per point of the Cartesian product of ``grid``.

    The sweep directory is locked while the sweep runs (a second sweep on it raises
    :class:`research.workdir.WorkdirInUseError`), and each point's run locks its own directory.

    Args:
      config: the base config (``--set`` overrides already applied).
      grid: ``{dotted override key: values}``, e.g. ``{"stages.prune.sparsity": [0.5, 0.8]}``;
        values are Python values (the CLI parses them with :func:`research.config.parse_value`).
      workdir: the sweep directory; point ``i`` runs in ``workdir/runs/<i>_<slug>``.
      progress: a tqdm bar over points (and the runs' own bars).
      overwrite: delete the sweep that ``workdir`` holds (its point runs and tables) first.
      executor: ``"sequential"`` (one run after another), ``"population"`` (points that share
        architecture and data train as one vmapped program, :mod:`research.population`), ``"ray"``
        (one Ray task per point on a local Ray; for a cluster or GPU shares pass a
        :class:`research.distributed.ray_executor.RayExecutor`), or an
        :class:`research.executors.Executor`; what it decided goes into ``sweep.json``.

    Returns:
      The :class:`SweepReport`; failed points are in ``report.failed`` (not raised).

    Raises:
      ConfigError: a grid key or value that ``slimjax run --set`` would refuse, or a point whose
        config does not validate; raised before any point runs.
      WorkdirInUseError: another process is sweeping in ``workdir``.

    Example:
      From the repository root (four runs of the smoke quickstart, about a minute in all on a 2-core CPU)::

        from research.config import load_config

        config = load_config("configs/quickstart.py:smoke")
        report = sweep(config, {"stages.prune.sparsity": [0.5, 0.8], "seed": [0, 1]}, "runs/smoke_sweep")
        print(report.table())
    """
    run_lib.register_all_stages()
    overrides = expand_grid(grid)
    configs = _point_configs(config, overrides)
    made_here = isinstance(executor, str)
    if made_here:
        executor = executors_lib.make_executor(executor)
    try:
        with workdir_lib.WorkdirLock(workdir):
            if overwrite:
                removed = workdir_lib.clear(workdir, markers=("sweep.json", "runs"))
                if removed:
                    print(f"overwrite: deleted {', '.join(removed)} in {workdir}", file=sys.stderr)
            return _sweep_points(configs, overrides, grid, workdir, progress=progress, executor=executor)
    finally:
        if made_here:  # an executor given as an object is the caller's to close
            executors_lib.close_executor(executor)


def _sweep_points(
    configs: Sequence[config_lib.Config],
    overrides: Sequence[Mapping[str, Any]],
    grid: Mapping[str, Sequence[Any]],
    workdir: str,
    *,
    progress: bool,
    executor: executors_lib.Executor | None = None,
) -> SweepReport:
    """The points of :func:`sweep`, run by ``executor`` with the sweep directory locked."""
    executor = executor or executors_lib.SequentialExecutor()
    width = len(str(len(overrides) - 1))
    runs_dir = os.path.join(workdir, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    points = [
        SweepPoint(index=i, overrides=o, run_dir=os.path.join(runs_dir, f"{i:0{width}d}_{slug(o)}"))
        for i, o in enumerate(overrides)
    ]
    grid = {k: list(v) for k, v in grid.items()}

    def current() -> SweepReport:
        return SweepReport(
            workdir=os.path.abspath(workdir), grid=grid, points=tuple(points), executor=executor.summary()
        )

    _write(current())
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(points), desc="sweep", unit="run", dynamic_ncols=True)
    say = bar.write if bar is not None else (lambda s: print(s, file=sys.stderr))
    jobs = [executors_lib.Job(key=p.index, config=c, run_dir=p.run_dir) for p, c in zip(points, configs, strict=True)]
    try:
        for n, out in enumerate(executor.run(jobs, progress=progress)):
            i = out.job.key
            point = points[i]
            label = f"[{n + 1}/{len(points)}] point {i} {slug(point.overrides)}"
            if bar is not None:
                bar.set_postfix_str(slug(point.overrides, max_len=30))
            if out.report is not None:
                metrics = dict(out.report["stages"][-1]["metrics"])
                points[i] = dataclasses.replace(
                    point, status="done", metrics=metrics, seconds=out.seconds, reused=out.reused, note=out.note
                )
                say(
                    f"{label}: test acc {metrics['test_accuracy']:.4f}, bytes {report_lib.best_bytes(metrics):,.0f}"
                    + (" (finished earlier)" if out.reused else f" ({out.seconds:.1f}s)")
                    + (f" [{out.note}]" if out.note and not out.reused else "")
                )
            else:
                error = f"{type(out.error).__name__}: {out.error}"
                points[i] = dataclasses.replace(point, status="failed", error=error, seconds=out.seconds, note=out.note)
                say(f"{label}: FAILED: {error} (traceback in {point.run_dir}/error.txt)")
            _write(current())
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    for pop in report_populations(executor.summary()):
        say(pop)
    report = current()
    for name, plot in (("sweep.png", plot_sweep), ("grid.png", plot_grid)):
        png = os.path.join(workdir, name)
        if plot(report, png) is None and os.path.exists(png):
            os.remove(png)  # nothing to plot: a plot from an earlier sweep would be stale
    if report.failed:
        say(f"sweep: {len(report.failed)} of {len(points)} points failed: {[p.index for p in report.failed]}")
    return report
