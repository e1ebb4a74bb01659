"""Benchmark research.automl's multi-objective samplers against Optuna's.

Ours: ``ehvi`` (GP per objective, Monte-Carlo log expected hypervolume improvement),
``motpe`` (TPE, good set by non-dominated rank and hypervolume contribution), and the
ParEGO-style ``gp`` (random Chebyshev scalarisation) and ``tpe`` (rank split) we had, and
``evolution`` (NSGA-II selection: Pareto rank, crowding distance; model-free).
Optuna's: ``TPESampler`` (multi-objective), ``GPSampler`` (multi-objective, log EHVI) and
``NSGAIISampler``. Problems: ZDT1 and ZDT2 (``--dim`` variables, 2 objectives) and DTLZ2
(``--dim`` variables, 2 objectives). Everything runs in one process, same budgets and seeds.
Prints, per problem and sampler, the median (and min/max over seeds) hypervolume of all
trials against the reference point (1.1, 1.1) and the median wall time per trial (our
samplers' one-time JAX compilation falls in the first seed of each problem).

Optuna is a benchmark-only dependency: ``pip install optuna`` (its GPSampler also needs
``pip install torch``; without torch it is left out, without optuna only ours run).

Usage:
  nice -n 10 python -m experiments.benchmarks.multiobjective                 # 3 seeds x 60 trials
  nice -n 10 python -m experiments.benchmarks.multiobjective --full          # issue protocol: 10 seeds x 100
  python -m experiments.benchmarks.multiobjective --seeds 1 --trials 30 --samplers ours:ehvi optuna:tpe
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from collections.abc import Mapping  # noqa: E402

import numpy as np  # noqa: E402

from research.automl import Float  # noqa: E402
from research.automl import Space  # noqa: E402
from research.automl import Study  # noqa: E402
from research.automl import hypervolume  # noqa: E402
from research.automl import make_sampler  # noqa: E402

REFERENCE = np.array([1.1, 1.1])


def zdt1(x: np.ndarray) -> tuple[float, float]:
    """ZDT1 (convex front ``f2 = 1 - sqrt(f1)``), ``x`` in ``[0, 1]^d``."""
    g = 1.0 + 9.0 * float(np.mean(x[1:]))
    return float(x[0]), float(g * (1.0 - math.sqrt(x[0] / g)))


def zdt2(x: np.ndarray) -> tuple[float, float]:
    """ZDT2 (concave front ``f2 = 1 - f1^2``)."""
    g = 1.0 + 9.0 * float(np.mean(x[1:]))
    return float(x[0]), float(g * (1.0 - (x[0] / g) ** 2))


def dtlz2(x: np.ndarray) -> tuple[float, float]:
    """DTLZ2 with two objectives (front: the quarter circle ``f1^2 + f2^2 = 1``)."""
    g = float(np.sum((x[1:] - 0.5) ** 2))
    return float((1 + g) * math.cos(x[0] * math.pi / 2)), float((1 + g) * math.sin(x[0] * math.pi / 2))


#: Hypervolume of the true front against REFERENCE (for orientation in the table).
OPTIMUM = {
    "zdt1": 1.1 * 1.1 - (1.0 - 2.0 / 3.0) - 0.0,  # area above f2 = 1 - sqrt(f1) inside [0,1.1]^2
    "zdt2": 1.1 * 1.1 - (1.0 - 1.0 / 3.0),
    "dtlz2": 1.1 * 1.1 - math.pi / 4,
}
PROBLEMS: dict[str, Callable[[np.ndarray], tuple[float, float]]] = {"zdt1": zdt1, "zdt2": zdt2, "dtlz2": dtlz2}


def run_ours(name: str, fn, dim: int, n_trials: int, seed: int) -> tuple[float, float, float]:
    """Hypervolume, wall time per trial and median time per suggestion of one study."""
    space = Space({f"x{i}": Float(0.0, 1.0) for i in range(dim)})
    study = Study(space, sampler=make_sampler(name, seed=seed), direction=["minimize", "minimize"])
    asks = []
    t0 = time.perf_counter()
    for _ in range(n_trials):
        t1 = time.perf_counter()
        (trial,) = study.ask()
        x = np.array([trial.params[f"x{i}"] for i in range(dim)])
        asks.append(time.perf_counter() - t1)
        study.tell(trial, fn(x))
    wall = (time.perf_counter() - t0) / n_trials
    losses = np.array([t.values for t in study.trials])
    return hypervolume(losses, REFERENCE), wall, float(np.median(asks))


def run_optuna(name: str, fn, dim: int, n_trials: int, seed: int) -> tuple[float, float, float]:
    """Hypervolume, wall time per trial and median time per suggestion (ask plus the
    ``suggest_float`` calls, where Optuna samples a trial's first parameters)."""
    import optuna  # pylint: disable=import-outside-toplevel

    sampler = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
    }[name]()
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    asks = []
    t0 = time.perf_counter()
    for _ in range(n_trials):
        t1 = time.perf_counter()
        trial = study.ask()
        x = np.array([trial.suggest_float(f"x{i}", 0.0, 1.0) for i in range(dim)])
        asks.append(time.perf_counter() - t1)
        study.tell(trial, fn(x))
    wall = (time.perf_counter() - t0) / n_trials
    losses = np.array([t.values for t in study.trials])
    return hypervolume(losses, REFERENCE), wall, float(np.median(asks))


