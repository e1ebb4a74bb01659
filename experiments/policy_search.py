"""What ``experiments/amc_policy`` and ``experiments/haq_bits`` share: the policy search through
``research.tune`` and the searched-vs-uniform summary of the final models.

Both search one value per layer (a :class:`research.tune.LayerPolicy`) on one seed's validation
split, then train the searched and the uniform policy for several seeds and compare test accuracy.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

from research import tune as tune_lib
from research.automl import Space
from research.config import Config
from research.config import DataConfig
from research.config import ModelConfig
from research.stages import TrainStage


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


def trial_rows(result: Any, extra) -> list[dict]:
    """One dict per study trial: number, validation accuracy, seconds, state, plus ``extra(trial)``."""
    return [
        {
            "number": t["number"],
            "val_accuracy": t["values"][0] if t.get("values") else None,
            "seconds": t.get("seconds"),
            "state": t["state"],
            **extra(t),
        }
        for t in result.trials
    ]


def run_arms(seeds, workdir: str, arms: dict, make_config, extra) -> list[dict]:
    """Trains every arm for every seed; one row per (seed, arm).

    Each seed's arms run in one run directory (``workdir/seed<n>``), in order, so every arm after
    the first reuses the first stage (the dense model) and starts from the same weights.

    Args:
      arms: ``{arm name: policy values}``.
      make_config: ``(seed, values) -> Config``.
      extra: ``(values, final metrics, first-stage metrics) -> dict`` merged into the row.
    """
    from research.run import run

    rows = []
    for seed in seeds:
        for arm, values in arms.items():
            t0 = time.time()
            report = run(make_config(seed, values), os.path.join(workdir, f"seed{seed}"), progress=False, echo=False)
            m, d = report["stages"][-1]["metrics"], report["stages"][0]["metrics"]
            row = {
                "seed": seed,
                "arm": arm,
                "test_accuracy": m["test_accuracy"],
                "val_accuracy": m["val_accuracy"],
                "dense_test_accuracy": d["test_accuracy"],
                **extra(values, m, d),
            }
            row["seconds"] = time.time() - t0
            rows.append(row)
            print(f"seed {seed} {arm:8s} test {m['test_accuracy']:.4f} val {m['val_accuracy']:.4f} "
                  f"dense test {d['test_accuracy']:.4f}", flush=True)  # fmt: skip
    return rows


def add_arguments(parser, name: str) -> None:
    """The command-line options both experiments take (``name``: the default workdir's)."""
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration, one seed")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds of the final models (default 0-4; --quick: 0)")
    parser.add_argument("--trials", type=int, help="search trials")
    parser.add_argument("--workdir", default=None, help=f"study and run directories (default runs/{name}[_quick])")
    parser.add_argument("--json", help="also write the results to this JSON file")


def seeds_and_workdir(args, name: str) -> tuple[tuple[int, ...], str]:
    """The seeds and the (created) workdir the options ask for."""
    seeds = tuple(args.seeds) if args.seeds else ((0,) if args.quick else (0, 1, 2, 3, 4))
    workdir = args.workdir or os.path.join("runs", name + ("_quick" if args.quick else ""))
    os.makedirs(workdir, exist_ok=True)
    return seeds, workdir


def write_results(result: dict, text: str, workdir: str, json_path: str | None) -> None:
    """``results.json`` and ``results.txt`` in ``workdir`` (and the JSON at ``json_path``)."""
    paths = [os.path.join(workdir, "results.json")] + ([json_path] if json_path else [])
    for path in paths:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
    with open(os.path.join(workdir, "results.txt"), "w") as f:
        f.write(text + "\n")


def pipeline(name: str, recipe: Any, seed: int, second: Any) -> Config:
    """``Config`` of dense training (``recipe.pretrain_steps`` / ``pretrain_lr``) then ``second``.

    ``recipe`` gives ``model``, ``options``, ``dataset``, ``limit`` and ``batch_size``.
    """
    return Config(
        name=f"{name}-{recipe.model}",
        seed=seed,
        model=ModelConfig(name=recipe.model, options=dict(recipe.options)),
        data=DataConfig(name=recipe.dataset, limit=recipe.limit),
        stages=(train_stage(recipe.pretrain_steps, recipe.pretrain_lr, recipe.batch_size), second),
    )


def train_stage(steps: int, learning_rate: float, batch_size: int) -> TrainStage:
    """A ``TrainStage`` that checkpoints and evaluates only at the end (the runs are short)."""
    return TrainStage(
        steps=steps,
        learning_rate=learning_rate,
        batch_size=batch_size,
        checkpoint_every=0,
        eval_every=0,
        log_every=max(1, steps // 4),
    )
