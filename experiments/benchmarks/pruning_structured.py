"""Structured pruning benchmark: params, FLOPs and CPU latency before/after channel removal.

Run:  python -m experiments.benchmarks.pruning_structured [--batch 32] [--repeats 30]

For ResNet-20 and VGG-small (32x32x3 inputs, 10 classes) it removes 0%, 25%, 50% and 75% of
the channels of every coupled group (L1 score), checks that the smaller model computes what the
masked model computes, and prints parameters, XLA FLOPs per example and the median latency of
the jitted forward pass (``block_until_ready``), all measured side by side in one run.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from methods.pruning import apply_masks
from methods.pruning import channel_masks
from methods.pruning import remove_channels
from research.metrics import count_params
from research.metrics import flops
from research.metrics import model_latency
from research.nn import build_model
from research.train import merge_model
from research.train import split_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,vgg_small")
    ap.add_argument("--ratios", default="0,0.25,0.5,0.75")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args(argv)
    x = jax.random.normal(jax.random.key(0), (args.batch, 32, 32, 3))
    rows = []
    for name in args.models.split(","):
        model = build_model(name, input_shape=(32, 32, 3), num_classes=10, rngs=nnx.Rngs(0))
        model.eval()
        base = None
        for ratio in [float(r) for r in args.ratios.split(",")]:
            if ratio == 0:
                small = model
                err = 0.0
            else:
                small, plan = remove_channels(model, x[:4], ratio, return_plan=True)
                defs, p, s = split_model(nnx.clone(model))
                ref = jax.jit(lambda p, s, xx, g=defs.eval: merge_model(g, p, s)(xx))(
                    apply_masks(p, channel_masks(model, plan)), s, x[:4]
                )
                err = float(jnp.max(jnp.abs(ref - small(x[:4]))))
            lat = model_latency(small, x, repeats=args.repeats)["median"] * 1e3
            f = flops(small, x[:1])
            row = {
                "model": name,
                "ratio": ratio,
                "params": count_params(small),
                "flops": f,
                "latency_ms": lat,
                "max_err": err,
            }
            base = base or row
            row["lat_x"] = lat / base["latency_ms"]
            row["flops_x"] = f / base["flops"]
            rows.append(row)
    print(
        f"{'model':<10} {'removed':>7} {'params':>9} {'MFLOPs/ex':>10} {'FLOPs x':>8} {'latency ms':>11} {'lat x':>6} {'max|diff|':>10}"
    )
    for r in rows:
        print(
            f"{r['model']:<10} {r['ratio']:>7.2f} {r['params']:>9,} {r['flops'] / 1e6:>10.2f} {r['flops_x']:>8.2f} "
            f"{r['latency_ms']:>11.2f} {r['lat_x']:>6.2f} {r['max_err']:>10.2e}"
        )
    print(f"(batch {args.batch}, {jax.devices()[0].platform}, median of {args.repeats})")
    return rows


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
