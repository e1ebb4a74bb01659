"""research.automl's samplers against Optuna's on a wider standard suite, many seeds, one run.

``experiments/benchmarks/automl.py`` judges the samplers on three problems they were developed
on. This script widens the judgement to problems they were not tuned on, with every sampler at
its default settings (no per-function settings):

- **BBOB-style** (the COCO noiseless families, without their oscillation/rotation transforms):
  sphere, separable ellipsoid, Rastrigin, Rosenbrock, sharp ridge and different powers in
  ``--bbob-dim`` dimensions on ``[-5, 5]^D``; each seed is an *instance* whose optimum is moved
  to a random point of ``[-4, 4]^D``.
- **Classic HPO test functions**: six-hump camel (2-D), Goldstein-Price (2-D), Hartmann-3,
  Hartmann-6, Levy (4-D), Ackley (5-D), Styblinski-Tang (4-D), Branin.
- **Integer-heavy**: five integers in ``[-10, 10]`` and one float, a separable quadratic whose
  integer optimum moves with the seed.
- **Conditional**: the compression-policy space of ``research.automl.testfunctions``.

Prints, per problem, the median simple regret (best value found minus the known minimum) of
each sampler over the seeds, the rank of each sampler on each problem (1 = lowest median
regret), and the mean rank. Each (problem, sampler) row is also appended to ``--jsonl`` as it
finishes, so a run that is stopped keeps what it measured.

Optuna is a benchmark-only dependency (``pip install optuna``; its GP needs ``torch`` as well,
and is left out when torch is missing).

Usage:
  nice -n 10 python -m experiments.benchmarks.automl_suite                      # 20 seeds x 50 trials
  python -m experiments.benchmarks.automl_suite --seeds 2 --trials 20 --problems sphere branin
  python -m experiments.benchmarks.automl_suite --samplers 'ours:gp{"output_warping": "auto"}'  # sampler options
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
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from experiments.benchmarks.automl import _optuna_params  # noqa: E402
from research.automl import Float  # noqa: E402
from research.automl import Int  # noqa: E402
from research.automl import Space  # noqa: E402
from research.automl import Study  # noqa: E402
from research.automl import make_sampler  # noqa: E402
from research.automl import testfunctions as tf  # noqa: E402

Objective = Callable[[dict[str, Any]], float]


# --------------------------------------------------------------------------- BBOB-style
def _bbob(name: str, dim: int) -> Callable[[int], tuple[Space, Objective, float]]:
    def make(seed: int):
        shift = np.random.default_rng([17, seed]).uniform(-4.0, 4.0, dim)
        space = Space({f"x{i}": Float(-5.0, 5.0) for i in range(dim)})
        i = np.arange(dim)
        ramp = i / max(dim - 1, 1)

        def f(params):
            z = np.array([params[f"x{k}"] for k in range(dim)]) - shift
            if name == "sphere":
                return float(np.sum(z**2))
            if name == "ellipsoid":
                return float(np.sum(10.0 ** (6.0 * ramp) * z**2))
            if name == "rastrigin":
                return float(10.0 * dim + np.sum(z**2 - 10.0 * np.cos(2 * np.pi * z)))
            if name == "rosenbrock":
                y = max(1.0, math.sqrt(dim) / 8.0) * z + 1.0
                return float(np.sum(100.0 * (y[:-1] ** 2 - y[1:]) ** 2 + (y[:-1] - 1.0) ** 2))
            if name == "sharp_ridge":
                return float(z[0] ** 2 + 100.0 * np.sqrt(np.sum(z[1:] ** 2)))
            if name == "different_powers":
                return float(np.sqrt(np.sum(np.abs(z) ** (2.0 + 4.0 * ramp))))
            raise ValueError(name)

        return space, f, 0.0

    return make


# --------------------------------------------------------------------------- classic HPO functions
def _box(dim: int, low: float, high: float) -> Space:
    return Space({f"x{i}": Float(low, high) for i in range(dim)})


def _vec(params, dim):
    return np.array([params[f"x{i}"] for i in range(dim)])


_H3A = np.array([[3.0, 10, 30], [0.1, 10, 35], [3.0, 10, 30], [0.1, 10, 35]])
_H3P = 1e-4 * np.array([[3689, 1170, 2673], [4699, 4387, 7470], [1091, 8732, 5547], [381, 5743, 8828]])


def _fixed(space: Space, f: Objective, fmin: float) -> Callable[[int], tuple[Space, Objective, float]]:
    return lambda seed: (space, f, fmin)


def _six_hump(p):
    x, y = p["x0"], p["x1"]
    return (4 - 2.1 * x**2 + x**4 / 3) * x**2 + x * y + (-4 + 4 * y**2) * y**2


def _goldstein_price(p):
    x, y = p["x0"], p["x1"]
    a = 1 + (x + y + 1) ** 2 * (19 - 14 * x + 3 * x**2 - 14 * y + 6 * x * y + 3 * y**2)
    b = 30 + (2 * x - 3 * y) ** 2 * (18 - 32 * x + 12 * x**2 + 48 * y - 36 * x * y + 27 * y**2)
    return a * b


def _hartmann3(p):
    x = _vec(p, 3)
    return float(-np.sum(np.array([1.0, 1.2, 3.0, 3.2]) * np.exp(-np.sum(_H3A * (x - _H3P) ** 2, axis=1))))


def _levy(p, dim=4):
    w = 1 + (_vec(p, dim) - 1) / 4
    core = np.sum((w[:-1] - 1) ** 2 * (1 + 10 * np.sin(np.pi * w[:-1] + 1) ** 2))
    return float(np.sin(np.pi * w[0]) ** 2 + core + (w[-1] - 1) ** 2 * (1 + np.sin(2 * np.pi * w[-1]) ** 2))


def _ackley(p, dim=5):
    x = _vec(p, dim)
    a = -20 * np.exp(-0.2 * np.sqrt(np.mean(x**2)))
    return float(a - np.exp(np.mean(np.cos(2 * np.pi * x))) + 20 + np.e)


def _styblinski_tang(p, dim=4):
    x = _vec(p, dim)
    return float(0.5 * np.sum(x**4 - 16 * x**2 + 5 * x))


def _integer_heavy(seed: int):
    target = np.random.default_rng([23, seed]).integers(-8, 9, 5)
    space = Space({**{f"k{i}": Int(-10, 10) for i in range(5)}, "x": Float(0.0, 1.0)})

    def f(p):
        k = np.array([p[f"k{i}"] for i in range(5)])
        return float(np.sum((k - target) ** 2) + 10.0 * (p["x"] - 0.3) ** 2)

    return space, f, 0.0


def problems(bbob_dim: int) -> dict[str, Callable[[int], tuple[Space, Objective, float]]]:
    """Problem name -> ``seed -> (space, objective, known minimum)``."""
    out: dict[str, Callable[[int], tuple[Space, Objective, float]]] = {}
    for name in ("sphere", "ellipsoid", "rastrigin", "rosenbrock", "sharp_ridge", "different_powers"):
        out[f"{name}_{bbob_dim}d"] = _bbob(name, bbob_dim)
    out["six_hump_camel"] = _fixed(
        Space({"x0": Float(-3.0, 3.0), "x1": Float(-2.0, 2.0)}), _six_hump, -1.0316284534898774
    )
    out["goldstein_price"] = _fixed(_box(2, -2.0, 2.0), _goldstein_price, 3.0)
    out["branin"] = _fixed(tf.branin_space(), tf.branin, tf.BRANIN_MIN)
    out["hartmann3"] = _fixed(_box(3, 0.0, 1.0), _hartmann3, -3.86278214782076)
    out["hartmann6"] = _fixed(tf.hartmann6_space(), tf.hartmann6, tf.HARTMANN6_MIN)
    out["levy_4d"] = _fixed(_box(4, -10.0, 10.0), _levy, 0.0)
    out["ackley_5d"] = _fixed(_box(5, -32.768, 32.768), _ackley, 0.0)
    out["styblinski_tang_4d"] = _fixed(_box(4, -5.0, 5.0), _styblinski_tang, -39.16616570377142 * 4)
    out["integer_heavy"] = _integer_heavy
    out["conditional"] = _fixed(tf.conditional_space(), tf.conditional, tf.CONDITIONAL_MIN)
    return out


# --------------------------------------------------------------------------- engines
def sampler_options(name: str) -> tuple[str, dict[str, Any]]:
    """Splits ``gp{"output_warping": "auto"}`` into ``("gp", {"output_warping": "auto"})``."""
    base, brace, rest = name.partition("{")
    if not brace:
        return name, {}
    try:
        opts = json.loads(brace + rest)
    except json.JSONDecodeError as e:
        raise SystemExit(f"sampler {name!r}: the options after the name must be a JSON object ({e})") from None
    return base, opts


def run_ours(name: str, space: Space, f: Objective, n_trials: int, seed: int) -> tuple[float, float]:
    base, opts = sampler_options(name)
    study = Study(space, sampler=make_sampler(base, seed=seed, **opts))
    asks = []
    for _ in range(n_trials):
        t0 = time.perf_counter()
        (trial,) = study.ask()
        asks.append(time.perf_counter() - t0)
        study.tell(trial, f(trial.params))
    return study.best_value, float(np.median(asks))


def run_optuna(name: str, space: Space, f: Objective, n_trials: int, seed: int) -> tuple[float, float]:
    import optuna  # noqa: PLC0415

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = {"tpe": optuna.samplers.TPESampler, "gp": optuna.samplers.GPSampler}[name](seed=seed)
    study = optuna.create_study(sampler=sampler)
    asks = []
    for _ in range(n_trials):
        t0 = time.perf_counter()
        trial = study.ask()
        params = _optuna_params(optuna, trial, space)
        asks.append(time.perf_counter() - t0)
        study.tell(trial, f(params))
    return study.best_value, float(np.median(asks))


def available(samplers: list[str]) -> list[str]:
    """The samplers that can run here (Optuna's only when installed; its GP only with torch)."""
    out = []
    for s in samplers:
        engine, _, name = s.partition(":")
        if engine == "optuna":
            try:
                import optuna  # noqa: F401, PLC0415

                if name == "gp":
                    import torch  # noqa: F401, PLC0415
            except ImportError as e:
                print(f"skipping {s}: {e}")
                continue
        out.append(s)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--bbob-dim", type=int, default=5)
    ap.add_argument("--problems", nargs="+", help="default: all")
    ap.add_argument(
        "--samplers",
        nargs="+",
        default=["ours:gp", "ours:tpe", "ours:evolution", "ours:random", "optuna:tpe", "optuna:gp"],
    )
    ap.add_argument("--jsonl", help="append each finished (problem, sampler) row here")
    ap.add_argument(
        "--table-from",
        nargs="+",
        metavar="JSONL[@TAG]",
        help="print the table of rows saved by earlier runs (samplers of a path with @TAG are named sampler@TAG)",
    )
    a = ap.parse_args(argv)
    if a.table_from:
        print(table_from_jsonl(a.table_from))
        return 0
    logging.getLogger("optuna").setLevel(logging.WARNING)
    probs = problems(a.bbob_dim)
    names = a.problems or list(probs)
    unknown = sorted(set(names) - set(probs))
    if unknown:
        ap.error(f"unknown problems {unknown}; choose from {sorted(probs)}")
    samplers = available(a.samplers)
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for prob in names:
        table[prob] = {}
        for s in samplers:
            engine, _, name = s.partition(":")
            regrets, asks = [], []
            t0 = time.perf_counter()
            for seed in range(a.seeds):
                space, f, fmin = probs[prob](seed)
                best, ask = (run_ours if engine == "ours" else run_optuna)(name, space, f, a.trials, seed)
                regrets.append(best - fmin)
                asks.append(ask)
            med = float(np.median(regrets))
            table[prob][s] = (med, float(np.median(asks)))
            row = {
                "problem": prob,
                "sampler": s,
                "seeds": a.seeds,
                "trials": a.trials,
                "median_regret": med,
                "regrets": regrets,
                "median_ask_s": float(np.median(asks)),
                "wall_s": time.perf_counter() - t0,
            }
            print(f"{prob:<22} {s:<16} median regret {med:.4g}  ({row['wall_s']:.0f} s)", flush=True)
            if a.jsonl:
                with open(a.jsonl, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
    print(format_table(table, samplers, a.seeds, a.trials))
    return 0


def table_from_jsonl(paths: list[str]) -> str:
    """The table of rows that earlier runs appended with ``--jsonl`` (a later row of the same
    problem and sampler replaces an earlier one); runs with different seeds or trials are named.

    A path may end in ``@TAG``: its samplers are then shown as ``sampler@TAG``, so that two runs
    of one sampler (e.g. before and after a change) stand side by side."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for spec in paths:
        path, _, tag = spec.partition("@")
        with open(path) as fh:
            for line in fh:
                if line.strip():
                    r = json.loads(line)
                    if tag:
                        r["sampler"] = f"{r['sampler']}@{tag}"
                    rows[(r["problem"], r["sampler"])] = r
    if not rows:
        raise SystemExit(f"no rows in {paths}")
    samplers = list(dict.fromkeys(s for _, s in rows))
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for (prob, s), r in rows.items():
        table.setdefault(prob, {})[s] = (r["median_regret"], r["median_ask_s"])
    protocols = sorted({(r["seeds"], r["trials"]) for r in rows.values()})
    seeds = "/".join(str(p[0]) for p in protocols)
    trials = "/".join(str(p[1]) for p in protocols)
    out = format_table(table, samplers, seeds, trials)
    if len(protocols) > 1:
        per = ", ".join(f"{s}: {rows[next(k for k in rows if k[1] == s)]['seeds']} seeds" for s in samplers)
        out += f"\n(seeds per sampler: {per})"
    return out


def format_table(table: dict[str, dict[str, tuple[float, float]]], samplers: list[str], seeds: Any, trials: Any) -> str:
    """Median regret per problem and sampler, each sampler's rank per problem, and the mean rank."""
    head = f"{'problem':<22}" + "".join(f"{s:>16}" for s in samplers)
    lines = [f"median simple regret over {seeds} seeds after {trials} trials (rank in brackets)", head, "-" * len(head)]
    ranks = {s: [] for s in samplers}
    for prob, row in table.items():
        meds = np.array([row[s][0] for s in samplers if s in row])
        order = {s: int(np.sum(meds < row[s][0])) + 1 for s in samplers if s in row}
        for s, r in order.items():
            ranks[s].append(r)
        lines.append(f"{prob:<22}" + "".join(f"{f'{row[s][0]:.3g} ({order[s]})':>16}" for s in samplers if s in row))
    lines.append("-" * len(head))
    lines.append(
        f"{'mean rank':<22}" + "".join(f"{np.mean(ranks[s]) if ranks[s] else float('nan'):>16.2f}" for s in samplers)
    )
    lines.append(f"{'median ask (ms)':<22}" + "".join(
        f"{1e3 * float(np.median([row[s][1] for row in table.values() if s in row])):>16.1f}" for s in samplers
    ))  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
