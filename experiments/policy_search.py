"""What ``experiments/amc_policy`` and ``experiments/haq_bits`` share: the policy search through
``research.tune`` and the searched-vs-uniform summary of the final models.

Both search one value per layer (a :class:`research.tune.LayerPolicy`) on one seed's validation
split, then train the searched and the uniform policy for several seeds and compare test accuracy.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from research import tune as tune_lib
from research.automl import Space
from research.config import Config


def search(
    config: Config, policy: tune_lib.LayerPolicy, workdir: str, *, trials: int, sampler: str, seed: int
) -> tuple[Any, dict, float]:
    """``(TuneResult, best complete trial, seconds)`` of a ``research.tune`` study over ``policy``.

    The study (``workdir/search``) maximises validation accuracy; each trial is a full run of
    ``config`` with the point's per-layer rules (repaired to the policy's budget).

    Raises:
      RuntimeError: no trial finished.
    """
    tdir = os.path.join(workdir, "search")
    t0 = time.time()
    result = tune_lib.tune(
        config,
        Space(policy.parameters()),
        tdir,
        trials=trials,
        sampler=sampler,
        objectives=["val_accuracy:max"],
        policies=[policy],
        seed=seed,
        plot_every=0,
        echo=True,
    )
    seconds = time.time() - t0
    done = [t for t in result.trials if t["state"] == "COMPLETE" and t.get("values")]
    if not done:
        raise RuntimeError(f"no search trial finished; see {tdir}/tune.txt")
    return result, max(done, key=lambda t: t["values"][0]), seconds


def summarize(rows: list[dict], seeds: list[int]) -> dict:
    """Mean/sd of test accuracy per arm and the per-seed differences searched - uniform.

    ``beats_spread``: the mean difference is larger than the larger of the two arms' seed sd
    (``None`` with one seed: no spread to compare with).
    """
    acc = {arm: {r["seed"]: r["test_accuracy"] for r in rows if r["arm"] == arm} for arm in ("uniform", "searched")}

    def sd(xs):
        return statistics.stdev(xs) if len(xs) > 1 else 0.0

    out = {arm: {"mean": statistics.fmean(v.values()), "sd": sd(list(v.values()))} for arm, v in acc.items()}
    diff = [acc["searched"][s] - acc["uniform"][s] for s in seeds]
    out["difference"] = {
        "per_seed": diff,
        "mean": statistics.fmean(diff),
        "sd": sd(diff),
        "searched_better": sum(d > 0 for d in diff),
    }
    spread = max(out["uniform"]["sd"], out["searched"]["sd"])
    out["beats_spread"] = out["difference"]["mean"] > spread if len(seeds) > 1 else None
    return out


def verdict(summary: dict) -> str:
    """One line: the mean difference, how many seeds, and whether it beats the seed spread."""
    d = summary["difference"]
    beats = summary["beats_spread"]
    judged = (
        "one seed: no spread to judge by"
        if beats is None
        else f"{'beats' if beats else 'does NOT beat'} the seed-to-seed spread"
    )
    return (
        f"searched - uniform: {100 * d['mean']:+.2f} +- {100 * d['sd']:.2f} pt "
        f"({d['searched_better']}/{len(d['per_seed'])} seeds better); {judged}"
    )


def scatter_arms(ax, result: dict, x: str) -> None:
    """Test accuracy against ``row[x]`` per seed, both arms; grey lines pair a seed's two arms."""
    for seed in result["seeds"]:
        pair = [r for r in result["rows"] if r["seed"] == seed]
        ax.plot([r[x] for r in pair], [100 * r["test_accuracy"] for r in pair], color="0.8", lw=0.8, zorder=0)
    for arm, marker, color in (("uniform", "o", "tab:gray"), ("searched", "*", "tab:red")):
        rows = [r for r in result["rows"] if r["arm"] == arm]
        ax.scatter([r[x] for r in rows], [100 * r["test_accuracy"] for r in rows], marker=marker, s=90, color=color,
                   label=arm)  # fmt: skip
        for r in rows:
            ax.annotate(f"s{r['seed']}", (r[x], 100 * r["test_accuracy"]), fontsize=7)
