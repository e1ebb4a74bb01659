"""Run reports: ``report.json``, a readable table, and training-curve plots.

The report-column contract for stage authors
--------------------------------------------
After every stage the runner measures the model (``research.run``): ``test_accuracy``,
``val_accuracy``, ``params``, ``nonzeros``, ``bytes_fp32``, ``flops``, ``latency_ms``. The
stage's ``StageResult.metrics`` are merged over these (a stage may replace any of them, e.g. a
factorized model's exact ``flops``) and every metric is kept in ``report.json``. The summary
table (:data:`COLUMNS`, ``slimjax report``) shows:

==========================  ==============================================================
column                      metric name(s) a stage returns
==========================  ==============================================================
``stage``                   the stage label (``0_train``), not a metric
``test acc``                ``test_accuracy``
``params``                  ``params``
``non-zeros``               ``nonzeros``
``bytes (best encoding)``   the smallest of :data:`BYTES_KEYS` present: ``bytes``,
                            ``quantized_bytes``, ``quantized_bitmask_bytes``,
                            ``bitmask_bytes``, ``csr_bytes``, ``bytes_fp32`` (all in bytes)
``FLOPs``                   ``flops``
``latency ms``              ``latency_ms``
==========================  ==============================================================

So a stage that stores the weights in a new, smaller encoding returns its size under one of the
:data:`BYTES_KEYS` names (``bytes`` if none fits); any other name appears in ``report.json``
(and so to ``slimjax tune`` objectives) but not in the table. Per-stage tables go in
``StageResult.tables`` and are printed under the summary.

The runner also records, per stage, ``weight_sparsity_before``/``weight_sparsity_after`` (exact
zeros of the kernels, ``ndim >= 2``), the constraints the stage ``declares`` and what it did to the
earlier ones (``constraints``: kept or changed, :mod:`research.constraints`); the text report
shows them in a "constraints" table.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from research.figures import save_figure  # noqa: F401  (re-exported: report_lib.save_figure)

# (metric key, header, format) of the summary table; see the contract in the module docstring.
COLUMNS = (
    ("stage", "stage", "{}"),
    ("test_accuracy", "test acc", "{:.4f}"),
    ("params", "params", "{:,.0f}"),
    ("nonzeros", "non-zeros", "{:,.0f}"),
    ("bytes", "bytes (best encoding)", "{:,.0f}"),
    ("flops", "FLOPs", "{:,.0f}"),
    ("latency_ms", "latency ms", "{:.3f}"),
)


def _fmt(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns=None) -> str:
    """A fixed-width text table of ``rows`` (dicts) for the given ``(key, header, format)`` columns.

    With ``columns=None`` every key that appears in the rows becomes a column.
    """
    if columns is None:
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        columns = [(k, k, "{:.4g}" if any(isinstance(r.get(k), float) for r in rows) else "{}") for k in keys]
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([_fmt(r.get(k), f) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=False)))
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# Storage figures stages may report; the table shows the smallest (the best encoding so far).
BYTES_KEYS = ("bytes", "quantized_bytes", "quantized_bitmask_bytes", "bitmask_bytes", "csr_bytes", "bytes_fp32")


def best_bytes(metrics: dict[str, Any]) -> float:
    """The smallest storage size among the encodings a stage reported (fp32 dense at worst)."""
    values = [metrics[k] for k in BYTES_KEYS if isinstance(metrics.get(k), (int, float))]
    return min(values) if values else float("nan")


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per stage with the standard columns; ``bytes`` is :func:`best_bytes`."""
    return [{"stage": st["label"], **st["metrics"], "bytes": best_bytes(st["metrics"])} for st in report["stages"]]


