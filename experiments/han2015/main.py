"""Han et al. (2015): prune LeNet-300-100 to ~12x fewer weights on the shipped MNIST subset.

Run from the repository root:
  python -m experiments.han2015.main              # 8 seeds, about 2-3 minutes on 2 CPU cores
  python -m experiments.han2015.main --quick      # smoke run in seconds
  python -m experiments.han2015.main --seeds 0 1 2 3 4 --json out.json

Prints the per-layer kept fractions next to the paper's (fc1 8%, fc2 9%, fc3 26%) and the test
error of the pruned model against a dense model trained with the same step budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

from experiments.han2015.experiment import Han2015Config
from experiments.han2015.experiment import quick_config
from experiments.han2015.experiment import run_experiment


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0..7)")
    p.add_argument("--dense-steps", type=int, help="dense steps before pruning")
    p.add_argument("--prune-steps", type=int, help="prune + retrain steps")
    p.add_argument("--rounds", type=int, help="pruning rounds")
    p.add_argument("--retrain-lr", type=float, help="peak learning rate of prune/retrain")
    p.add_argument("--l2", type=float, help="L2 weight on kernels")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument("--json", help="write the results to this JSON file")
    args = p.parse_args(argv)
    cfg = quick_config() if args.quick else Han2015Config()
    overrides = {
        "seeds": tuple(args.seeds) if args.seeds else None,
        "dense_steps": args.dense_steps,
        "prune_steps": args.prune_steps,
        "rounds": args.rounds,
        "retrain_learning_rate": args.retrain_lr,
        "l2": args.l2,
    }
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    result = run_experiment(cfg, progress=args.progress)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
