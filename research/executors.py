"""Trial runners shared by ``slimjax sweep`` and ``slimjax tune``.

An :class:`Executor` takes trials (a config and a run directory each) and yields one
:class:`Outcome` per trial as each finishes, in any order. Every executor writes each trial's run
directory exactly as :func:`research.run.run` does (config.json, stages/, report.json), so a
finished trial is read back, not rerun, by any executor, and the tables read the same files.

- ``sequential``: :func:`research.run.run` per trial, one after another.
- ``population``: trials that share architecture and data train their leading ``train`` stage as
  one vmapped program (:mod:`research.population`); the chunk size is measured first, against
  the sequential executor's own step, and the trials run exactly as the sequential executor runs
  them when no population program is faster.
- ``ray``: one Ray task per trial with declared CPUs/GPUs, on a local Ray or a cluster
  (:mod:`research.distributed.ray_executor`; Ray is the optional extra ``slimjax[ray]``).

``slimjax tune --workers K`` is a third runner: K processes share one study (see
:mod:`research.tune`); it works with the sequential executor in each process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any
from typing import Protocol

from research import config as config_lib
from research import report as report_lib

EXECUTORS = ("sequential", "population", "ray")


@dataclasses.dataclass(frozen=True)
class Job:
    """One trial to run: ``key`` identifies it to the caller (a sweep point index, a trial number)."""

    key: int
    config: config_lib.Config
    run_dir: str


@dataclasses.dataclass
class Outcome:
    """A finished trial.

    Attributes:
      job: the trial.
      report: the run's report dict (``None`` when it failed).
      error: the exception of a failed trial.
      traceback: its formatted traceback (also written to ``run_dir/error.txt``).
      seconds: wall time spent on this trial (a population's time is shared out evenly).
      reused: the run had finished earlier and its report was read.
      note: how it ran (``"population 0, chunk of 8"``).
    """

    job: Job
    report: dict[str, Any] | None = None
    error: BaseException | None = None
    traceback: str | None = None
    seconds: float = 0.0
    reused: bool = False
    note: str = ""


class Executor(Protocol):
    """Runs trials; yields one :class:`Outcome` per job (failures included, never raised)."""

    name: str

    def run(self, jobs: Sequence[Job], *, progress: bool = False) -> Iterator[Outcome]: ...

    def summary(self) -> dict[str, Any]:
        """What the executor decided and measured (the sweep/tune report records it)."""
        ...


def finished_report(run_dir: str, config: config_lib.Config) -> dict[str, Any] | None:
    """The run's report if ``run_dir`` holds a finished run of exactly ``config``, else ``None``."""
    try:
        with open(os.path.join(run_dir, "report.json")) as f:
            report = json.load(f)
        with open(os.path.join(run_dir, "config.json")) as f:
            same = f.read().strip() == config_lib.to_json(config).strip()
    except (OSError, json.JSONDecodeError):
        return None
    if not same or len(report.get("stages", [])) != len(config.stages):
        return None  # a different config (run() refuses it) or an interrupted run (run() resumes it)
    return report


def run_one(
    job: Job, *, progress: bool = False, prepared: dict | None = None, note: str = "", hooks: Any = None
) -> Outcome:
    """Runs one trial with :func:`research.run.run` (reading a finished run back); never raises.

    ``prepared`` maps stage indices to stage functions that replace the registered ones (the
    population executor passes its trained models this way); ``hooks`` is a
    :class:`research.run.RunHooks` (its batched measurement and plotting).
    """
    from research import run as run_lib

    t0 = time.perf_counter()
    report = finished_report(job.run_dir, job.config)
    if report is not None:
        return Outcome(job=job, report=report, reused=True, note="finished earlier")
    try:
        report = run_lib.run(job.config, job.run_dir, progress=progress, echo=False, prepared=prepared, hooks=hooks)
        return Outcome(job=job, report=report, seconds=time.perf_counter() - t0, note=note)
    except Exception as e:  # a failed trial is recorded and the caller goes on
        tb = traceback.format_exc()
        os.makedirs(job.run_dir, exist_ok=True)
        report_lib.write_text_atomic(os.path.join(job.run_dir, "error.txt"), tb)
        return Outcome(job=job, error=e, traceback=tb, seconds=time.perf_counter() - t0, note=note)


class SequentialExecutor:
    """One :func:`research.run.run` per trial, one after another."""

    name = "sequential"

    def run(self, jobs: Sequence[Job], *, progress: bool = False) -> Iterator[Outcome]:
        from research import run as run_lib

        plotter = report_lib.CurvePlotter()  # each trial's curves.png drawn on one kept figure
        try:
            for job in jobs:
                yield run_one(job, progress=progress, hooks=run_lib.RunHooks(plot=plotter))
        finally:
            plotter.close()

    def summary(self) -> dict[str, Any]:
        return {"executor": self.name}


def make_executor(name: str, **options: Any) -> Executor:
    """The executor called ``name`` (``sequential``, ``population`` or ``ray``).

    Args:
      name: the executor.
      **options: the population executor's options (see
        :class:`research.population.executor.PopulationExecutor`) or the Ray executor's
        (``address``, ``cpus_per_trial``, ``gpus_per_trial``, ...; see
        :class:`research.distributed.ray_executor.RayExecutor`).

    Raises:
      ConfigError: an unknown name, options for the sequential executor, or ``ray`` without Ray
        installed.
    """
    if name == "sequential":
        if options:
            raise config_lib.ConfigError(f"the sequential executor takes no options; got {sorted(options)}")
        return SequentialExecutor()
    if name == "population":
        from research.population.executor import PopulationExecutor

        return PopulationExecutor(**options)
    if name == "ray":
        from research.distributed import ray_executor

        ray_executor.import_ray()  # a one-line error naming the extra to install
        return ray_executor.RayExecutor(**options)
    raise config_lib.ConfigError(f"executor={name!r} is not one of {list(EXECUTORS)}")


def close_executor(executor: Executor) -> None:
    """Releases what ``executor`` holds (the Ray executor shuts down the local Ray it started)."""
    close = getattr(executor, "close", None)
    if close is not None:
        close()