def constraint_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per stage: weight sparsity before and after it, the constraints it declared, and what
    it did to the earlier ones (``kept``/``changed``, see :mod:`research.constraints`)."""
    rows = []
    for st in report["stages"]:
        m = st["metrics"]
        if "weight_sparsity_after" not in m:
            continue  # a report written before constraints were tracked
        rows.append(
            {
                "stage": st["label"],
                "weight sparsity": f"{m.get('weight_sparsity_before', 0.0):.2%} -> {m['weight_sparsity_after']:.2%}",
                "declares": ", ".join(st.get("declares", [])) or "-",
                "earlier constraints": "; ".join(
                    f"{r['constraint']} of {r['declared_by']}: {r['status'].upper() if r['status'] != 'kept' else 'kept'}"
                    for r in st.get("constraints", [])
                )
                or "-",
            }
        )
    return rows


def render(report: dict[str, Any]) -> str:
    """The human-readable report: the summary table, then each stage's tables and notes."""
    parts = [f"run: {report.get('name', '')}  ({report.get('workdir', '')})"]
    env = report.get("environment")
    if env:
        parts.append(
            f"on: {env['device']} x{env['device_count']} ({env['backend']}), jax {env['jax']}, "
            f"flax {env['flax']}, python {env['python']}"
        )
    parts.append(format_table(summary_rows(report), COLUMNS))
    constraints = constraint_rows(report)
    if any(r["declares"] != "-" or r["earlier constraints"] != "-" for r in constraints):
        parts.append(
            "\nconstraints (weight sparsity: exact zeros of the kernels and weight matrices)\n"
            + format_table(constraints)
        )
    for st in report["stages"]:
        for name, table in st.get("tables", {}).items():
            if table:
                parts.append(f"\n[{st['label']}] {name}\n" + format_table(table))
        for note in st.get("notes", []):
            parts.append(f"[{st['label']}] note: {note}")
        for art in st.get("artifacts", []):
            parts.append(f"[{st['label']}] artifact: {art}")
    return "\n".join(parts)


def read_report(workdir: str) -> dict[str, Any]:
    """The ``report.json`` of a run directory.

    Raises:
      RunFileError: the file is missing, truncated or not a slimjax report; the message names it
        and the fix (the run rewrites it after every stage, reusing finished stages).
    """
    from research.workdir import RunFileError
    from research.workdir import read_json

    path = os.path.join(workdir, "report.json")
    fix = (
        f"run its config again with --workdir {workdir} to rewrite it (finished stages are reused, not retrained)"
        if os.path.exists(os.path.join(workdir, "config.json"))
        else f"is {workdir} a slimjax run directory? A run writes report.json after its first stage"
    )
    report = read_json(path, fix=fix)
    if not isinstance(report, dict) or not isinstance(report.get("stages"), list):
        raise RunFileError(f"{path} is not a slimjax report (it has no 'stages' list); {fix}")
    for i, st in enumerate(report["stages"]):
        if not isinstance(st, dict) or not isinstance(st.get("label"), str) or not isinstance(st.get("metrics"), dict):
            raise RunFileError(f"{path}: stage {i} has no 'label' and 'metrics'; {fix}")
    return report


