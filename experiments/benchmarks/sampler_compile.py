"""What the samplers' CPU compile options buy: a study with and without them, side by side.

``research.automl`` compiles its samplers' programs (the GP fit and acquisition, TPE's pick, the
EHVI score) with :data:`research.automl._numerics.CPU_COMPILE_OPTIONS` when JAX runs on the CPU.
This script runs the same studies both ways, each configuration in a fresh subprocess (so neither
reuses the other's compiled programs; JAX's persistent compilation cache is off), alternating the
configurations ``--repeats`` times, and prints per configuration the median wall time of the
study, the part of it that XLA spent compiling, and the best value found (equal to ~8 digits when
both configurations suggested the same points).

A run's table is kept in ``experiments/benchmarks/results/sampler_compile.txt``.

Usage:
  python -m experiments.benchmarks.sampler_compile              # GP 48 + TPE 60 trials, ~4 min
  python -m experiments.benchmarks.sampler_compile --repeats 1  # ~2 min
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

STUDIES = {"gp": 48, "tpe": 60}
CONFIGS = ("defaults", "options")


def _one(sampler: str, trials: int, config: str) -> dict:
    """Runs one study in this process (the subprocess side) and returns its figures."""
    import time

    import jax.monitoring

    from research.automl import GPSampler
    from research.automl import Study
    from research.automl import TPESampler
    from research.automl import _numerics
    from research.automl import testfunctions as tf

    if config == "defaults":
        _numerics.CPU_COMPILE_OPTIONS = {}
    compile_s = [0.0]

    def listen(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compile_s[0] += duration

    jax.monitoring.register_event_duration_secs_listener(listen)
    make = {"gp": GPSampler, "tpe": TPESampler}[sampler]
    study = Study(tf.branin_space(), sampler=make(seed=0))
    start = time.perf_counter()
    study.optimize(tf.branin, n_trials=trials, show_progress_bar=False)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "compile_s": compile_s[0], "best": study.best_value}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each configuration (alternated)")
    parser.add_argument("--child", nargs=3, metavar=("SAMPLER", "TRIALS", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        sampler, trials, config = args.child
        print(json.dumps(_one(sampler, int(trials), config)))
        return
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} must be >= 1")
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": "", "JAX_PLATFORMS": "cpu"}
    rows = []
    for sampler, trials in STUDIES.items():
        runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
        for _ in range(args.repeats):
            for config in CONFIGS:
                cmd = [sys.executable, "-m", "experiments.benchmarks.sampler_compile", "--child", sampler]
                cmd += [str(trials), config]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
                runs[config].append(json.loads(out.strip().splitlines()[-1]))
        for config in CONFIGS:
            r = runs[config]
            rows.append(
                (
                    f"{sampler} ({trials} trials)",
                    config,
                    statistics.median(x["wall_s"] for x in r),
                    statistics.median(x["compile_s"] for x in r),
                    r[0]["best"],
                )
            )
    import jax

    print(f"Branin, seed 0, JAX {jax.__version__} on the CPU ({os.cpu_count()} cores), median of {args.repeats}")
    print(f"{'study':<18} {'compile options':<20} {'wall s':>8} {'compile s':>10} {'rest s':>8} {'best value':>14}")
    for study, config, wall, comp, best in rows:
        label = "XLA defaults" if config == "defaults" else "CPU_COMPILE_OPTIONS"
        print(f"{study:<18} {label:<20} {wall:8.1f} {comp:10.1f} {wall - comp:8.1f} {best:14.9f}")
    for i in range(0, len(rows), 2):
        print(f"{rows[i][0]}: wall {rows[i][2] / rows[i + 1][2]:.2f}x faster with the options")


if __name__ == "__main__":
    main()
