"""Training steps per second of ``research.train.fit`` with one jitted call per step against
blocks of steps scanned in one call (``fit(block_steps=N)``, what ``finetune`` does on a GPU/TPU).

Each model trains ``--steps`` steps of batch ``--batch-size`` on digits from the same initial
state, once per block size, rounds alternating the order; compilation is excluded (a warm-up fit
first), the fastest of ``--repeats`` rounds is kept, and the final weights of each block size are
compared with one call per step (largest absolute difference). Prints one table with the device.

Run:
  python -m experiments.benchmarks.fit_blocks
  python -m experiments.benchmarks.fit_blocks --models mlp lenet300 lenet5 --blocks 1 10 50 --steps 1000
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
from research.report import format_table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "lenet300", "lenet5"])
    parser.add_argument("--blocks", nargs="+", type=int, default=[1, 10, 50])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if 1 not in args.blocks:
        parser.error(f"--blocks {args.blocks} must include 1 (the reference)")
    ds = data.load_dataset("digits", seed=0)
    rows = []
    for name in args.models:
        model = nn.build_model(name, input_shape=ds.input_shape, num_classes=ds.num_classes, rngs=nnx.Rngs(0))
        defs, state0 = train.create_train_state(model, optax.adam(1e-3))
        step = train.make_train_step(defs, optax.adam(1e-3), donate=False)
        sampler = data.BatchSampler(ds.x_train, ds.y_train, batch_size=args.batch_size, seed=0)

        def run(block, steps, state0=state0, step=step, sampler=sampler):
            t = time.perf_counter()
            state, _ = train.fit(
                state0, step, sampler, num_steps=steps, log_every=50, progress=False, block_steps=block
            )
            jax.block_until_ready(state.params)
            return time.perf_counter() - t, state

        for block in args.blocks:
            run(block, min(args.steps, 2 * max(block, 50)))  # compiles this block size (and the last block's)
        best = {b: float("inf") for b in args.blocks}
        final = {}
        for r in range(args.repeats):
            for block in args.blocks if r % 2 == 0 else args.blocks[::-1]:
                seconds, final[block] = run(block, args.steps)
                best[block] = min(best[block], seconds)
        ref = jax.tree.leaves(final[1].params)
        for block in args.blocks:
            diff = max(
                float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(ref, jax.tree.leaves(final[block].params), strict=True)
            )
            rows.append(
                {
                    "model": name,
                    "block steps": block,
                    "steps/s": f"{args.steps / best[block]:.0f}",
                    "x one call per step": f"{best[1] / best[block]:.2f}",
                    "max |weight diff|": f"{diff:.1e}",
                }
            )
            print(f"  {rows[-1]}", flush=True)
    dev = jax.devices()[0]
    print(
        f"\ndigits, {args.steps} steps of batch {args.batch_size}, fastest of {args.repeats}; {dev.platform} {dev.device_kind}, jax {jax.__version__}:"
    )
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
