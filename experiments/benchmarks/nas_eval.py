"""Supernet evaluation of K sub-networks as one vmapped program against the same K one by one.

The ``conv1d_family`` supernet of ``experiments/ofa_small`` (MNIST-1D; its weights as
initialised: the timing does not depend on them) evaluates K sampled sub-networks on the
validation split with :func:`methods.nas.evaluate_subnets`: ``vmapped`` is one call with the K
masks stacked, ``one by one`` K calls of the same jitted evaluator with one mask each (K=1
shapes, compiled once). With ``--calibrate`` every sub-network's BatchNorm statistics are first
recalibrated on training batches inside the same program, as Once-for-All does.

Both are compiled before timing; rounds interleave the two (vmapped, then one by one) and the
median of ``--repeats`` rounds is kept. The table gives the largest accuracy difference between
the two (in validation examples): 0 on the CPU; on a GPU, where XLA's default float32 precision
rounds convolutions through TF32 and the vmapped program runs other kernels, a near-tie can
flip (``--precision highest`` shows whether that is the cause). A difference above 1% of the
examples fails the run. Prints one table, with the device it ran on.

Run:
  python -m experiments.benchmarks.nas_eval                      # K in 1 4 16 64, with and without calibration
  python -m experiments.benchmarks.nas_eval --ks 16 --repeats 3 --no-calibrate --precision highest
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from methods import nas
from research import data
from research import nn
from research.report import format_table


def time_eval(net, fam, ds, k: int, *, calibrate: bool, repeats: int, seed: int = 0) -> dict:
    """Median seconds of K sub-networks evaluated vmapped and one by one, and the largest
    accuracy difference between the two."""
    rng = np.random.default_rng(seed)
    options = [fam.sample(rng) for _ in range(k)]
    calib_x = nas.calibration_batches(ds.x_train, 4, 128, seed=seed) if calibrate else None
    vm = nas.make_evaluator(net, calibrate=calibrate)
    one = nas.make_evaluator(net, calibrate=calibrate)
    stacked = nas.stack_masks(net, options)
    singles = [nas.stack_masks(net, [o]) for o in options]

    def run_vmapped():
        acc, _ = nas.evaluate_subnets(net, stacked, ds.x_val, ds.y_val, calib_x=calib_x, evaluator=vm)
        return acc

    def run_one_by_one():
        return np.concatenate(
            [nas.evaluate_subnets(net, m, ds.x_val, ds.y_val, calib_x=calib_x, evaluator=one)[0] for m in singles]
        )

    acc_vm, acc_one = run_vmapped(), run_one_by_one()  # compiles both
    t_vm, t_one = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        run_vmapped()
        t_vm.append(time.perf_counter() - t)
        t = time.perf_counter()
        run_one_by_one()
        t_one.append(time.perf_counter() - t)
    return {
        "vmapped_s": statistics.median(t_vm),
        "one_by_one_s": statistics.median(t_one),
        "max_acc_diff": float(np.max(np.abs(acc_vm - acc_one))),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--repeats", type=int, default=5, help="rounds per figure (the median is kept)")
    parser.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recalibrate BatchNorm per sub-network (default: both, without and with)",
    )
    parser.add_argument(
        "--precision",
        choices=("default", "high", "highest"),
        default="default",
        help="jax_default_matmul_precision for the run (GPU: 'highest' turns TF32 off)",
    )
    args = parser.parse_args(argv)
    if args.precision != "default":
        jax.config.update("jax_default_matmul_precision", args.precision)
    if min(args.ks) < 1 or args.repeats < 1:
        parser.error(f"--ks {args.ks} and --repeats {args.repeats} must be at least 1")
    modes = (False, True) if args.calibrate is None else (args.calibrate,)

    ds = data.load_dataset("mnist1d", seed=0)
    fam = nn.get_family("conv1d_family")
    net = nas.split_supernet(
        nas.build_supernet(fam, ds.input_shape, ds.num_classes, seed=0), fam, ds.input_shape, ds.num_classes
    )
    dev = jax.devices()[0]
    rows = []
    for calibrate in modes:
        for k in args.ks:
            r = time_eval(net, fam, ds, k, calibrate=calibrate, repeats=args.repeats)
            differ = round(r["max_acc_diff"] * len(ds.x_val))
            if differ > 0.01 * len(ds.x_val):
                raise SystemExit(
                    f"K={k}: vmapped and one-by-one accuracies differ by {differ} of {len(ds.x_val)} examples"
                )
            rows.append(
                {
                    "K": k,
                    "BN recalibrated": "yes" if calibrate else "no",
                    "vmapped ms": f"{r['vmapped_s'] * 1e3:.1f}",
                    "one by one ms": f"{r['one_by_one_s'] * 1e3:.1f}",
                    "one by one / vmapped": f"{r['one_by_one_s'] / r['vmapped_s']:.2f}",
                    "largest difference (examples)": differ,
                }
            )
            print(f"  {rows[-1]}", flush=True)
    print(
        f"\nconv1d_family supernet on MNIST-1D validation ({len(ds.x_val)} examples), "
        f"{dev.platform} {dev.device_kind}, jax {jax.__version__}, precision {args.precision}, median of {args.repeats}:"
    )
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
