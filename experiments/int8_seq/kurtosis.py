"""Full-int8 agreement of the attention + GRU zoo model after fine-tuning with and without the
activation-kurtosis penalty; prints a table, side by side per variation.

For each (init seed, data-order seed) variation: the zoo ``attn_gru`` trained on MNIST-1D exactly as
the slow test trains it (1500 Adam steps, batch 128, ``train_scan``), then fine-tuned twice from
those weights with :func:`research.train.finetune` (same steps, batches and learning rate): once
with the task loss alone (``control``), once with
``methods.quantization.kurtosis_regularizer(weight)`` added (``kurtosis``). Each fine-tuned model is
exported with ``research.export.export`` to TFLite and ONNX ``int8`` (calibrated on the first 256
training inputs, compared on the test split + the sample + a batch of one: 1009 inputs) with each
``activation_calibration`` rule. Columns: test accuracy of the float model, top-1 agreement of the
TFLite and ONNX files with it, the median over test inputs of the TFLite file's largest absolute
logit error, and the fine-tuning's wall time (compilation included).

Run from the repository root:
  python -m experiments.int8_seq.kurtosis                                  # five variations
  python -m experiments.int8_seq.kurtosis --variations 0,0 1,1 --weight 0.01 --steps 300
  python -m experiments.int8_seq.kurtosis --weight 0.03 --kd-alpha 0.5 --rules percentile

``--cache DIR`` keeps the 1500-step models between runs (``.npz``, no pickle).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.int8_seq.ranges import export_int8
from methods.distillation import distill
from methods.quantization import kurtosis_regularizer
from research.data import load_dataset
from research.nn import build_model
from research.train import finetune
from research.train import train_scan

VARIATIONS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2))
RULES = ("minmax", "percentile")


def trained(
    ds, init: int, data: int, steps: int = 1500, cache: str | None = None, name: str = "attn_gru", **options
) -> nnx.Module:
    """The zoo model ``name`` (``attn_gru`` at its defaults unless ``options`` say otherwise) trained as
    the slow tests train it: ``train_scan``, ``steps`` Adam steps, batch 128, data order ``data``
    (loaded from ``cache`` if stored there)."""
    model = build_model(
        name, input_shape=ds.x_train.shape[1:], num_classes=ds.num_classes, rngs=nnx.Rngs(init), **options
    )
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    tag = "".join(f"_{k}{v}" for k, v in sorted(options.items()))
    path = os.path.join(cache, f"{name}{tag}_i{init}_d{data}_n{steps}.npz") if cache else None
    if path and os.path.exists(path):
        with np.load(path, allow_pickle=False) as z:
            leaves = [jnp.asarray(z[f"a{i}"]) for i in range(len(leaves))]
        model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    else:
        train_scan(model, ds.x_train, ds.y_train, steps=steps, batch_size=128, seed=data)
        if path:
            os.makedirs(cache, exist_ok=True)
            np.savez(path, **{f"a{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(nnx.split(model)[1]))})
    model.eval()
    return model


def run(
    variations=VARIATIONS,
    rules=RULES,
    weight: float = 0.01,
    steps: int = 300,
    learning_rate: float = 1e-3,
    schedule: str = "constant",
    cache: str | None = None,
    kd_alpha: float = 0.0,
) -> list[dict]:
    """Fine-tunes each variation with and without the penalty and exports both; one row per
    (variation, fine-tuning, rule). ``kd_alpha > 0``: both fine-tunings also distil from the
    1500-step model (Hinton KD, temperature 2, ``methods.distillation.distill``)."""
    ds = load_dataset("mnist1d", seed=0)
    rows = []
    for init, data in variations:
        base = trained(ds, init, data, cache=cache)
        kd = [distill(None, base, temperature=2.0, alpha=kd_alpha)] if kd_alpha else []
        tag = f" +kd {kd_alpha:g}" if kd_alpha else ""
        for label, transforms in (
            ("control" + tag, kd),
            (f"kurtosis {weight:g}{tag}", [*kd, kurtosis_regularizer(weight)]),
        ):
            rows += finetune_and_export(base, ds, init, data, label, transforms, rules, steps, learning_rate, schedule)
    return rows


def finetune_and_export(
    base, ds, init: int, data: int, label: str, transforms, rules, steps: int, learning_rate: float, schedule: str
) -> list[dict]:
    """Fine-tunes ``base`` with ``transforms`` (batch order ``data``) and exports the result once per
    range rule; one printed row per rule (test accuracy, agreements, median error, seconds)."""
    t = time.time()
    model, _ = finetune(
        base,
        ds,
        workdir=tempfile.mkdtemp(),
        steps=steps,
        learning_rate=learning_rate,
        schedule=schedule,
        seed=data,
        progress=False,
        checkpoint_every=0,
        eval_every=0,
        log_every=0,
        loss_transforms=transforms,
    )
    return export_rows(model, ds, init, data, label, rules, time.time() - t)


def export_rows(model, ds, init: int, data: int, label: str, rules, seconds: float) -> list[dict]:
    """Exports ``model`` (put in eval mode) once per range rule; one printed row per rule (test
    accuracy, agreements, median error, ``seconds`` of fine-tuning)."""
    model.eval()
    ref = np.asarray(nnx.jit(lambda m, x: m(x))(model, ds.x_test))
    acc = float(np.mean(ref.argmax(-1) == ds.y_test))
    rows = []
    for rule in rules:
        row = {"init": init, "data": data, "finetune": label, "test_acc": acc, "rule": rule}
        rows.append({**row, **export_int8(model, ds, ref, rule), "finetune_s": seconds})
        print(_line(rows[-1]), flush=True)
    return rows


HEADER = (
    "| (i,d) | fine-tune | test acc | rule | tflite_int8 | onnx_int8 | median max-logit err | fine-tune s |"
    " test flips | margins < 0.5 |"
)


def _line(r: dict) -> str:
    return (
        f"| ({r['init']},{r['data']}) | {r['finetune']} | {r['test_acc']:.3f} | {r['rule']} | "
        f"{r['tflite_int8']:.4f} | {r['onnx_int8']:.4f} | {r['median_max_logit_err']:.3f} | {r['finetune_s']:.0f} | "
        f"{r['test_flips']} | {r['near_ties']} |"
    )


def experiment_parser(doc: str) -> argparse.ArgumentParser:
    """The options every int8_seq fine-tuning experiment takes: variations, range rules, the
    fine-tuning schedule and the model cache (``doc``: the experiment's module docstring)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--variations", nargs="+", default=[f"{i},{d}" for i, d in VARIATIONS], help="init,data pairs")
    p.add_argument("--rules", nargs="+", default=list(RULES))
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--schedule", default="constant", choices=("constant", "cosine"))
    p.add_argument("--cache", default=None, help="directory keeping the 1500-step models")
    return p


def variations_of(args: argparse.Namespace) -> list[tuple[int, int]]:
    """``--variations`` as ``(init, data)`` pairs; prints the table header the rows follow."""
    print(HEADER)
    print("|" + "---|" * 10)
    return [tuple(int(v) for v in s.split(",")) for s in args.variations]


def main(argv=None) -> None:
    """Command line: see the module docstring."""
    p = experiment_parser(__doc__)
    p.add_argument("--weight", type=float, default=0.01)
    p.add_argument("--kd-alpha", type=float, default=0.0, help="> 0: both fine-tunings distil from the 1500-step model")
    a = p.parse_args(argv)
    variations = variations_of(a)
    rows = run(variations, a.rules, a.weight, a.steps, a.learning_rate, a.schedule, a.cache, a.kd_alpha)
    print_means(rows, sorted({r["finetune"] for r in rows}), a.rules)


def print_means(rows: list[dict], labels, rules) -> None:
    """Prints, per fine-tuning label and range rule, the mean and minimum agreement over the
    variations, the mean median error and the mean test accuracy."""
    print("\nmeans over variations:")
    for label in labels:
        for rule in rules:
            sel = [r for r in rows if r["finetune"] == label and r["rule"] == rule]
            print(
                f"  {label:>24} {rule:>10}: tflite {np.mean([r['tflite_int8'] for r in sel]):.4f} "
                f"(min {min(r['tflite_int8'] for r in sel):.4f})  onnx {np.mean([r['onnx_int8'] for r in sel]):.4f} "
                f"(min {min(r['onnx_int8'] for r in sel):.4f})  median err "
                f"{np.mean([r['median_max_logit_err'] for r in sel]):.3f}  test acc "
                f"{np.mean([r['test_acc'] for r in sel]):.4f}"
            )


if __name__ == "__main__":
    main()
