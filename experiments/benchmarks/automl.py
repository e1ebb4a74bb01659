"""Benchmark research.automl's samplers against Optuna's on standard test functions.

Runs both engines in one process on the same machine, with the same budgets and seeds:
Branin (2-D), Hartmann-6 (6-D) and a conditional compression-policy space
(research.automl.testfunctions). Prints, per problem and sampler, the median simple
regret (best value found minus the global minimum) after the trial budget and the median
wall time per suggestion; then the time of one GP suggestion with ~100 and ~300
observations (steady state, with the one-time JAX compilation reported separately).

Optuna is a benchmark-only dependency (``pip install optuna torch greenlet``; its
GPSampler needs torch). Without it only our samplers run.

Usage:
  python -m experiments.benchmarks.automl            # ~3-6 min on 2 CPU cores
  python -m experiments.benchmarks.automl --quick    # smoke run, ~1-2 min
  python -m experiments.benchmarks.automl --full     # issue protocol: 10 seeds,
                                                              # Branin 50, Hartmann6 100,
                                                              # conditional 100 trials
"""

from __future__ import annotations

import os

# One BLAS thread for both engines: on a small shared CPU, threaded LAPACK calls on
# 300x300 matrices are slower, and it keeps the comparison fair.
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from research.automl import Categorical  # noqa: E402
from research.automl import Float  # noqa: E402
from research.automl import GPSampler  # noqa: E402
from research.automl import InMemoryStorage  # noqa: E402
from research.automl import Int  # noqa: E402
from research.automl import RandomSampler  # noqa: E402
from research.automl import Space  # noqa: E402
from research.automl import Study  # noqa: E402
from research.automl import TPESampler  # noqa: E402
from research.automl import testfunctions as tf  # noqa: E402

PROBLEMS = {
    "branin": (tf.branin_space, tf.branin, tf.BRANIN_MIN),
    "hartmann6": (tf.hartmann6_space, tf.hartmann6, tf.HARTMANN6_MIN),
    "conditional": (tf.conditional_space, tf.conditional, tf.CONDITIONAL_MIN),
}


# --------------------------------------------------------------------------- our engine
def run_ours(make_sampler: Callable[[int], object], problem: str, n_trials: int, seed: int):
    make_space, f, fmin = PROBLEMS[problem]
    study = Study(make_space(), sampler=make_sampler(seed))
    times = []
    for _ in range(n_trials):
        t0 = time.perf_counter()
        (trial,) = study.ask()
        times.append(time.perf_counter() - t0)
        study.tell(trial, f(trial.params))
    return study.best_value - fmin, times


# --------------------------------------------------------------------------- Optuna
def _optuna_params(optuna, trial, space: Space):
    """Define-by-run translation of one of our spaces (conditions included)."""
    params = {}
    for name in space.names:
        if not space.is_active(name, params):
            continue
        p = space[name]
        if isinstance(p, Float):
            params[name] = trial.suggest_float(name, p.low, p.high, log=p.log)
        elif isinstance(p, Int):
            params[name] = trial.suggest_int(name, p.low, p.high, log=p.log)
        elif isinstance(p, Categorical):
            params[name] = trial.suggest_categorical(name, list(p.choices))
    return params


def run_optuna(kind: str, problem: str, n_trials: int, seed: int):
    import optuna  # pylint: disable=import-outside-toplevel

    make_space, f, fmin = PROBLEMS[problem]
    space = make_space()
    sampler = {
        "gp": lambda: optuna.samplers.GPSampler(seed=seed),
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
    }[kind]()
    study = optuna.create_study(sampler=sampler)
    times = []
    for _ in range(n_trials):
        t0 = time.perf_counter()
        trial = study.ask()
        params = _optuna_params(optuna, trial, space)
        times.append(time.perf_counter() - t0)
        study.tell(trial, f(params))
    return study.best_value - fmin, times


# --------------------------------------------------------------------------- timing at N
def time_ours_at(n_obs: int, n_asks: int, seed: int = 0):
    space = tf.hartmann6_space()
    storage = InMemoryStorage()
    filler = Study(space, sampler=RandomSampler(seed=seed), storage=storage, name="t")
    for t in filler.ask(n_obs):
        filler.tell(t, tf.hartmann6(t.params))
    study = Study(space, sampler=GPSampler(seed=seed), storage=storage, name="t")
    times = []
    for _ in range(n_asks + 1):
        t0 = time.perf_counter()
        (t,) = study.ask()
        times.append(time.perf_counter() - t0)
        study.tell(t, tf.hartmann6(t.params))
    return times[0], float(np.median(times[1:]))


