"""A population's prune stage with its step counters unbatched (lockstep) against batched.

A pruning wrapper recomputes its masks every ``frequency`` steps behind a ``lax.cond`` on its
step counter. Vmapped over a population with the counter batched, that cond becomes a select:
every trial's masks are recomputed at every step. The population trainer passes a chunk's
counters unbatched (:func:`research.population.trainer._vmap_lockstep`; its trials step
together), so the cond stays a branch. This benchmark sweeps train -> prune points of a zoo model
on mnist5k through ``executor=PopulationExecutor(chunk_size=K)`` (both stages as vmapped
programs) both ways: ``LOCKSTEP_FIELDS`` emptied for "batched", each way with its own compiled
programs (the first sweep of each compiles and is not counted), the ways alternating
(:func:`experiments.benchmarks.later_ways.alternate_ways`).

Run:
  python -m experiments.benchmarks.population_prune
  python -m experiments.benchmarks.population_prune --points 32 --chunk 32 --rounds 3   # a GPU
"""

from __future__ import annotations

import argparse
import statistics

import jax
import numpy as np

from experiments.benchmarks.later_ways import alternate_ways
from research.population import trainer as pop_trainer
from research.report import format_table


def main(argv=None) -> int:
    from experiments.population_lr_wd.main import make_config  # pylint: disable=import-outside-toplevel
    from research.run import register_all_stages  # pylint: disable=import-outside-toplevel

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="lenet300")
    parser.add_argument("--points", type=int, default=8, help="weight decays swept (one learning rate)")
    parser.add_argument("--chunk", type=int, default=8, help="the population's chunk size K")
    parser.add_argument("--steps", type=int, default=300, help="train stage steps")
    parser.add_argument("--prune-steps", type=int, default=100, help="prune fine-tuning steps (masks every 5)")
    parser.add_argument("--rounds", type=int, default=2, help="timed sweeps per way")
    args = parser.parse_args(argv)
    register_all_stages()
    config = make_config(args.steps, args.prune_steps, args.model)
    grid = {
        "stages.train.learning_rate": [1e-3],
        "stages.train.weight_decay": [float(f"{v:.4g}") for v in np.geomspace(1e-5, 1e-1, args.points)],
    }
    fields = pop_trainer.LOCKSTEP_FIELDS
    ways = {"batched": (), "lockstep": fields}
    dev = jax.devices()[0]
    print(f"device: {dev.platform} ({dev.device_kind}) x {jax.device_count()}; jax {jax.__version__}")

    def switch(name):
        pop_trainer.LOCKSTEP_FIELDS = ways[name] if name else fields

    seconds, accuracy, later = alternate_ways(
        config, grid, list(ways), switch, rounds=args.rounds, chunk=args.chunk, prefix="population_prune_"
    )
    med = {name: statistics.median(t) for name, t in seconds.items()}
    diff = float(np.max(np.abs(np.subtract(accuracy["batched"], accuracy["lockstep"]))))
    rows = [
        {
            "counters": name,
            "sweep s (median)": med[name],
            "rounds": " ".join(f"{t:.2f}" for t in seconds[name]),
            "later stages as populations": later[name],
        }
        for name in ways
    ]
    print(
        f"\n{args.points} points of {args.model} on mnist5k, train {args.steps} -> prune 90% with "
        f"{args.prune_steps} steps, chunk {args.chunk}:"
    )
    print(format_table(rows))
    print(f"batched / lockstep: {med['batched'] / med['lockstep']:.2f}x; largest test-accuracy difference {diff:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