def write_text_atomic(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename: never half-written."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_report(workdir: str, report: dict[str, Any]) -> None:
    """Writes ``report.json`` and ``report.txt`` atomically."""
    for name, text in (("report.json", json.dumps(report, indent=2, default=float)), ("report.txt", render(report))):
        write_text_atomic(os.path.join(workdir, name), text + "\n")


def curve_series(stage_dirs: Sequence[tuple[str, str]]) -> list[tuple[str, tuple, tuple]]:
    """``(label, (train steps, losses), (val steps, accuracies))`` of each stage that logged
    metrics, steps cumulative over the stages (what :func:`plot_curves` draws)."""
    from research.train.loop import read_metrics

    out = []
    offset = 0
    for label, d in stage_dirs:
        rows = read_metrics(d)
        if not rows:
            continue
        tr = [r for r in rows if r.get("split") == "train"]
        va = [r for r in rows if r.get("split") == "val" and "accuracy" in r]
        out.append(
            (
                label,
                ([offset + r["step"] for r in tr], [r["loss"] for r in tr]),
                ([offset + r["step"] for r in va], [r["accuracy"] for r in va]),
            )
        )
        offset += max((r["step"] for r in rows), default=0)
    return out


def plot_curves(
    workdir: str, stage_dirs: Sequence[tuple[str, str]], path: str | None = None, *, figure=None
) -> str | None:
    """Plots training loss and validation accuracy over the whole run (stages back to back).

    Args:
      workdir: the run directory (the PNG goes there unless ``path`` is given).
      stage_dirs: ``(label, directory)`` of each stage that wrote ``metrics.jsonl``.
      figure: draw on this empty figure (``plt.subplots(1, 2, figsize=(11, 4))``) and leave it
        open, for :func:`redraw_curves` to draw other runs' curves on it (the population
        executor); ``None`` draws a new figure and closes it.

    Returns:
      The PNG path, or ``None`` when no stage logged metrics.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    series = curve_series(stage_dirs)
    if not series:
        return None
    if figure is None:
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    else:
        fig, (ax_loss, ax_acc) = figure, figure.axes
    for label, (tx, ty), (vx, vy) in series:
        if tx:
            ax_loss.plot(tx, ty, label=label, lw=1)
        if vx:
            ax_acc.plot(vx, vy, "o-", label=label, ms=3)
    ax_loss.set(xlabel="step (cumulative over stages)", ylabel="training loss", yscale="log")
    # Plain-text tick labels ("0.3", not mathtext "3x10^-1": parsing those took a fifth of the plot's
    # time), chosen as the default log formatter chooses them (minor ticks labelled in short ranges).
    ax_loss.yaxis.set_major_formatter(matplotlib.ticker.LogFormatter())
    ax_loss.yaxis.set_minor_formatter(matplotlib.ticker.LogFormatter())
    ax_acc.set(xlabel="step (cumulative over stages)", ylabel="validation accuracy")
    for ax, title in ((ax_loss, "training loss"), (ax_acc, "validation accuracy")):
        ax.set_title(title, y=1.0)  # a fixed position: placing it clear of tick labels measured them all
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    # Fixed margins for this fixed-size figure: tight_layout measured every tick label's extent and
    # took ~45% of the plot's time (a plot per run: most of a small trial's wall time in a sweep).
    fig.subplots_adjust(left=0.065, right=0.985, bottom=0.13, top=0.92, wspace=0.2)
    path = save_figure(fig, path or os.path.join(workdir, "curves.png"))
    if figure is None:
        plt.close(fig)
    return path


def redraw_curves(figure, workdir: str, series: list[tuple[str, tuple, tuple]]) -> str:
    """Saves ``workdir/curves.png`` from a figure :func:`plot_curves` drew for a run whose
    :func:`curve_series` had the same labels and the same train/val lines: only the lines' data,
    the axis limits and ticks change (the labels, legend and margins stay), which takes about half
    the time of drawing the figure anew."""
    ax_loss, ax_acc = figure.axes
    for line, xy in zip(ax_loss.lines, [t for _, t, _ in series if t[0]], strict=True):
        line.set_data(*xy)
    for line, xy in zip(ax_acc.lines, [v for _, _, v in series if v[0]], strict=True):
        line.set_data(*xy)
    for ax in (ax_loss, ax_acc):
        ax.relim()
        ax.autoscale_view()
    return save_figure(figure, os.path.join(workdir, "curves.png"))


class CurvePlotter:
    """``curves.png`` of many runs on one kept figure: the first run's (and any run whose stages
    logged other lines) drawn by :func:`plot_curves`, the others by updating its lines' data
    (:func:`redraw_curves`: 123 ms against 191 ms for a new figure of a train -> prune run on a
    2-core CPU, ``python -m experiments.benchmarks.curves_plot``). The executors give one to their trials (:class:`research.run.RunHooks`'s
    ``plot``). Call :meth:`close` at the end."""

    def __init__(self):
        self._figure = None
        self._shape = None

    def __call__(self, workdir: str, stage_dirs) -> str | None:
        series = curve_series(stage_dirs)
        if not series:
            return None
        shape = [(label, bool(t[0]), bool(v[0])) for label, t, v in series]
        if shape == self._shape:
            return redraw_curves(self._figure, workdir, series)
        import matplotlib  # pylint: disable=import-outside-toplevel

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

        self.close()
        self._figure, _ = plt.subplots(1, 2, figsize=(11, 4))
        self._shape = shape
        return plot_curves(workdir, stage_dirs, figure=self._figure)

    def close(self) -> None:
        """Closes the figure."""
        if self._figure is not None:
            import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

            plt.close(self._figure)
            self._figure, self._shape = None, None