def time_optuna_at(n_obs: int, n_asks: int, seed: int = 0):
    import optuna  # pylint: disable=import-outside-toplevel

    dists = {f"x{i}": optuna.distributions.FloatDistribution(0.0, 1.0) for i in range(6)}
    study = optuna.create_study(sampler=optuna.samplers.GPSampler(seed=seed))
    rng = np.random.default_rng(seed)
    for _ in range(n_obs):
        p = {k: float(v) for k, v in zip(dists, rng.random(6), strict=True)}
        study.add_trial(optuna.trial.create_trial(params=p, distributions=dists, value=tf.hartmann6(p)))
    times = []
    for _ in range(n_asks + 1):
        t0 = time.perf_counter()
        trial = study.ask(dists)
        times.append(time.perf_counter() - t0)
        study.tell(trial, tf.hartmann6(trial.params))
    return times[0], float(np.median(times[1:]))


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 seeds, short budgets")
    ap.add_argument("--full", action="store_true", help="the issue's protocol (10 seeds)")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--problems", default="branin,hartmann6,conditional")
    ap.add_argument("--timing", default=None, help="observation counts for GP timing, e.g. 100,300")
    ap.add_argument("--no-optuna", action="store_true")
    ap.add_argument(
        "--samplers",
        default=None,
        help="comma-separated subset to run, e.g. ours-gp,optuna-gp (default: all)",
    )
    args = ap.parse_args(argv)

    if args.full:
        budgets, seeds, timing = (
            {"branin": 50, "hartmann6": 100, "conditional": 100},
            10,
            [100, 300],
        )
    elif args.quick:
        budgets, seeds, timing = {"branin": 30, "hartmann6": 40, "conditional": 30}, 2, [100]
    else:
        budgets, seeds, timing = {"branin": 50, "hartmann6": 60, "conditional": 50}, 3, [100, 300]
    seeds = args.seeds or seeds
    if args.timing:
        timing = [int(x) for x in args.timing.split(",") if x]
    problems = [p for p in args.problems.split(",") if p]

    have_optuna = False
    if not args.no_optuna:
        try:
            import optuna  # pylint: disable=import-outside-toplevel

            optuna.logging.set_verbosity(optuna.logging.ERROR)
            logging.getLogger("optuna").setLevel(logging.ERROR)
            try:
                import torch  # pylint: disable=import-outside-toplevel

                torch.set_num_threads(1)
            except ImportError:
                pass
            have_optuna = True
        except ImportError:
            print("optuna is not installed: running our samplers only (pip install optuna torch)")

    ours = {
        "ours-gp": lambda s: GPSampler(seed=s),
        "ours-tpe": lambda s: TPESampler(seed=s),  # multivariate, as Optuna 5's default
        "ours-tpe-uni": lambda s: TPESampler(seed=s, multivariate=False),
        "ours-random": lambda s: RandomSampler(seed=s),
    }
    theirs = ["gp", "tpe"] if have_optuna else []
    print(f"device: {jax.devices()[0].device_kind}; seeds: {seeds}; budgets: {budgets}")
    rows = []
    per_seed: dict[tuple[str, str], list[float]] = {}
    for prob in problems:
        n = budgets[prob]
        entries = [(k, lambda s, k=k, prob=prob, n=n: run_ours(ours[k], prob, n, s)) for k in ours]
        entries += [(f"optuna-{k}", lambda s, k=k, prob=prob, n=n: run_optuna(k, prob, n, s)) for k in theirs]
        if args.samplers:
            wanted = set(args.samplers.split(","))
            entries = [e for e in entries if e[0] in wanted]
        for name, fn in entries:
            regrets, times = [], []
            t_start = time.perf_counter()
            for s in range(seeds):
                r, ts = fn(s)
                regrets.append(r)
                times.extend(ts)
            wall = time.perf_counter() - t_start
            rows.append((prob, n, name, float(np.median(regrets)), float(np.median(times)), wall))
            per_seed[(prob, name)] = regrets
            print(
                f"  {prob:12s} {name:14s} median regret {rows[-1][3]:.4g}  "
                f"median ask {1e3 * rows[-1][4]:.1f} ms  ({wall:.0f}s)",
                flush=True,
            )

    print("\n## Median simple regret after the budget and median time per suggestion")
    print(f"seeds: {seeds}; times include JAX compilation in the first trials of a process\n")
    print("| problem | trials | sampler | median regret | median s/suggestion | wall s |")
    print("|---|---|---|---|---|---|")
    for prob, n, name, reg, t, wall in rows:
        print(f"| {prob} | {n} | {name} | {reg:.4g} | {t:.4f} | {wall:.0f} |")

    print("\n## Simple regret per seed (seeds 0, 1, ...)\n")
    for (prob, name), regrets in per_seed.items():
        print(f"{prob:12s} {name:14s} " + " ".join(f"{r:.2g}" for r in regrets))

    if timing:
        print("\n## GP suggestion time on Hartmann-6 with N random observations")
        print("(median of 5 asks after the first; the first ask's time includes compilation)\n")
        print("| N | engine | first ask s | median s/suggestion | speed-up vs Optuna |")
        print("|---|---|---|---|---|")
        for n_obs in timing:
            first, med = time_ours_at(n_obs, 5)
            if have_optuna:
                ofirst, omed = time_optuna_at(n_obs, 5)
                print(f"| {n_obs} | optuna-gp | {ofirst:.3f} | {omed:.4f} | 1.0x |")
                print(f"| {n_obs} | ours-gp | {first:.3f} | {med:.4f} | {omed / med:.1f}x |")
            else:
                print(f"| {n_obs} | ours-gp | {first:.3f} | {med:.4f} | - |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
