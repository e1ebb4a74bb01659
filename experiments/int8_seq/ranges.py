"""Full-int8 agreement of the attention + GRU zoo model with JAX, per activation-range rule; prints a table.

For each (init seed, data-order seed) variation: the zoo ``attn_gru`` trained on MNIST-1D exactly as
the slow test trains it (1500 Adam steps, batch 128), then ``research.export.export`` to TFLite and
ONNX ``int8`` (calibrated on the first 256 training inputs, compared on the test split + the sample
+ a batch of one: 1009 inputs) once per ``activation_calibration`` rule. Columns: top-1
agreement of the TFLite file and of the ONNX file (as onnxruntime runs it), and the median over
test inputs of the largest absolute logit difference of the TFLite file.

Run from the repository root:
  python -m experiments.int8_seq.ranges                         # five variations, three rules
  python -m experiments.int8_seq.ranges --variations 0,0 --rules minmax percentile

Measured figures are in the gru8b report (/work/notes/gru8b-report.md) and in
``research/export/tflite_ranges.py``'s docstring.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import numpy as np
from flax import nnx

from research.data import load_dataset
from research.export import export
from research.export import tflite
from research.nn import build_model
from research.train import train_scan

VARIATIONS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2))
RULES = ("minmax", "percentile", "mse")


def export_int8(model, ds, ref: np.ndarray, rule: str) -> dict:
    """Exports ``model`` to TFLite and ONNX ``int8`` with activation rule ``rule`` (calibrated on the
    first 256 training inputs, compared on the test split + sample + a batch of one); returns both
    files' top-1 agreement, the TFLite file's median max-logit error against ``ref`` (the
    model's test-split logits), its top-1 flips on the test split and the number of test inputs
    whose float top-1 margin is below 0.5 (the near-ties a small error can flip)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = export(
            model,
            ds.x_test[:8],
            formats=("tflite", "onnx"),
            out_dir=tempfile.mkdtemp(),
            quantize="int8",
            calibration=ds.x_train[:256],
            eval_data=ds.x_test,
            activation_calibration=rule,
            latency_repeats=1,
        )
    y = tflite.TFLiteRunner(rep["tflite_int8"].path)(ds.x_test)
    top2 = np.sort(ref, -1)[:, -2:]
    return {
        "tflite_int8": rep["tflite_int8"].top1_agreement,
        "onnx_int8": rep["onnx_int8"].top1_agreement,
        "median_max_logit_err": float(np.median(np.abs(y - ref).max(-1))),
        "test_flips": int(np.sum(y.argmax(-1) != ref.argmax(-1))),
        "near_ties": int(np.sum(top2[:, 1] - top2[:, 0] < 0.5)),
    }


def run(variations=VARIATIONS, rules=RULES, steps=1500) -> list[dict]:
    """Trains each variation once and exports it with every rule; returns one row per (variation, rule)."""
    ds = load_dataset("mnist1d", seed=0)
    rows = []
    for init, data in variations:
        model = build_model(
            "attn_gru", input_shape=ds.x_train.shape[1:], num_classes=ds.num_classes, rngs=nnx.Rngs(init)
        )
        train_scan(model, ds.x_train, ds.y_train, steps=steps, batch_size=128, seed=data)
        model.eval()
        ref = np.asarray(nnx.jit(lambda m, x: m(x))(model, ds.x_test))
        acc = float(np.mean(ref.argmax(-1) == ds.y_test))
        for rule in rules:
            t = time.time()
            rows.append(
                {"init": init, "data": data, "test_acc": acc, "rule": rule, **export_int8(model, ds, ref, rule)}
            )
            rows[-1]["seconds"] = time.time() - t
            print(_line(rows[-1]), flush=True)
    return rows


def _line(r: dict) -> str:
    return (
        f"| ({r['init']},{r['data']}) | {r['test_acc']:.3f} | {r['rule']} | {r['tflite_int8']:.4f} | "
        f"{r['onnx_int8']:.4f} | {r['median_max_logit_err']:.3f} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variations", nargs="*", default=None, help="init,data pairs, e.g. 0,0 1,1")
    p.add_argument("--rules", nargs="*", default=list(RULES))
    p.add_argument("--steps", type=int, default=1500)
    a = p.parse_args()
    variations = VARIATIONS if not a.variations else [tuple(int(v) for v in s.split(",")) for s in a.variations]
    print("| (init,data) | test acc | activation_calibration | tflite_int8 | onnx_int8 | median max-logit err |")
    print("|---|---|---|---|---|---|")
    rows = run(variations, a.rules, a.steps)
    print("\nmean over variations:")
    for rule in a.rules:
        sel = [r for r in rows if r["rule"] == rule]
        print(
            f"  {rule:10s} tflite {np.mean([r['tflite_int8'] for r in sel]):.4f} (min {min(r['tflite_int8'] for r in sel):.4f})"
            f"  onnx {np.mean([r['onnx_int8'] for r in sel]):.4f} (min {min(r['onnx_int8'] for r in sel):.4f})"
        )


if __name__ == "__main__":
    main()
