"""What building a model as one compiled program buys: a zoo model's initialization op by op (its
constructor called directly: one XLA program per initializer and shape) against
:func:`research.nn.build_model` (:func:`research.nn.registry.initialize`: the constructor traced
once under ``jax.jit``), each in a fresh Python process, as a ``slimjax run`` pays it.

For each model, ``--rounds`` pairs of fresh processes (the order alternating from round to round;
the fastest of each kept) build it for its usual input shape with ``nnx.Rngs(0)``; the table gives
both times, their ratio, and whether the weights are bit-identical (the largest difference when not).

Usage:
  python -m experiments.benchmarks.model_init                  # ~2 minutes on a 2-core CPU
  python -m experiments.benchmarks.model_init --models lenet5 resnet20 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from experiments.benchmarks.fresh import fresh_seconds
from experiments.benchmarks.fresh import seconds_line

#: zoo model -> input shape (no batch dimension)
SHAPES = {
    "mlp": (64,),
    "lenet300": (784,),
    "lenet5": (8, 8, 1),
    "cnn1d": (64, 1),
    "resnet20": (32, 32, 3),
    "vgg_small": (32, 32, 3),
    "mobilenetv2": (32, 32, 3),
    "vit": (32, 32, 3),
    "attn_gru": (16, 8),
}


def _build(name: str, how: str, out: str) -> None:
    """In this (fresh) process: build ``name`` ``how`` ("op-by-op" or "one-program"), print the
    seconds, save the weights to ``out``."""
    import time

    import jax
    import numpy as np
    from flax import nnx

    from research.nn import build_model
    from research.nn.registry import get_model_fn

    shape = SHAPES[name]
    t0 = time.perf_counter()
    if how == "op-by-op":
        model = get_model_fn(name)(shape, 10, rngs=nnx.Rngs(0))
    else:
        model = build_model(name, input_shape=shape, num_classes=10, rngs=nnx.Rngs(0))
    jax.block_until_ready(nnx.state(model))
    seconds = time.perf_counter() - t0
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    np.save(out, np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in leaves]))
    print(seconds_line(seconds))


def _fresh(name: str, how: str, out: str) -> float:
    return fresh_seconds("experiments.benchmarks.model_init", "--one", name, how, out, what=f"building {name} {how}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=2, help="fresh-process pairs per model (fastest kept)")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "HOW", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        _build(*args.one)
        return 0
    import numpy as np

    print(f"fresh processes, fastest of {args.rounds}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    header = f"{'model':<12} {'op by op s':>10} {'one program s':>13} {'ratio':>6}  weights"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            times: dict[str, list[float]] = {"op-by-op": [], "one-program": []}
            for r in range(args.rounds):
                for how in ("op-by-op", "one-program") if r % 2 == 0 else ("one-program", "op-by-op"):
                    times[how].append(_fresh(name, how, os.path.join(tmp, f"{name}-{how}.npy")))
            a, b = (
                np.load(os.path.join(tmp, f"{name}-{how}.npy"), allow_pickle=False)
                for how in ("op-by-op", "one-program")
            )
            same = "bit-identical" if np.array_equal(a, b) else f"max |diff| {np.max(np.abs(a - b)):.2g}"
            slow, fast = min(times["op-by-op"]), min(times["one-program"])
            print(f"{name:<12} {slow:>10.2f} {fast:>13.2f} {slow / fast:>5.2f}x  {same}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
