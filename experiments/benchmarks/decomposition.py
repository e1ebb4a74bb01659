"""Dense vs factorized latency, per layer across ranks and per whole model, measured side by side.

Run:
  python -m experiments.benchmarks.decomposition [--batch 32] [--repeats 30] [--quick]
      [--accuracy mnist5k]

For every conv layer of VGG-small and ResNet-20 (32x32x3 inputs) and every linear layer of
LeNet-300-100, the dense layer and its factorized twin (Tucker-2 and CP for convolutions, SVD for
linear layers) at several ranks are jitted, warmed up and timed alternately (median of
``--repeats``) on the current backend, so each ratio comes from one run under the same load.
The per-layer table shows where the crossover lies (speedup > 1 means the factorized form is
faster). The whole-model table compares the dense model with (a) everything factorized at a
budget and (b) ``factorize``'s measured fallback, which keeps slower layers dense.
Weights are random: latency does not depend on their values. ``--accuracy DATASET`` adds the
accuracy-after-fine-tuning table of experiments/kim2016 (trained weights) to the same run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from methods.decomposition import CPConv
from methods.decomposition import DecompositionRule
from methods.decomposition import LowRankLinear
from methods.decomposition import Tucker2Conv
from methods.decomposition import compare_latency
from methods.decomposition import dense_cost
from methods.decomposition import factorize_with_report
from methods.decomposition import factorized_cost
from methods.decomposition.surgery import capture_shapes
from research.nn import build_model
from research.nn import find_modules

CONV_FRACTIONS = (0.125, 0.25, 0.5, 1.0)  # Tucker-2 ranks as a fraction of (cin, cout)
CP_FRACTIONS = (0.25, 0.5, 1.0)  # CP rank as a fraction of min(cin, cout) ... times 2 at most
SVD_FRACTIONS = (0.05, 0.1, 0.25, 0.5)


def _layer_rows(name, model, x, args):
    model.eval()
    layers = [
        (p, m)
        for p, m in find_modules(model, (nnx.Conv, nnx.Linear))
        if type(m) in (nnx.Conv, nnx.Linear) and getattr(m, "feature_group_count", 1) == 1
    ]
    shapes = capture_shapes(model, [p for p, _ in layers], x)
    rows = []
    for path, layer in layers:
        in_shape, out_shape = shapes[path]
        xi = jax.random.normal(jax.random.key(0), in_shape)
        kshape = tuple(layer.kernel[...].shape)
        sp = {"in_spatial": in_shape[1:-1], "out_spatial": out_shape[1:-1]}
        _, flops_dense = dense_cost(kshape, **sp)
        variants = []
        if isinstance(layer, nnx.Linear):
            top = min(kshape)
            for r in sorted({max(1, int(round(f * top))) for f in SVD_FRACTIONS}):
                variants.append(("svd", r, lambda r=r, layer=layer: LowRankLinear.from_dense(layer, r)))
        else:
            cin, cout = kshape[-2:]
            if math.prod(kshape[:-2]) == 1 and not args.include_1x1:
                continue
            for f in CONV_FRACTIONS:
                rk = (max(1, int(round(f * cin))), max(1, int(round(f * cout))))
                variants.append(
                    (
                        "tucker2",
                        rk,
                        lambda rk=rk, layer=layer: Tucker2Conv.from_dense(layer, rk, n_iter_max=5),
                    )
                )
            for f in CP_FRACTIONS:
                r = max(1, int(round(f * min(cin, cout))))
                variants.append(("cp", r, lambda r=r, layer=layer: CPConv.from_dense(layer, r, n_iter_max=5)))
        for method, rank, make in variants:
            fact = make()
            fact.eval()
            d, f = compare_latency(layer, fact, xi, warmup=3, repeats=args.repeats)
            _, flops_f = factorized_cost(method, kshape, rank, **sp)
            rows.append(
                (
                    name,
                    path,
                    method,
                    str(rank),
                    flops_dense / max(flops_f, 1),
                    1e3 * d,
                    1e3 * f,
                    d / f,
                )
            )
            print(".", end="", file=sys.stderr, flush=True)
    return rows


def _model_rows(name, model, x, args):
    model.eval()
    convs = "conv" if name != "lenet300" else "layers"
    budgets = [
        ("tucker2 vbmf", [DecompositionRule(pattern=convs, vbmf=True, keep_if_slower=True)]),
        (
            "tucker2 25% params",
            [DecompositionRule(pattern=convs, param_ratio=0.25, keep_if_slower=True)],
        ),
        (
            "cp 25% params",
            [DecompositionRule(pattern=convs, method="cp", param_ratio=0.25, keep_if_slower=True)],
        ),
        ("tucker2 25% + fallback", [DecompositionRule(pattern=convs, param_ratio=0.25)]),
    ]
    if name == "lenet300":
        budgets = [
            (
                "svd 10% params",
                [DecompositionRule(pattern=convs, param_ratio=0.1, keep_if_slower=True)],
            ),
            (
                "svd 25% params",
                [DecompositionRule(pattern=convs, param_ratio=0.25, keep_if_slower=True)],
            ),
            ("svd 25% + fallback", [DecompositionRule(pattern=convs, param_ratio=0.25)]),
        ]
    rows = []
    for label, rules in budgets:
        if args.quick and "fallback" not in label and "vbmf" not in label and "svd 25%" not in label:
            continue
        if name != "lenet300":  # the head and the 3-channel stem are too small to factorize usefully
            rules = [DecompositionRule(pattern=r"head|convs/0$|^stem_conv", skip=True), *rules]
        fact, rep = factorize_with_report(
            model, rules, sample_input=x, check_speed="fallback" in label, repeats=args.repeats
        )
        fact.eval()
        d, f = compare_latency(model, fact, x, warmup=3, repeats=args.repeats)
        fb, fa = rep.flops()
        rows.append(
            (
                name,
                label,
                len(rep.factorized),
                len(rep.kept_dense),
                rep.params_before / rep.params_after,
                fb / max(fa, 1),
                1e3 * d,
                1e3 * f,
                d / f,
            )
        )
        print("+", end="", file=sys.stderr, flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="fewer models and budgets")
    ap.add_argument("--include-1x1", action="store_true", help="also time 1x1 convolutions")
    ap.add_argument(
        "--accuracy",
        default="",
        help="also run experiments/kim2016 on this data set (digits or mnist5k): accuracy after "
        "a short fine-tune of each factorized net, printed as a table",
    )
    args = ap.parse_args(argv)
    t0 = time.time()
    rngs = nnx.Rngs(0)
    models = {
        "vgg_small": (
            build_model("vgg_small", input_shape=(32, 32, 3), num_classes=10, rngs=rngs),
            (32, 32, 3),
        ),
        "resnet20": (
            build_model("resnet20", input_shape=(32, 32, 3), num_classes=10, rngs=rngs),
            (32, 32, 3),
        ),
        "lenet300": (
            build_model("lenet300", input_shape=(784,), num_classes=10, rngs=rngs),
            (784,),
        ),
    }
    if args.quick:
        models.pop("resnet20")
    layer_rows, model_rows = [], []
    for name, (model, shape) in models.items():
        x = jax.random.normal(jax.random.key(1), (args.batch, *shape), jnp.float32)
        layer_rows += _layer_rows(name, model, x, args)
        model_rows += _model_rows(name, model, x, args)
    print(file=sys.stderr)
    dev = jax.devices()[0]
    print(f"backend={jax.default_backend()} device={dev.device_kind} batch={args.batch} repeats={args.repeats}")
    print("\nPer layer (speedup = dense ms / factorized ms; > 1 means the factorized layer is faster)")
    print(
        f"{'model':<10}{'layer':<20}{'method':<9}{'rank':>10}{'FLOPs x':>9}{'dense ms':>10}{'fact ms':>10}{'speedup':>9}"
    )
    for m, p, meth, r, fx, d, f, s in layer_rows:
        print(f"{m:<10}{p:<20}{meth:<9}{r:>10}{fx:>9.2f}{d:>10.3f}{f:>10.3f}{s:>9.2f}")
    print("\nWhole model (rules skip the head; 'fallback' keeps layers dense that measured slower)")
    print(
        f"{'model':<10}{'variant':<26}{'fact':>5}{'dense':>6}{'params x':>9}{'FLOPs x':>9}{'dense ms':>10}"
        f"{'fact ms':>10}{'speedup':>9}"
    )
    for m, label, nf, nd, px, fx, d, f, s in model_rows:
        print(f"{m:<10}{label:<26}{nf:>5}{nd:>6}{px:>9.2f}{fx:>9.2f}{d:>10.3f}{f:>10.3f}{s:>9.2f}")
    if args.accuracy:
        _accuracy(args.accuracy)
    print(f"\n({time.time() - t0:.0f} s)")


def _accuracy(dataset: str) -> None:
    """Runs ``experiments.kim2016.main.run`` (it prints its own table)."""
    from experiments.kim2016.main import run

    run(dataset)


if __name__ == "__main__":
    main()
