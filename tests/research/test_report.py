"""The report-column contract (research/report.py): which metric names a stage returns make which columns."""

import dataclasses
import json
import os
from typing import ClassVar

import pytest

from research import report as report_lib
from research.config import Config
from research.config import DataConfig
from research.config import ModelConfig
from research.run import run
from research.stages import STAGES
from research.stages import StageConfig
from research.stages import StageResult
from research.stages import register_stage

MEASURED = ("test_accuracy", "val_accuracy", "params", "nonzeros", "bytes_fp32", "flops", "latency_ms")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProbeStage(StageConfig):
    """Returns the metrics it is given, for the report test."""

    kind: ClassVar[str] = "report_probe"
    metrics: dict = dataclasses.field(default_factory=dict)


@pytest.fixture
def probe_stage():
    @register_stage(ProbeStage)
    def run_probe(bundle, cfg, ctx):
        return StageResult(bundle=bundle, metrics=dict(cfg.metrics))

    yield
    STAGES.unregister("report_probe")


def _report(metrics):
    return {"name": "r", "stages": [{"label": "0_x", "metrics": metrics}]}


@pytest.mark.parametrize("key", report_lib.BYTES_KEYS)
def test_each_bytes_key_can_make_the_best_encoding_column(key):
    metrics = {k: 1000 for k in report_lib.BYTES_KEYS}
    metrics[key] = 123
    (row,) = report_lib.summary_rows(_report(metrics))
    assert row["bytes"] == 123
    assert "bytes (best encoding)" in report_lib.render(_report(metrics))


def test_other_names_do_not_reach_the_bytes_column():
    (row,) = report_lib.summary_rows(_report({"bytes_fp32": 1000, "my_format_bytes": 10}))
    assert row["bytes"] == 1000


def test_every_column_is_documented_with_its_metric_names():
    doc = report_lib.__doc__
    for key, header, _ in report_lib.COLUMNS:
        assert f"``{header}``" in doc, header
        if key not in ("stage", "bytes"):
            assert f"``{key}``" in doc, key
    for key in report_lib.BYTES_KEYS:
        assert f"``{key}``" in doc, key


def test_a_stage_s_metrics_merge_over_the_measured_ones(tmp_path, probe_stage):
    config = Config(
        name="probe",
        model=ModelConfig(name="mlp", options={"widths": (8,)}),
        data=DataConfig(name="digits", limit=64),
        stages=(ProbeStage(metrics={"csr_bytes": 5, "flops": 7.0, "my_metric": 0.25}),),
    )
    report = run(config, str(tmp_path / "run"), progress=False, echo=False)
    metrics = report["stages"][0]["metrics"]
    assert set(MEASURED) <= set(metrics)  # measured by the runner after every stage
    assert metrics["flops"] == 7.0 and metrics["my_metric"] == 0.25  # the stage's own values win / are kept
    (row,) = report_lib.summary_rows(report)
    assert row["bytes"] == 5  # csr_bytes is smaller than bytes_fp32
    table = report_lib.render(report).splitlines()
    header = next(line for line in table if line.startswith("stage"))
    line = next(line for line in table if line.startswith("0_report_probe"))
    assert "bytes (best encoding)" in header and "FLOPs" in header
    assert "5" in line.split() and "7" in line.split()  # the bytes and FLOPs cells


def _stage_dir(root, name, losses, accuracies):
    d = root / name
    d.mkdir(parents=True)
    rows = [{"split": "train", "step": i + 1, "loss": v} for i, v in enumerate(losses)]
    rows += [{"split": "val", "step": len(losses), "accuracy": a} for a in accuracies]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return (name, str(d))


def test_curve_plotter_redraws_each_run_on_one_figure(tmp_path):
    """The second run with the same lines is drawn on the kept figure with its own data; a run
    whose stages logged other lines gets a new figure."""
    from research.report import CurvePlotter

    plotter = CurvePlotter()
    try:
        first = [_stage_dir(tmp_path / "a", "0_train", [2.0, 1.0, 0.5], [0.6])]
        second = [_stage_dir(tmp_path / "b", "0_train", [3.0, 0.25, 0.125], [0.9])]
        for run_dir in ("a", "b"):
            (tmp_path / run_dir / "run").mkdir()
        path_a = plotter(str(tmp_path / "a" / "run"), first)
        figure = plotter._figure
        path_b = plotter(str(tmp_path / "b" / "run"), second)
        assert plotter._figure is figure  # kept
        assert os.path.getsize(path_a) > 0 and os.path.getsize(path_b) > 0
        assert open(path_a, "rb").read() != open(path_b, "rb").read()
        loss_line, acc_line = figure.axes[0].lines[0], figure.axes[1].lines[0]
        assert list(loss_line.get_ydata()) == [3.0, 0.25, 0.125] and list(acc_line.get_ydata()) == [0.9]
        other = [_stage_dir(tmp_path / "c", "0_prune", [1.0, 0.5], [])]
        (tmp_path / "c" / "run").mkdir()
        assert plotter(str(tmp_path / "c" / "run"), other).endswith("curves.png")
        assert plotter._figure is not figure and len(plotter._figure.axes[1].lines) == 0
        assert plotter(str(tmp_path / "c" / "run"), []) is None  # nothing logged: no plot
    finally:
        plotter.close()
    assert plotter._figure is None


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    return fig, plt


def test_save_figure_replaces_the_image_only_once_complete(tmp_path):
    fig, plt = _figure()
    path = str(tmp_path / "curves.png")
    assert report_lib.save_figure(fig, path, dpi=50) == path
    with open(path, "rb") as f:
        first = f.read()
    assert first.startswith(b"\x89PNG")

    def broken(tmp, **kwargs):  # writes part of an image, then fails (a full disk, a kill mid-save)
        with open(tmp, "wb") as f:
            f.write(b"\x89PN")
        raise OSError("No space left on device")

    fig.savefig = broken
    with pytest.raises(OSError, match="No space"):
        report_lib.save_figure(fig, path)
    with open(path, "rb") as f:
        assert f.read() == first  # the previous image, untouched
    assert os.listdir(tmp_path) == ["curves.png"]  # no temporary file left behind
    plt.close(fig)


def test_save_figure_takes_the_format_from_the_extension(tmp_path):
    fig, plt = _figure()
    svg = report_lib.save_figure(fig, str(tmp_path / "a.svg"))
    with open(svg) as f:
        assert "<svg" in f.read()
    with pytest.raises(ValueError, match=r"no extension.*'.*a\.png'"):
        report_lib.save_figure(fig, str(tmp_path / "a"))
    plt.close(fig)
