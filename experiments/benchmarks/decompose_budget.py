"""A model-wide decomposition budget: the layers' singular values once, against once per bisection step.

``DecomposeStage(budget_param_ratio=...)`` (rules without a rank criterion) bisects one energy
knob shared by the layers until the factorized layers fit the budget: about 40 steps, each reading
every layer's rank at the knob. Each step used to recompute the layers' SVDs; the plans now keep
the singular values (``methods.decomposition.rank.energy_spectra``). This times
``factorize_with_report`` both ways in one process (the old way: the kept values dropped before
every rank read), alternating, and checks that both choose the same ranks.

Run:
  python -m experiments.benchmarks.decompose_budget
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax.numpy as jnp
from flax import nnx

from research.report import format_table


def main(argv=None) -> int:
    from methods.decomposition import DecompositionRule  # pylint: disable=import-outside-toplevel
    from methods.decomposition import surgery  # pylint: disable=import-outside-toplevel
    from methods.decomposition.rules import ModelBudget  # pylint: disable=import-outside-toplevel
    from research.data import load_dataset  # pylint: disable=import-outside-toplevel
    from research.nn import build_model  # pylint: disable=import-outside-toplevel

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["lenet300", "lenet5"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.15, 0.3, 0.45, 0.6])
    parser.add_argument("--rounds", type=int, default=3, help="timings per way (the fastest is kept)")
    args = parser.parse_args(argv)
    ds = load_dataset("mnist5k", seed=0)
    sample = jnp.asarray(ds.x_test[:8])
    kept = surgery._knob_rank  # pylint: disable=protected-access

    def every_step(plan, t):  # the old way: the singular values recomputed at every rank read
        plan.spectra = None
        return kept(plan, t)

    rows = []
    for name in args.models:
        model = build_model(name, input_shape=ds.input_shape, num_classes=ds.num_classes, rngs=nnx.Rngs(0))
        for ratio in args.ratios:
            times, ranks = {"every step": [], "once": []}, {}
            for r in range(args.rounds):
                for way in ("every step", "once") if r % 2 == 0 else ("once", "every step"):
                    surgery._knob_rank = every_step if way == "every step" else kept  # pylint: disable=protected-access
                    try:
                        t0 = time.perf_counter()
                        _, report = surgery.factorize_with_report(
                            model,
                            (DecompositionRule(pattern=".*"),),
                            sample_input=sample,
                            budget=ModelBudget(param_ratio=ratio),
                            check_speed=False,
                        )
                        times[way].append(time.perf_counter() - t0)
                    finally:
                        surgery._knob_rank = kept  # pylint: disable=protected-access
                    ranks[way] = [str(row["rank"]) for row in report.rows() if row["decision"] == "factorized"]
            if ranks["every step"] != ranks["once"]:
                raise AssertionError(f"{name} at {ratio}: ranks differ: {ranks}")
            best = {way: min(t) for way, t in times.items()}
            rows.append(
                {
                    "model": name,
                    "param ratio": ratio,
                    "ranks": " ".join(ranks["once"]),
                    "SVDs every step s": best["every step"],
                    "SVDs once s": best["once"],
                    "speedup": best["every step"] / best["once"],
                    "median once s": statistics.median(times["once"]),
                }
            )
    print(f"factorize_with_report on mnist5k zoo models (untrained), fastest of {args.rounds}; same ranks both ways:")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
