"""HAQ in small: per-layer bit widths from {2, 4, 8} searched at the bytes of uniform 4-bit.

Run from the repository root:
  python -m experiments.haq_bits.main                 # cnn1d on MNIST-1D, LSQ QAT, int8 inputs, 30 trials, seeds 0-4
  python -m experiments.haq_bits.main --joint-acts    # inputs at each layer's bits too (HAQ's joint setting)
  python -m experiments.haq_bits.main --quick         # smoke run (tiny MLP, 2 trials, one seed)
  python -m experiments.haq_bits.main --trials 40 --seeds 0 1 2 --workdir runs/haq --json haq.json

The search is ``research.tune.tune`` (TPE sampler, validation accuracy of seed 0's split) over one
bit width per layer (``QuantRule`` s in ``stages.qat.rules``), every point over the budget
repaired before it trains. Then both the searched bits and uniform 4-bit are trained for every
seed with the same float model, QAT steps and batches; the table gives test accuracy and the
kernel bytes. Writes ``results.json`` and ``accuracy_vs_bytes.png`` to the workdir (and ``--json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from experiments.haq_bits.experiment import JOINT
from experiments.haq_bits.experiment import QUICK
from experiments.haq_bits.experiment import Recipe
from experiments.haq_bits.experiment import exhaustive
from experiments.haq_bits.experiment import run_experiment
from experiments.policy_search import add_arguments
from experiments.policy_search import scatter_arms
from experiments.policy_search import seeds_and_workdir
from experiments.policy_search import summarize
from experiments.policy_search import verdict
from experiments.policy_search import write_results


def table(result: dict) -> str:
    """Per-seed rows, the bits per layer and the verdict, as text."""
    lines = ["seed  arm       test acc  val acc  kernel bytes  report bytes  float test acc"]
    for r in result["rows"]:
        lines.append(
            f"{r['seed']:<5d} {r['arm']:<9s} {r['test_accuracy']:.4f}    {r['val_accuracy']:.4f}   "
            f"{r['modelled_bytes']:<13,.0f} {r['bytes']:<13,.0f} {r['dense_test_accuracy']:.4f}"
        )
    lines += ["", "layer          kernel weights  uniform bits  searched bits"]
    for layer, n, u, b in zip(
        result["layers"], result["kernel_weights"], result["uniform_bits"], result["searched_bits"], strict=True
    ):
        lines.append(f"{layer:<14s} {n:<15d} {u:<13d} {b}")
    s = result["summary"]
    lines.append("")
    for arm in ("uniform", "searched"):
        lines.append(f"{arm:<9s} test accuracy {100 * s[arm]['mean']:.2f} +- {100 * s[arm]['sd']:.2f} %")
    lines.append(verdict(s))
    lines.append(
        f"budget {result['budget_bytes']:,.0f} kernel bytes; search: {len(result['trials'])} trials, "
        f"best val accuracy {result['best_val_accuracy']:.4f} (trial {result['best_trial']}), "
        f"{result['search_seconds']:.0f} s; total {result['total_seconds']:.0f} s"
    )
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Test accuracy against kernel bytes, per seed, both arms, and the search trials (val)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    scatter_arms(left, result, "modelled_bytes")
    left.axvline(result["budget_bytes"], ls=":", color="tab:blue", lw=0.8, label="budget")
    left.set_xlabel("kernel bytes")
    left.set_ylabel("test accuracy (%)")
    left.set_title("final models, per seed")
    left.legend(fontsize=8)
    done = [t for t in result["trials"] if t["val_accuracy"] is not None]
    right.scatter([t["modelled_bytes"] for t in done], [100 * t["val_accuracy"] for t in done], s=18)
    right.axvline(result["budget_bytes"], ls=":", color="tab:blue", lw=0.8)
    right.set_xlabel("kernel bytes (repaired point)")
    right.set_ylabel("validation accuracy (%)")
    right.set_title("search trials (seed 0)")
    fig.suptitle(f"HAQ-style bits, {result['recipe']['model']} on {result['recipe']['dataset']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, "haq_bits")
    p.add_argument("--joint-acts", action="store_true", help="input activations at each layer's bits (not int8)")
    p.add_argument(
        "--exhaustive",
        action="store_true",
        help="also train every budget-filling policy on the search seed (a check of the search)",
    )
    args = p.parse_args(argv)
    recipe = QUICK if args.quick else (JOINT if args.joint_acts else Recipe())
    if args.trials:
        recipe = dataclasses.replace(recipe, trials=args.trials)
    seeds, workdir = seeds_and_workdir(args, "haq_bits")
    result = run_experiment(recipe, seeds, workdir)
    result["summary"] = summarize(result["rows"], result["seeds"])
    text = table(result)
    if args.exhaustive:
        result["exhaustive"] = exhaustive(recipe, workdir)
        text += "\n\nevery budget-filling policy, search seed, validation accuracy:\n" + "\n".join(
            f"{r['bits']}  {r['kernel_bytes']:,.0f} bytes  {r['val_accuracy']:.4f}"
            for r in sorted(result["exhaustive"], key=lambda r: -r["val_accuracy"])
        )
    print(text)
    write_results(result, text, workdir, args.json)
    plot(result, os.path.join(workdir, "accuracy_vs_bytes.png"))
    return result


if __name__ == "__main__":
    main()
