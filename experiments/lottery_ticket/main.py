"""Lottery tickets on LeNet-300-100 with the shipped MNIST subset (mnist5k).

Run:  python -m experiments.lottery_ticket.main [--seeds 3] [--steps 1000] [--out /tmp/lottery]

Iterative magnitude pruning with rewinding to initialisation (Frankle & Carbin 2019) at 50%,
80%, 90% and 95% sparsity, against random re-initialisation of the same masks at 80% and 95%,
over several seeds. Prints a table (mean and std of test accuracy) and writes
``lottery.png`` (accuracy against weights remaining) and ``results.json`` to ``--out``.

References:
  Frankle & Carbin, "The Lottery Ticket Hypothesis", https://arxiv.org/abs/1803.03635
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from flax import nnx

from methods.pruning import imp
from research.data import load_dataset
from research.nn import build_model

SPARSITIES = (0.5, 0.8, 0.9, 0.95)
CONTROLS = (0.8, 0.95)


def run(seeds: int = 3, steps: int = 1000, rewind_step: int = 0, dataset: str = "mnist5k", progress=True):
    """Returns rows of ``imp`` for every seed (with a ``seed`` column)."""
    ds = load_dataset(dataset, seed=0)
    rows = []
    for seed in range(seeds):
        model = build_model("lenet300", input_shape=ds.input_shape, num_classes=ds.num_classes, rngs=nnx.Rngs(seed))
        for r in imp(
            model,
            ds,
            SPARSITIES,
            steps=steps,
            rewind_step=rewind_step,
            controls=CONTROLS,
            seed=seed,
            progress=progress,
        ):
            rows.append({**r, "seed": seed})
    return rows


def summarise(rows):
    """``{(kind, sparsity_rounded): (mean, std, n)}``."""
    out = {}
    for r in rows:
        out.setdefault((r["kind"], round(r["sparsity"], 3)), []).append(r["test_accuracy"])
    return {k: (float(np.mean(v)), float(np.std(v)), len(v)) for k, v in sorted(out.items(), key=lambda kv: kv[0][1])}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--rewind-step", type=int, default=0)
    ap.add_argument("--dataset", default="mnist5k")
    ap.add_argument("--out", default="/tmp/lottery_ticket")
    args = ap.parse_args(argv)
    rows = run(args.seeds, args.steps, args.rewind_step, args.dataset)
    summ = summarise(rows)
    print(f"{'kind':<14} {'weights left':>12} {'test acc mean':>14} {'std':>7} {'seeds':>6}")
    for (kind, s), (m, sd, n) in summ.items():
        print(f"{kind:<14} {1 - s:>12.3f} {m:>14.4f} {sd:>7.4f} {n:>6}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for kind in ("ticket", "random_reinit"):
            pts = [(1 - s, m, sd) for (k, s), (m, sd, _) in summ.items() if k in (kind, "dense")]
            pts.sort()
            ax.errorbar(
                [p[0] * 100 for p in pts],
                [p[1] for p in pts],
                [p[2] for p in pts],
                marker="o",
                label=kind,
            )
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("weights remaining (%)")
        ax.set_ylabel("test accuracy")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "lottery.png"), dpi=120)
        print("wrote", os.path.join(args.out, "lottery.png"))
    except ImportError:
        print("matplotlib not installed; skipped the plot")


if __name__ == "__main__":
    main()
