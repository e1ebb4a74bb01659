"""What :func:`research.train.scan_steps` buys: training steps as one ``lax.scan`` against one
compiled step per call, side by side in one process, per model.

XLA's CPU backend runs a convolution's gradient far slower inside a loop body than outside one
(jax-ml/jax#12868): outside, it rewrites the gradient's convolutions into the dimension order its
fast kernels take; inside a ``while`` body it does not. ``scan_steps`` therefore runs a step that
has convolutions as a Python loop over one jitted step on a CPU, and as one ``lax.scan`` elsewhere.

For each model, the same ``--steps`` training steps (Adam, digits or MNIST-1D batches, the
project's :func:`research.train.make_train_step`) run both ways (``mode="scan"`` and
``mode="loop"``); each figure is the fastest of ``--repeats`` timed calls after one untimed call
that compiles. ``auto`` is the mode ``scan_steps`` picks here. The MLP has no convolution: its
rows show what the loop costs where the scan is not slowed down.

A run's table is kept in ``experiments/benchmarks/results/conv_in_loop.txt``.

Usage:
  python -m experiments.benchmarks.conv_in_loop            # ~1 minute on a 2-core CPU
  python -m experiments.benchmarks.conv_in_loop --steps 50 --repeats 5
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax
from flax import nnx

from research import data
from research import nn
from research import train

#: (zoo model, data set, options) benchmarked by default.
MODELS = (
    ("mlp", "digits", {}),
    ("lenet5", "digits", {}),
    ("resnet20", "digits", {}),
    ("cnn1d", "mnist1d", {}),
)


def _time(loop, state, batches, repeats: int) -> tuple[float, float]:
    """(first call seconds, fastest of ``repeats`` later calls)."""
    t0 = time.perf_counter()
    jax.block_until_ready(loop(state, batches))
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(state, batches))
        best = min(best, time.perf_counter() - t0)
    return first, best


def run(steps: int, batch_size: int, repeats: int, models=MODELS) -> list[dict]:
    rows = []
    for name, dataset, options in models:
        ds = data.load_dataset(dataset, seed=0)
        model = nn.build_model(
            name, input_shape=ds.input_shape, num_classes=ds.num_classes, rngs=nnx.Rngs(0), **options
        )
        tx = optax.adam(1e-3)
        defs, state = train.create_train_state(model, tx, seed=0)
        step = train.make_train_step(defs, tx, jit=False)
        idx = np.random.default_rng(0).integers(0, len(ds.x_train), size=(steps, batch_size))
        batches = {"x": ds.x_train[idx], "y": ds.y_train[idx]}
        row = {
            "model": name,
            "data": dataset,
            "conv": train.has_convolution(step, state, jax.tree.map(lambda a: a[0], batches)),
        }
        for mode in ("scan", "loop"):
            row[mode] = _time(train.scan_steps(step, mode=mode), state, batches, repeats)
        auto = train.scan_steps(step)
        auto(state, jax.tree.map(lambda a: a[:1], batches))
        row["auto"] = auto.mode
        rows.append(row)
    return rows


def table(rows: list[dict], steps: int, batch_size: int) -> str:
    lines = [
        f"{steps} training steps of batch {batch_size}, JAX {jax.__version__} on {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}); seconds, fastest of the repeats after a compiling call",
        f"{'model':<10} {'data':<8} {'conv':<5} {'scan 1st':>9} {'loop 1st':>9} {'scan s':>8} {'loop s':>8} "
        f"{'scan/loop':>9}  auto",
    ]
    for r in rows:
        (scan_first, scan), (loop_first, loop) = r["scan"], r["loop"]
        lines.append(
            f"{r['model']:<10} {r['data']:<8} {'yes' if r['conv'] else 'no':<5} {scan_first:9.2f} {loop_first:9.2f} {scan:8.3f} {loop:8.3f} "
            f"{scan / loop:8.1f}x  {r['auto']}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(table(run(args.steps, args.batch_size, args.repeats), args.steps, args.batch_size))


if __name__ == "__main__":
    main()
