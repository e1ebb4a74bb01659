"""What keeping the decompose speed check's timings buys: ``factorize_with_report(check_speed=True)``
called repeatedly on one model's layers (as the trials of a sweep do), with the layer timings kept
for the process (:func:`methods.decomposition.layer_latencies`, the default) against timed anew
every call (:func:`methods.decomposition.clear_latency_cache` before each), alternating, in one
process.

For each rank, ``--calls`` factorizations per mode after one untimed call of each (compiling the
forward passes): the median seconds per call and the distinct keep/drop decisions the calls made
(timed anew, a layer whose factorized form is about as fast as the dense one can come out dense in
one call and factorized in the next).

Usage:
  python -m experiments.benchmarks.factorize_timings                 # ~1 minute on a 2-core CPU
  python -m experiments.benchmarks.factorize_timings --model lenet5 --ranks 2 4 --calls 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

#: zoo model -> input shape (no batch dimension)
SHAPES = {"lenet300": (64,), "mlp": (64,), "lenet5": (8, 8, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="lenet300", choices=list(SHAPES))
    parser.add_argument("--ranks", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--calls", type=int, default=6, help="timed factorizations per rank and mode")
    parser.add_argument("--batch", type=int, default=64, help="rows of the sample input")
    args = parser.parse_args(argv)

    import jax.numpy as jnp
    from flax import nnx

    from methods.decomposition import DecompositionRule
    from methods.decomposition import clear_latency_cache
    from methods.decomposition import factorize_with_report
    from methods.decomposition import speed
    from research.nn import build_model

    shape = SHAPES[args.model]
    model = build_model(args.model, input_shape=shape, num_classes=10, rngs=nnx.Rngs(0))
    x = jnp.ones((args.batch, *shape))
    print(f"{args.model}, input {tuple(x.shape)}, {args.calls} calls per rank and mode, alternating")
    header = f"{'rank':>4} {'mode':<12} {'median s':>9}  decisions (distinct, per layer)"
    print(header)
    print("-" * len(header))
    kept: dict = {}  # the "kept" mode's timings, put back before each of its calls (the other mode clears them)
    for rank in args.ranks:
        rules = [DecompositionRule(pattern=".*", rank=rank)]

        def call(mode: str, rules=rules):
            clear_latency_cache()
            if mode == "kept":
                speed._LAYER_LATENCIES.update(kept)  # pylint: disable=protected-access
            t0 = time.perf_counter()
            _, report = factorize_with_report(model, rules, sample_input=x, check_speed=True)
            seconds = time.perf_counter() - t0
            if mode == "kept":
                kept.update(speed._LAYER_LATENCIES)  # pylint: disable=protected-access
            return seconds, tuple(r.decision for r in report.layers)

        call("kept")  # compiles the forward passes and times this rank's layers once for "kept"
        seconds = {"kept": [], "timed anew": []}
        decisions = {"kept": set(), "timed anew": set()}
        for i in range(args.calls):
            for mode in ("kept", "timed anew") if i % 2 == 0 else ("timed anew", "kept"):
                s, d = call(mode)
                seconds[mode].append(s)
                decisions[mode].add(d)
        for mode in ("timed anew", "kept"):
            shown = "; ".join(",".join(d) for d in sorted(decisions[mode]))
            print(f"{rank:>4} {mode:<12} {statistics.median(seconds[mode]):>9.3f}  {shown}", flush=True)
    clear_latency_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
