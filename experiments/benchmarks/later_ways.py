"""The loop the later-stage population benchmarks share (``population_decompose``, ``population_kd_qat``,
``population_prune``).

A sweep runs once per *way* (the sequential executor; the population executor with the later
stage's fine-tunings trained alone; trained together) and round, the ways alternating their order,
each way keeping its own compiled programs; round 0 compiles and is not counted.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import numpy as np

from research.population import executor as pop_executor


def alternate_ways(
    config: Any,
    grid: dict,
    ways: Sequence[str],
    switch: Callable[[str | None], None],
    *,
    rounds: int,
    chunk: int,
    prefix: str,
    on_report: Callable[[str, Any], None] = lambda name, report: None,
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, int]]:
    """Runs the sweep ``rounds + 1`` times per way; ``switch(name)`` sets the way up before each sweep
    (``"sequential"`` runs the sequential executor, any other name the population executor with
    ``chunk_size=chunk``) and ``switch(None)`` restores the defaults at the end; ``on_report(name,
    report)`` sees each sweep while its run directories exist.

    Returns:
      ``(seconds per timed round, test accuracy per point of the last sweep, later stages trained as
      populations in the last sweep)``, each by way.
    """
    from research.executors import make_executor  # pylint: disable=import-outside-toplevel
    from research.sweep import sweep  # pylint: disable=import-outside-toplevel

    programs = {name: {} for name in ways}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    accuracy: dict[str, list[float]] = {}
    later: dict[str, int] = {}
    root = tempfile.mkdtemp(prefix=prefix)
    try:
        for r in range(rounds + 1):
            for name in ways if r % 2 == 0 else reversed(ways):
                switch(name)
                pop_executor._PROGRAMS = programs[name]  # pylint: disable=protected-access
                executor = "sequential" if name == "sequential" else make_executor("population", chunk_size=chunk)
                t0 = time.perf_counter()
                report = sweep(config, grid, f"{root}/{r}", progress=False, overwrite=True, executor=executor)
                dt = time.perf_counter() - t0
                print(f"round {r} {name}: {dt:.2f} s{' (compiles; not counted)' if r == 0 else ''}", flush=True)
                if r:
                    seconds[name].append(dt)
                accuracy[name] = [p.metrics.get("test_accuracy", float("nan")) for p in report.points]
                pops = report.executor.get("populations", [])
                later[name] = sum(len([s for s in p.get("later_stages", []) if "trials" in s]) for p in pops)
                on_report(name, report)
    finally:
        switch(None)
        pop_executor._PROGRAMS = {}  # pylint: disable=protected-access
        shutil.rmtree(root, ignore_errors=True)
    return seconds, accuracy, later


def ways_rows(
    ways: Sequence[str], seconds: dict, accuracy: dict, later: dict, label: str
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The table rows (median seconds, the rounds, ``label`` = later stages as populations, largest
    test-accuracy difference from the sequential executor) and the median seconds by way."""
    med = {name: statistics.median(t) for name, t in seconds.items()}
    rows = [
        {
            "way": name,
            "sweep s (median)": med[name],
            "rounds": " ".join(f"{t:.2f}" for t in seconds[name]),
            label: later[name],
            "max |test acc - sequential|": float(np.max(np.abs(np.subtract(accuracy[name], accuracy["sequential"])))),
        }
        for name in ways
    ]
    return rows, med
