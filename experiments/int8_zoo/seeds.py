"""Int8 top-1 agreement of one zoo model trained as the export zoo test trains it, per data-order seed.

``tests/trained_models.py`` trains each hand-designed zoo model on digits (``train_scan``, init
seed 0, batch 128, lr 1e-2) once and stores the weights, and
``tests/research/export/test_export_zoo.py`` asserts that their full-int8 files agree with JAX on
>= 0.99 of 368 inputs (the test split + a sample of 8 + a batch of one): three flips at most.
Whether a trained model clears that depends on its near-ties, i.e. on the exact weights, which
change with the data order and with the CPU (XLA generates other code for AVX2 than for AVX-512,
so the same seed trains other weights). This script trains one model per seed and prints one JSON
line each: test accuracy, test inputs whose top-2 logit margin is below 0.5, and the agreement of
the TFLite ``int8`` file (LiteRT), its ONNX conversion and the symmetric Q/DQ file (both executed
as written by onnxruntime with graph optimisations off), i.e. what the zoo test asserts.

Run from the repository root with one XLA thread, as the tests do:
  NPROC=1 python -m experiments.int8_zoo.seeds resnet56 --seeds 0 1 2 3 --options '{"width": 8}'
  NPROC=1 python -m experiments.int8_zoo.seeds resnet56 --seeds 0 --rule percentile
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings

import jax
import numpy as np
from flax import nnx

from research.data import load_dataset
from research.export import export
from research.nn import TINY_OPTIONS
from research.nn import build_model
from research.train import train_scan


def measure(ds, name: str, seed: int, *, steps: int, batch_size: int, rule: str, options: dict) -> dict:
    """Trains ``name`` on ``ds`` (digits; data order ``seed``) and exports it to int8 TFLite/ONNX and
    symmetric Q/DQ."""
    flat = name == "cnn1d"  # a 1-D model: digits as length-64 signals, as the zoo test feeds them
    x_train = ds.x_train.reshape(len(ds.x_train), -1) if flat else ds.x_train
    x_test = ds.x_test.reshape(len(ds.x_test), -1) if flat else ds.x_test
    t = time.perf_counter()
    model = build_model(
        name,
        input_shape=x_train.shape[1:],
        num_classes=ds.num_classes,
        rngs=nnx.Rngs(0),
        **{**TINY_OPTIONS.get(name, {}), **options},
    )
    train_scan(model, x_train, ds.y_train, steps=steps, batch_size=batch_size, seed=seed)
    jax.block_until_ready(nnx.state(model))  # train_scan returns before its program has run
    train_s = time.perf_counter() - t
    ref = np.asarray(model(x_test))
    top2 = np.sort(ref, -1)[:, -2:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = export(
            model,
            x_test[:8],
            formats=("tflite", "onnx"),
            out_dir=tempfile.mkdtemp(),
            quantize=("int8", "int8_qdq_symmetric"),
            calibration=x_train[:256],
            eval_data=x_test,
            latency_repeats=1,
            activation_calibration=rule,
        )
    return {
        "model": name,
        "options": options,
        "seed": seed,
        "rule": rule,
        "test_acc": round(float(np.mean(ref.argmax(-1) == ds.y_test)), 4),
        "margins_below_0.5": int(np.sum(top2[:, 1] - top2[:, 0] < 0.5)),
        "tflite_int8": round(rep["tflite_int8"].top1_agreement, 4),
        "onnx_int8": round(rep["onnx_int8"].reference.top1_agreement, 4),
        "onnx_int8_qdq_symmetric": round(rep["onnx_int8_qdq_symmetric"].reference.top1_agreement, 4),
        "inputs": rep.num_checked,
        "train_s": round(train_s, 1),
    }


def main(argv=None) -> None:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a zoo model name, e.g. resnet56")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3], help="data-order seeds")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rule", default="minmax", help="activation_calibration of the int8 TFLite file")
    p.add_argument("--options", default="{}", help="JSON model options over the zoo's TINY_OPTIONS")
    a = p.parse_args(argv)
    options = json.loads(a.options)
    ds = load_dataset("digits", seed=0)
    for seed in a.seeds:
        row = measure(ds, a.model, seed, steps=a.steps, batch_size=a.batch_size, rule=a.rule, options=options)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
