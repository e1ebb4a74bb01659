"""A population's decompose stage at different ranks: fine-tuned together (padded) against alone.

Points of a train -> decompose pipeline that differ in the decompose stage's parameter budget get
different ranks. The population executor (``chunk_size=K``: the train stage as one vmapped
program) fine-tunes their factorized models together, padded with zero components to the chunk's
largest ranks (:mod:`research.population.padding`), or, with the padding turned off (each trial's
own graph as its grouping key), each alone as a sequential run does. The sequential executor runs
the same grid as the reference. Each way keeps its own compiled programs; round 0 compiles and is
not counted; the ways alternate. Prints the sweep seconds, how many later stages trained as
populations, the ranks, and the largest test-accuracy difference from the sequential executor.

Run:
  python -m experiments.benchmarks.population_decompose
  python -m experiments.benchmarks.population_decompose --points 32 --chunk 32 --rounds 3   # a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from research.population import executor as pop_executor
from research.population import later as pop_later
from research.report import format_table


def make_config(steps: int, fine_tune_steps: int, model: str):
    from methods.decomposition import DecomposeStage  # pylint: disable=import-outside-toplevel
    from methods.decomposition import DecompositionRule  # pylint: disable=import-outside-toplevel
    from research import config as C  # pylint: disable=import-outside-toplevel
    from research.stages import TrainStage  # pylint: disable=import-outside-toplevel

    quiet = {"checkpoint_every": 0, "eval_every": 0, "log_every": 0, "batch_size": 128}
    return C.Config(
        name="pop-decompose",
        model=C.ModelConfig(name=model),
        data=C.DataConfig(name="mnist5k"),
        stages=(
            TrainStage(steps=steps, optimizer="adamw", learning_rate=1e-3, **quiet),
            DecomposeStage(
                rules=(DecompositionRule(pattern=".*"),),  # ranks from the parameter budget
                budget_param_ratio=0.5,
                check_speed=False,
                train=TrainStage(steps=fine_tune_steps, learning_rate=1e-3, **quiet),
            ),
        ),
    )


def _ranks(run_dir: str) -> str:
    with open(os.path.join(run_dir, "stages", "1_decompose", "factorization.json")) as f:
        layers = json.load(f)["layers"]
    return " ".join(str(r["rank"]) for r in layers if r["decision"] == "factorized")


def main(argv=None) -> int:
    from research.executors import make_executor  # pylint: disable=import-outside-toplevel
    from research.run import register_all_stages  # pylint: disable=import-outside-toplevel
    from research.sweep import sweep  # pylint: disable=import-outside-toplevel

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="lenet300")
    parser.add_argument("--points", type=int, default=8, help="parameter budgets swept (0.15 .. 0.6)")
    parser.add_argument("--chunk", type=int, default=8, help="the population's chunk size K")
    parser.add_argument("--steps", type=int, default=300, help="train stage steps")
    parser.add_argument("--fine-tune-steps", type=int, default=100, help="decompose fine-tuning steps")
    parser.add_argument("--rounds", type=int, default=2, help="timed sweeps per way")
    args = parser.parse_args(argv)
    register_all_stages()
    config = make_config(args.steps, args.fine_tune_steps, args.model)
    grid = {"stages.decompose.budget_param_ratio": [round(float(v), 3) for v in np.linspace(0.15, 0.6, args.points)]}
    padded_key = pop_later.canonical_graphdef
    ways = ("sequential", "population, alone", "population, padded together")
    programs = {name: {} for name in ways}
    seconds = {name: [] for name in ways}
    accuracy, later, ranks = {}, {}, []
    root = tempfile.mkdtemp(prefix="population_decompose_")
    dev = jax.devices()[0]
    print(f"device: {dev.platform} ({dev.device_kind}) x {jax.device_count()}; jax {jax.__version__}")
    try:
        for r in range(args.rounds + 1):
            for name in ways if r % 2 == 0 else reversed(ways):
                pop_later.canonical_graphdef = nnx.graphdef if name.endswith("alone") else padded_key
                pop_executor._PROGRAMS = programs[name]  # pylint: disable=protected-access
                executor = "sequential" if name == "sequential" else make_executor("population", chunk_size=args.chunk)
                t0 = time.perf_counter()
                report = sweep(config, grid, f"{root}/{r}", progress=False, overwrite=True, executor=executor)
                dt = time.perf_counter() - t0
                print(f"round {r} {name}: {dt:.2f} s{' (compiles; not counted)' if r == 0 else ''}", flush=True)
                if r:
                    seconds[name].append(dt)
                accuracy[name] = [p.metrics.get("test_accuracy", float("nan")) for p in report.points]
                pops = report.executor.get("populations", [])
                later[name] = sum(len(p.get("later_stages", [])) for p in pops)
                ranks = [_ranks(p.run_dir) for p in report.points]
    finally:
        pop_later.canonical_graphdef = padded_key
        pop_executor._PROGRAMS = {}  # pylint: disable=protected-access
        shutil.rmtree(root, ignore_errors=True)
    med = {name: statistics.median(t) for name, t in seconds.items()}
    rows = [
        {
            "way": name,
            "sweep s (median)": med[name],
            "rounds": " ".join(f"{t:.2f}" for t in seconds[name]),
            "decompose stages as populations": later[name],
            "max |test acc - sequential|": float(np.max(np.abs(np.subtract(accuracy[name], accuracy["sequential"])))),
        }
        for name in ways
    ]
    print(
        f"\n{args.points} points of {args.model} on mnist5k, train {args.steps} -> decompose (parameter budgets "
        f"{grid['stages.decompose.budget_param_ratio']}) with {args.fine_tune_steps} fine-tuning steps, chunk {args.chunk}:"
    )
    print(format_table(rows))
    print("ranks per point (factorized layers):", " | ".join(ranks))
    print(
        f"alone / padded together: {med['population, alone'] / med['population, padded together']:.2f}x; "
        f"sequential / padded together: {med['sequential'] / med['population, padded together']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
