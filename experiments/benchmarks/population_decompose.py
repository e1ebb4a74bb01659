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

import jax
import numpy as np
from flax import nnx

from experiments.benchmarks.later_ways import alternate_ways
from experiments.benchmarks.later_ways import ways_rows
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
    from research.run import register_all_stages  # pylint: disable=import-outside-toplevel

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
    ranks: list[str] = []

    def switch(name):  # alone: each trial's own graph as its grouping key (no padding)
        pop_later.canonical_graphdef = nnx.graphdef if name and name.endswith("alone") else padded_key

    def on_report(name, report):
        ranks[:] = [_ranks(p.run_dir) for p in report.points]

    dev = jax.devices()[0]
    print(f"device: {dev.platform} ({dev.device_kind}) x {jax.device_count()}; jax {jax.__version__}")
    seconds, accuracy, later = alternate_ways(
        config, grid, ways, switch, rounds=args.rounds, chunk=args.chunk, prefix="population_decompose_",
        on_report=on_report,
    )  # fmt: skip
    rows, med = ways_rows(ways, seconds, accuracy, later, "decompose stages as populations")
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
