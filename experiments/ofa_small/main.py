"""Once-for-all NAS on MNIST-1D: supernet, search, fine-tuned Pareto members vs scratch vs zoo models.

Run from the repository root:
  nice -n 10 python -m experiments.ofa_small.main                 # seed 0, full sizes
  python -m experiments.ofa_small.main --quick                    # smoke run
  python -m experiments.ofa_small.main --seeds 0 1 2 --json out.json
  python -m experiments.ofa_small.main --merge s0.json s1.json s2.json --json all.json --plot all.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

from experiments.ofa_small.experiment import OFAConfig
from experiments.ofa_small.experiment import dominance
from experiments.ofa_small.experiment import format_dominance
from experiments.ofa_small.experiment import format_table
from experiments.ofa_small.experiment import plot_results
from experiments.ofa_small.experiment import quick_config
from experiments.ofa_small.experiment import run_experiment


def main(argv: list[str] | None = None) -> list:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--supernet-steps", type=int)
    p.add_argument("--trials", type=int)
    p.add_argument("--front-size", type=int, help="Pareto members fine-tuned and trained from scratch")
    p.add_argument("--finetune-steps", type=int)
    p.add_argument("--scratch-steps", type=int, help="steps of every from-scratch model (found and zoo)")
    p.add_argument("--sampler", help="the search's sampler: tpe (default), evolution, gp, random, ...")
    p.add_argument("--supernet-batch-size", type=int)
    p.add_argument("--first-phase", type=float, help="progressive shrinking: fraction of steps on the largest alone")
    p.add_argument("--no-progressive", action="store_true", help="plain sandwich rule, no progressive shrinking")
    p.add_argument("--constrained-trials", type=int, help="per zoo model, candidates of the FLOPs-limited search")
    p.add_argument("--constrained-top", type=int, help="per zoo model, constrained candidates trained from scratch")
    p.add_argument("--tau-members", type=int, help="found members trained from scratch for Kendall's tau (at least)")
    p.add_argument("--search-latency", choices=("jax", "tflite", ""), help="the main search's latency objective")
    p.add_argument(
        "--scratch-repeats", type=int,
        help="trainings (seeds) of each zoo model and each member within their FLOPs; means choose and compare",
    )  # fmt: skip
    p.add_argument("--no-tflite", action="store_true", help="do not time the exported TFLite files")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="no run: summarise (and plot) these results files")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write the accuracy-vs-FLOPs plot of every seed here (PNG)")
    a = p.parse_args(argv)
    cfg = quick_config() if a.quick else OFAConfig()
    over = {
        "seeds": tuple(a.seeds) if a.seeds else None,
        "supernet_steps": a.supernet_steps,
        "trials": a.trials,
        "sampler": a.sampler,
        "front_size": a.front_size,
        "finetune_steps": a.finetune_steps,
        "scratch_steps": a.scratch_steps,
        "progressive": False if a.no_progressive else None,
        "supernet_batch_size": a.supernet_batch_size,
        "first_phase": a.first_phase,
        "constrained_trials": a.constrained_trials,
        "constrained_top": a.constrained_top,
        "tau_members": a.tau_members,
        "search_latency": a.search_latency,
        "tflite_latency": False if a.no_tflite else None,
        "scratch_repeats": a.scratch_repeats,
    }
    cfg = dataclasses.replace(cfg, **{k: v for k, v in over.items() if v is not None})
    if a.merge:
        results = [r for f in a.merge for r in json.loads(pathlib.Path(f).read_text())]
        for res in results:
            print(f"seed {res['seed']}:")
            print(format_table(res))
    else:
        results = run_experiment(cfg)
    for d in dominance(results):
        print(format_dominance(d))
    if any(res.get("scratch_repeats", 1) > 1 for res in results):  # the single-training protocol, for comparison
        print("with the first training of every model only:")
        for d in dominance(results, run=0):
            print("  " + format_dominance(d))
    taus = ", ".join(f"seed {r['seed']}: {r['kendall_tau']:.3f} over {r.get('tau_members', '?')}" for r in results)
    print(f"Kendall tau (supernet val vs scratch test): {taus}")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(results, indent=2, default=float))
    if a.plot:
        print(f"wrote {plot_results(results, a.plot)}")
    return results


if __name__ == "__main__":
    main()
