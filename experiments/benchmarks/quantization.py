"""QAT train-step time against the float step, and PTQ calibration time.

For each model, three jitted slimjax train steps (same batch, same optimizer) are timed
interleaved (float, QAT-STE, QAT-LSQ, float, ...) so machine noise hits all alike; QAT models
are 8-bit (STE) and 4-bit (LSQ), all layers, weights per channel, inputs per tensor. Also times
PTQ: BatchNorm folding plus min-max calibration on 512 images (batches of 128), first call
(includes compilation). Target: QAT step <= 1.5x the float step.

Run:
  python -m experiments.benchmarks.quantization                      # lenet5 + resnet20, CPU
  python -m experiments.benchmarks.quantization --models resnet20 --batch 256 --repeats 100
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
import optax
from flax import nnx

from methods.quantization import QuantRule
from methods.quantization import calibrate
from methods.quantization import fold_batchnorm
from methods.quantization import quantize_model
from research.nn import build_model
from research.train import create_train_state
from research.train import make_train_step


def _step_fn(model):
    tx = optax.adam(1e-4)
    defs, state = create_train_state(model, tx)
    return make_train_step(defs, tx, donate=False), state


def bench(name: str, shape, batch: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (batch, *shape)).astype(np.float32)
    data = {"x": x, "y": rng.integers(0, 10, batch).astype(np.int32)}
    model = build_model(name, input_shape=shape, num_classes=10, rngs=nnx.Rngs(0))
    calib = [rng.uniform(0, 1, (128, *shape)).astype(np.float32) for _ in range(4)]
    t0 = time.perf_counter()
    folded = fold_batchnorm(model, x[:2])
    q8 = calibrate(quantize_model(folded, [QuantRule(bits=8)]), calib)
    ptq_s = time.perf_counter() - t0
    q4 = calibrate(quantize_model(folded, [QuantRule(bits=4, method="lsq")]), calib)
    variants = {"float": model, "qat_ste8": q8, "qat_lsq4": q4}
    steps = {k: _step_fn(m) for k, m in variants.items()}
    compile_s = {}
    for k, (fn, st) in steps.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(st, data))
        compile_s[k] = time.perf_counter() - t0
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for k, (fn, st) in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(st, data))
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": name,
        "float_ms": 1e3 * med["float"],
        "qat_ste8_ms": 1e3 * med["qat_ste8"],
        "qat_lsq4_ms": 1e3 * med["qat_lsq4"],
        "ste8_ratio": med["qat_ste8"] / med["float"],
        "lsq4_ratio": med["qat_lsq4"] / med["float"],
        "ptq_s": ptq_s,
        "compile_float_s": compile_s["float"],
        "compile_lsq4_s": compile_s["qat_lsq4"],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["lenet5", "resnet20"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--size", type=int, default=28, help="image height/width")
    args = p.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind}, batch {args.batch}, median of {args.repeats} steps")
    rows = [bench(m, (args.size, args.size, 1), args.batch, args.repeats) for m in args.models]
    cols = list(rows[0])
    print("  ".join(f"{c:>15}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>15.3f}" if isinstance(r[c], float) else f"{r[c]:>15}" for c in cols))


if __name__ == "__main__":
    main()
