"""A learning-rate x weight-decay grid of LeNet-300-100 pruned to 90% on mnist5k, sequential vs population.

Run:  python -m experiments.population_lr_wd.main [--lrs 8] [--wds 8] [--steps 300] [--chunk-size K] [--out DIR]
      python -m experiments.population_lr_wd.main --model lenet5 --lrs 4 --wds 8 --interleave   # a CNN

The pipeline is train (AdamW, the grid's learning rate and weight decay) -> prune to 90% with a
polynomial schedule (gradual magnitude pruning) and fine-tuning. The same grid runs twice through
the public sweep API, with ``executor="sequential"`` and ``executor="population"`` (both stages
of the points as vmapped programs, chunk size measured: the train stage's learning rate and weight
decay, and the prune stage's masks and targets, are values in the optimizer states), in one
process. Prints both wall times, the chosen chunk size and which stages trained as populations,
the largest per-point differences between the executors of final test accuracy and mask sparsity
(they train the same trials on the same batches) and the best points; writes ``results.json`` and
``grid.png`` (the population executor's test accuracy over the grid) to ``--out``.
The default 8 x 8 = 64 points took about 5 min per executor on a loaded 2-core CPU;
``--interleave`` runs one sweep per learning rate, the executors alternating, so both see the same
load; for a quick check use e.g. ``--lrs 2 --wds 2 --steps 30 --prune-steps 10``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np

from research import config as C
from research.executors import make_executor
from research.run import register_all_stages
from research.sweep import SweepReport
from research.sweep import plot_grid
from research.sweep import report_populations
from research.sweep import sweep


def make_config(steps: int, prune_steps: int, model: str = "lenet300"):
    from methods.pruning import PruneStage
    from research.stages import TrainStage

    return C.Config(
        name="pop-lr-wd",
        model=C.ModelConfig(name=model),
        data=C.DataConfig(name="mnist5k"),
        stages=(
            TrainStage(steps=steps, batch_size=128, optimizer="adamw", checkpoint_every=0, eval_every=0, log_every=0),
            PruneStage(
                sparsity=0.9,
                schedule="polynomial",
                train=TrainStage(
                    steps=prune_steps, learning_rate=1e-3, batch_size=128, checkpoint_every=0, eval_every=0, log_every=0
                ),
            ),
        ),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lrs", type=int, default=8, help="learning rates (log-spaced, 1e-4 .. 1e-2)")
    parser.add_argument("--wds", type=int, default=8, help="weight decays (log-spaced, 1e-5 .. 1e-1)")
    parser.add_argument("--steps", type=int, default=300, help="train steps per point")
    parser.add_argument("--prune-steps", type=int, default=100, help="prune fine-tuning steps per point")
    parser.add_argument("--out", default="/tmp/pop_lr_wd")
    parser.add_argument("--model", default="lenet300", help="a zoo model for mnist5k (default LeNet-300-100)")
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="the population executor's K (default: measured by its chooser)"
    )
    parser.add_argument(
        "--population-first", action="store_true", help="run the population sweep before the sequential one"
    )
    parser.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the one-point sequential sweep that first compiles the steps both executors share",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="one sweep per learning rate (a row of the grid), sequential and population alternating row by row "
        "(the order flipping each row), so that both executors see the same machine load; times are summed",
    )
    args = parser.parse_args(argv)
    register_all_stages()
    grid = {
        "stages.train.learning_rate": [float(f"{v:.4g}") for v in np.geomspace(1e-4, 1e-2, args.lrs)],
        "stages.train.weight_decay": [float(f"{v:.4g}") for v in np.geomspace(1e-5, 1e-1, args.wds)],
    }
    config = make_config(args.steps, args.prune_steps, args.model)
    os.makedirs(args.out, exist_ok=True)
    results = {}
    if not args.no_warmup:  # compiles the jitted steps of both stages (shared by every point of either executor)
        first = {k: v[:1] for k, v in grid.items()}
        sweep(config, first, os.path.join(args.out, "warmup"), progress=False, overwrite=True, executor="sequential")
    lr_key = "stages.train.learning_rate"
    rows = [{**grid, lr_key: [lr]} for lr in grid[lr_key]] if args.interleave else [grid]
    order = ("population", "sequential") if args.population_first else ("sequential", "population")
    results = {name: {"seconds": 0.0, "reports": [], "rows": []} for name in order}
    for r, row in enumerate(rows):
        for name in order if r % 2 == 0 else order[::-1]:
            workdir = os.path.join(args.out, name, f"row{r}") if args.interleave else os.path.join(args.out, name)
            t0 = time.perf_counter()
            options = {"chunk_size": args.chunk_size} if name == "population" and args.chunk_size else {}
            executor = make_executor(name, **options)
            report = sweep(config, row, workdir, progress=False, overwrite=True, executor=executor)
            results[name]["seconds"] += time.perf_counter() - t0
            results[name]["rows"].append(time.perf_counter() - t0)
            results[name]["reports"].append(report)
    seq, pop = "sequential", "population"

    def column(name, key):
        return [p.metrics.get(key, float("nan")) for rep in results[name]["reports"] for p in rep.points]

    acc_diffs = np.abs(np.subtract(column(seq, "test_accuracy"), column(pop, "test_accuracy")))
    diff = float(np.nanmax(acc_diffs))
    mask_diff = float(np.nanmax(np.abs(np.subtract(column(seq, "mask_sparsity"), column(pop, "mask_sparsity")))))
    s_seq, s_pop = results["sequential"]["seconds"], results["population"]["seconds"]
    points = [p for rep in results[pop]["reports"] for p in rep.points]
    print(f"{len(points)} points, {args.model} on mnist5k, {args.steps} train + {args.prune_steps} prune steps")
    print(f"load average: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(f"sequential executor: {s_seq:8.1f} s")
    print(f"population executor: {s_pop:8.1f} s   ({s_seq / s_pop:.2f}x)")
    if args.interleave:
        for name in order:
            print(f"  {name} rows: {' '.join(f'{t:.1f}' for t in results[name]['rows'])} s")
    executors = [rep.executor for rep in results[pop]["reports"]]
    for line in dict.fromkeys(line for e in executors for line in report_populations(e)):
        print("  " + line)
    later = [s for e in executors for p in e.get("populations", []) for s in p.get("later_stages", [])]
    print(f"  prune stage fine-tuned as populations: {later}")
    print(
        f"largest per-point difference between the executors: test accuracy {diff:.4f}, mask sparsity {mask_diff:.4f}"
    )
    print(
        f"points with identical test accuracy: {int(np.sum(acc_diffs == 0))}/{len(acc_diffs)}; "
        f"mean |difference| {float(np.nanmean(acc_diffs)):.5f}; differing by more than 0.002: "
        f"{int(np.sum(acc_diffs > 0.002))}"
    )
    print(
        f"order: {'population first' if args.population_first else 'sequential first'}"
        f"{', alternating row by row (one sweep per learning rate)' if args.interleave else ''}; "
        f"warm-up: {not args.no_warmup}"
    )
    best = sorted(points, key=lambda p: -p.metrics.get("test_accuracy", 0.0))[:3]
    for p in best:
        print(
            f"  lr {p.overrides['stages.train.learning_rate']:<8g} wd {p.overrides['stages.train.weight_decay']:<8g}"
            f" test acc {p.metrics['test_accuracy']:.4f}, mask sparsity {p.metrics.get('mask_sparsity', 0):.3f}"
        )
    # The population executor's points over the whole grid (the rows' sweeps joined), as a heatmap.
    n_wd = len(grid["stages.train.weight_decay"])
    joined = [
        dataclasses.replace(p, index=r * n_wd + p.index if args.interleave else p.index)
        for r, rep in enumerate(results[pop]["reports"])
        for p in rep.points
    ]
    whole = SweepReport(workdir=args.out, grid=grid, points=tuple(joined))
    png = plot_grid(whole, os.path.join(args.out, "grid.png"))
    print(f"test accuracy over the grid: {png}")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(
            {
                "points": len(points),
                "sequential_seconds": s_seq,
                "population_seconds": s_pop,
                "row_seconds": {name: results[name]["rows"] for name in order},
                "max_test_accuracy_difference": diff,
                "identical_test_accuracy_points": int(np.sum(acc_diffs == 0)),
                "mean_test_accuracy_difference": float(np.nanmean(acc_diffs)),
                "max_mask_sparsity_difference": mask_diff,
                "load_average": os.getloadavg(),
                "args": vars(args),
                "points_test_accuracy": {
                    "sequential": column(seq, "test_accuracy"),
                    "population": column(pop, "test_accuracy"),
                },
                "points_mask_sparsity": {
                    "sequential": column(seq, "mask_sparsity"),
                    "population": column(pop, "mask_sparsity"),
                },
                "executor": executors,
            },
            f,
            indent=2,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