def available(samplers: list[str]) -> list[str]:
    out = []
    for s in samplers:
        engine, _, name = s.partition(":")
        if engine == "optuna":
            try:
                import optuna  # noqa: F401  pylint: disable=import-outside-toplevel
            except ImportError:
                print(f"skipping {s}: optuna is not installed (pip install optuna)")
                continue
            if name == "gp":
                try:
                    import torch  # noqa: F401  pylint: disable=import-outside-toplevel
                except ImportError:
                    print(f"skipping {s}: Optuna's GPSampler needs torch (pip install torch)")
                    continue
        out.append(s)
    return out


def table(results: Mapping[tuple[str, str], list[tuple[float, ...]]], problems, samplers) -> str:
    """Per problem and sampler: median, min and max hypervolume over the seeds, the median as a
    fraction of the true front's, and the median wall time per trial and per suggestion."""
    lines = [
        f"{'problem':8} {'sampler':14} {'seeds':>5} {'median HV':>10} {'min HV':>8} {'max HV':>8} "
        f"{'HV/optimum':>10} {'ms/trial':>9} {'ms/ask':>8}"
    ]
    for p in problems:
        for s in samplers:
            r = results.get((p, s))
            if not r:
                continue
            hv = np.array([row[0] for row in r])
            ms = np.median([row[1] for row in r]) * 1e3
            ask = np.median([row[2] for row in r]) * 1e3
            lines.append(
                f"{p:8} {s:14} {len(r):>5} {np.median(hv):>10.4f} {hv.min():>8.4f} {hv.max():>8.4f} "
                f"{np.median(hv) / OPTIMUM[p]:>10.3f} {ms:>9.1f} {ask:>8.1f}"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--dim", type=int, default=4, help="decision variables per problem")
    parser.add_argument("--full", action="store_true", help="10 seeds x 100 trials (the issue's protocol)")
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument(
        "--samplers",
        nargs="+",
        default=[
            "ours:ehvi",
            "ours:motpe",
            "ours:gp",
            "ours:tpe",
            "ours:evolution",
            "optuna:tpe",
            "optuna:gp",
            "optuna:nsga2",
        ],
    )
    parser.add_argument(
        "--first-seed", type=int, default=0, help="run seeds first-seed .. seeds-1 (to split a run over processes)"
    )
    parser.add_argument("--jsonl", help="append each finished (problem, sampler, seed) row here")
    parser.add_argument(
        "--table-from", nargs="+", metavar="JSONL", help="print the table of rows saved by earlier runs"
    )
    args = parser.parse_args(argv)
    if args.table_from:
        rows: dict[tuple[str, str, int], dict] = {}
        for path in args.table_from:
            with open(path) as fh:
                for line in fh:
                    if line.strip():
                        r = json.loads(line)
                        rows[(r["problem"], r["sampler"], r["seed"])] = r
        probs = list(dict.fromkeys(p for p, _, _ in rows))
        samps = list(dict.fromkeys(s for _, s, _ in rows))
        # Only the seeds that every sampler finished on a problem, so medians are comparable.
        seeds = {p: {k for q, _, k in rows if q == p} for p in probs}
        full = {p: {k for k in seeds[p] if all((p, s, k) in rows for s in samps)} for p in probs}
        res: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        for (p, s, k), r in sorted(rows.items()):
            if k in full[p]:
                res.setdefault((p, s), []).append((r["hv"], r["trial_s"], r["ask_s"]))
        print(table(res, probs, samps))
        return
    if args.full:
        args.seeds, args.trials = 10, 100
    if args.seeds < 1 or args.trials < 2 or args.dim < 2:
        parser.error(f"need --seeds >= 1, --trials >= 2, --dim >= 2 (got {args.seeds}, {args.trials}, {args.dim})")
    logging.getLogger("optuna").setLevel(logging.WARNING)
    try:
        import optuna  # pylint: disable=import-outside-toplevel

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    except ImportError:
        pass
    samplers = available(args.samplers)
    print(
        f"{args.seeds} seeds x {args.trials} trials, {args.dim} variables, reference {REFERENCE.tolist()}", flush=True
    )
    results: dict[tuple[str, str], list[tuple[float, ...]]] = {}
    done = set()
    if args.jsonl and os.path.exists(args.jsonl):
        # Resume: rows of the same protocol already in --jsonl are kept, not rerun.
        with open(args.jsonl) as fh:
            for line in fh:
                r = json.loads(line) if line.strip() else None
                if r and (r["trials"], r["dim"]) == (args.trials, args.dim):
                    done.add((r["problem"], r["sampler"], r["seed"]))
                    results.setdefault((r["problem"], r["sampler"]), []).append((r["hv"], r["trial_s"], r["ask_s"]))
    # Seeds outermost, so that a run stopped early has the same seeds of every sampler.
    for seed in range(args.first_seed, args.seeds):
        for p in args.problems:
            for s in samplers:
                engine, _, name = s.partition(":")
                run = run_ours if engine == "ours" else run_optuna
                if (p, s, seed) in done:
                    continue
                hv, wall, ask = run(name, PROBLEMS[p], args.dim, args.trials, seed)
                results.setdefault((p, s), []).append((hv, wall, ask))
                print(f"  {p} {s} seed {seed}: HV {hv:.4f}, {wall * 1e3:.1f} ms/trial", flush=True)
                if args.jsonl:
                    row = {"problem": p, "sampler": s, "seed": seed, "trials": args.trials, "dim": args.dim}
                    row.update(hv=hv, trial_s=wall, ask_s=ask)
                    with open(args.jsonl, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
    print()
    print(table(results, args.problems, samplers))


if __name__ == "__main__":
    main()
