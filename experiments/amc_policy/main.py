"""AMC in small: per-group kept-channel ratios searched at 50% FLOPs vs the uniform ratio.

Run from the repository root:
  python -m experiments.amc_policy.main                 # cnn1d on MNIST-1D, 30 trials, seeds 0-4
  python -m experiments.amc_policy.main --resnet20      # ResNet-20 on digits (8x8)
  python -m experiments.amc_policy.main --quick         # smoke run (tiny MLP, 2 trials, one seed)
  python -m experiments.amc_policy.main --trials 40 --seeds 0 1 2 --workdir runs/amc --json amc.json

The search is ``research.tune.tune`` (GP sampler, validation accuracy of seed 0's split) over one
removal ratio per coupled channel group (``ChannelRule`` s in ``stages.prune.channel_rules``),
every point repaired to the FLOPs budget before it trains. Then both the searched and the uniform
policy are trained for every seed with the same dense model, fine-tuning steps and batches; the
table gives test accuracy and the FLOPs measured by the run report. Writes ``results.json`` and
``accuracy_vs_flops.png`` to the workdir (and ``--json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics

from experiments.amc_policy.experiment import QUICK
from experiments.amc_policy.experiment import RESNET20
from experiments.amc_policy.experiment import Recipe
from experiments.amc_policy.experiment import run_experiment
from experiments.policy_search import add_arguments
from experiments.policy_search import scatter_arms
from experiments.policy_search import seeds_and_workdir
from experiments.policy_search import summarize
from experiments.policy_search import verdict
from experiments.policy_search import write_results


def table(result: dict) -> str:
    """The per-seed table, the searched ratios and the verdict, as text."""
    lines = ["seed  arm       test acc  val acc  FLOPs      of dense  dense test acc"]
    for r in result["rows"]:
        lines.append(
            f"{r['seed']:<5d} {r['arm']:<9s} {r['test_accuracy']:.4f}    {r['val_accuracy']:.4f}   "
            f"{r['flops']:<10,.0f} {r['flops_ratio']:.3f}     {r['dense_test_accuracy']:.4f}"
        )
    lines.append("")
    lines.append("group                 channels  uniform kept  searched kept")
    for g, c, u, s in zip(
        result["groups"], result["channels"], result["uniform_kept"], result["searched_kept"], strict=True
    ):
        lines.append(f"{g:<21s} {c:<9d} {u:<13.3f} {s:.3f}")
    s = result["summary"]
    lines.append("")
    for arm in ("uniform", "searched"):
        lines.append(
            f"{arm:<9s} test accuracy {100 * s[arm]['mean']:.2f} +- {100 * s[arm]['sd']:.2f} % "
            f"at {s[arm]['flops_ratio']:.3f} of the dense FLOPs"
        )
    lines.append(verdict(s))
    lines.append(
        f"search: {len(result['trials'])} trials, best val accuracy {result['best_val_accuracy']:.4f} "
        f"(trial {result['best_trial']}), {result['search_seconds']:.0f} s; total {result['total_seconds']:.0f} s"
    )
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Test accuracy against measured FLOPs (fraction of dense), per seed, both arms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    scatter_arms(ax, result, "flops_ratio")
    dense = [r for r in result["rows"] if r["arm"] == "uniform"]
    ax.axhline(
        100 * statistics.fmean(r["dense_test_accuracy"] for r in dense), ls="--", color="k", lw=0.8, label="dense"
    )
    ax.axvline(result["flops_budget"], ls=":", color="tab:blue", lw=0.8, label="budget")
    ax.set_xlabel("FLOPs / dense FLOPs (measured)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"AMC-style channel ratios, {result['recipe']['model']} on {result['recipe']['dataset']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, "amc_policy")
    p.add_argument("--resnet20", action="store_true", help="ResNet-20 on digits instead of cnn1d on MNIST-1D")
    args = p.parse_args(argv)
    recipe = QUICK if args.quick else (RESNET20 if args.resnet20 else Recipe())
    if args.trials:
        recipe = dataclasses.replace(recipe, trials=args.trials)
    seeds, workdir = seeds_and_workdir(args, "amc_policy")
    result = run_experiment(recipe, seeds, workdir)
    result["summary"] = summarize(result["rows"], result["seeds"])
    for arm in ("uniform", "searched"):
        ratios = [r["flops_ratio"] for r in result["rows"] if r["arm"] == arm]
        result["summary"][arm]["flops_ratio"] = statistics.fmean(ratios)
    text = table(result)
    print(text)
    write_results(result, text, workdir, args.json)
    plot(result, os.path.join(workdir, "accuracy_vs_flops.png"))
    return result


if __name__ == "__main__":
    main()
