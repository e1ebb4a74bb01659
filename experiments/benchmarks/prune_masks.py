"""What recomputing a pruning mask costs: the selection of the k smallest scores, before and now.

A mask update keeps the ``size - k`` highest scores of a leaf, ties taken by position (an exact
count however many weights are already zero). Until session 25 ``mask_from_scores`` ranked every
entry with two stable ``argsort`` s; on a CPU, XLA sorts with a comparator, and two sorts of
LeNet-300-100's 784x300 kernel took about 115 ms: a gradual-pruning step that updates its masks
cost ~100x a training step. :func:`methods.pruning.masks.smallest_k` selects instead on a CPU (a
32-pass bisection over the scores' order-preserving integer keys, then the ties by position) and
sorts once elsewhere; every path takes the same entries (``tests/methods/pruning/test_masks.py``).

Four tables, each timed interleaved in one process (medians):

1. one leaf: the former double ``argsort``, one ``argsort`` + scatter (the non-CPU path), the
   bisection (the CPU path; timed on every platform, to see whether it would pay there too),
   ``smallest_k`` (this platform's path), and ``jax.lax.top_k`` with ``k`` fixed at trace time
   (the usual alternative; no exact tie order), with the entries checked equal;
2. an N:M mask of a kernel: two argsorts per group of ``m`` (before) against
   :func:`methods.pruning.masks.ranks_in_groups` (counting each entry's smaller and earlier equal
   group members: the same ranks);
3. the masked train step (:func:`methods.pruning.masked`, polynomial schedule) of a zoo model at
   mask updates every step and every 5 steps, with the former and the new selection;
4. one LeNet-300-100 pipeline run (train 300 steps -> prune to 90% with 100 fine-tuning steps,
   the ``experiments/population_lr_wd`` trial) with each selection, compiled steps excluded.

Run:
  python -m experiments.benchmarks.prune_masks
  python -m experiments.benchmarks.prune_masks --sizes 235200 4194304 --models lenet300 resnet20 --no-pipeline
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import methods.pruning.scores as scores_lib
from methods.pruning import masked
from methods.pruning import polynomial_schedule
from methods.pruning.masks import _smallest_k_by_selection
from methods.pruning.masks import _smallest_k_by_sort
from methods.pruning.masks import mask_from_scores
from methods.pruning.masks import ranks_in_groups
from methods.pruning.masks import smallest_k
from research.report import format_table


def former_mask_from_scores(scores, sparsity):
    """``mask_from_scores`` before session 25: each entry's rank from two stable argsorts."""
    flat = jnp.ravel(scores)
    k = jnp.round(jnp.asarray(sparsity, jnp.float32) * flat.size).astype(jnp.int32)
    ranks = jnp.argsort(jnp.argsort(flat, stable=True), stable=True)
    return (ranks >= k).reshape(jnp.shape(scores))


@contextlib.contextmanager
def selection(fn):
    """Masks computed with ``fn`` inside (the allocation's ``mask_from_scores``); jitted steps forgotten."""
    from research.train.step import clear_train_step_cache  # pylint: disable=import-outside-toplevel

    before = scores_lib.mask_from_scores
    scores_lib.mask_from_scores = fn
    clear_train_step_cache()
    try:
        yield
    finally:
        scores_lib.mask_from_scores = before
        clear_train_step_cache()


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return out


def leaf_row(n: int, repeats: int) -> dict:
    rng = np.random.default_rng(n)
    v = np.abs(rng.normal(size=n)).astype(np.float32)
    v[rng.random(n) < 0.5] = 0.0  # a half-pruned leaf: many ties at zero
    x, k = jnp.asarray(v), int(0.9 * n)
    fns = {
        "double": jax.jit(lambda s, k: ~former_mask_from_scores(s, k / s.size)),
        "scatter": jax.jit(_smallest_k_by_sort),
        "bisect": jax.jit(_smallest_k_by_selection),
        "select": jax.jit(smallest_k),
        "top_k": jax.jit(lambda s, k: jnp.zeros(s.shape, bool).at[jax.lax.top_k(-s, k)[1]].set(True), static_argnums=1),
    }
    args = {name: (x, k if name == "top_k" else jnp.int32(k)) for name in fns}
    outs = {name: np.asarray(f(*args[name])) for name, f in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):  # interleaved
        for name, f in fns.items():
            times[name] += _time(lambda f=f, a=args[name]: f(*a), 1)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    return {
        "elements": n,
        "double argsort ms": ms["double"],
        "argsort+scatter ms": ms["scatter"],
        "bisection ms": ms["bisect"],
        "smallest_k ms": ms["select"],
        "lax.top_k ms": ms["top_k"],
        "double / smallest_k": ms["double"] / ms["select"],
        "same entries": all((outs[name] == outs["double"]).all() for name in ("scatter", "bisect", "select")),
        "k taken (top_k)": int(outs["top_k"].sum()),
    }


def nm_row(shape: tuple[int, ...], n: int, m: int, repeats: int) -> dict:
    """An N:M mask of one kernel (groups along axis 0): the former two argsorts per group vs the
    counted ranks (:func:`methods.pruning.masks.ranks_in_groups`)."""
    x = jnp.asarray(np.abs(np.random.default_rng(0).normal(size=shape)).astype(np.float32))

    def groups(s):
        return jnp.moveaxis(s, 0, -1).reshape(*s.shape[1:], s.shape[0] // m, m)

    def former(s):
        g = -groups(s)
        return jnp.argsort(jnp.argsort(g, axis=-1, stable=True), axis=-1, stable=True) < n

    fns = {"former": jax.jit(former), "now": jax.jit(lambda s: ranks_in_groups(-groups(s)) < n)}
    outs = {name: np.asarray(f(x)) for name, f in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            times[name] += _time(lambda f=f: f(x), 1)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    return {
        "kernel": "x".join(map(str, shape)),
        "N:M": f"{n}:{m}",
        "argsorts ms": ms["former"],
        "counted ms": ms["now"],
        "argsorts / counted": ms["former"] / ms["now"],
        "same mask": bool((outs["former"] == outs["now"]).all()),
    }


def step_rows(models, repeats: int, steps: int) -> list[dict]:
    from research.data import load_dataset  # pylint: disable=import-outside-toplevel
    from research.nn import build_model  # pylint: disable=import-outside-toplevel
    from research.train import create_train_state  # pylint: disable=import-outside-toplevel
    from research.train import make_optimizer  # pylint: disable=import-outside-toplevel
    from research.train import make_train_step  # pylint: disable=import-outside-toplevel

    ds = load_dataset("mnist5k")
    batch = {"x": jnp.asarray(ds.x_train[:128]), "y": jnp.asarray(ds.y_train[:128])}
    rows = []
    for name in models:
        model = build_model(name, input_shape=ds.x_train.shape[1:], num_classes=10, rngs=nnx.Rngs(0))
        base = make_optimizer(steps=10_000, learning_rate=1e-3, optimizer="adam")
        programs = {}
        for freq in (1, 5, None):
            variants = [("former", former_mask_from_scores), ("now", mask_from_scores)] if freq else [("none", None)]
            for label, fn in variants:
                tx = base if freq is None else masked(base, polynomial_schedule(0.9, end_step=10_000, frequency=freq))
                ctx = selection(fn) if fn is not None else contextlib.nullcontext()
                with ctx:
                    defs, state = create_train_state(nnx.clone(model), tx, seed=0)
                    step = make_train_step(defs, tx, donate=False)
                    jax.block_until_ready(step(state, batch))  # compiled with this selection
                programs[(freq, label)] = (step, state)
        times = {key: [] for key in programs}
        for _ in range(repeats):
            for key, (step, state) in programs.items():

                def run(step=step, state=state):
                    s = state
                    for _ in range(steps):
                        s, m = step(s, batch)
                    return m

                times[key] += [t / steps for t in _time(run, 1)]
        ms = {key: 1e3 * statistics.median(t) for key, t in times.items()}
        for freq in (1, 5):
            rows.append(
                {
                    "model": name,
                    "mask update every": freq,
                    "unmasked step ms": ms[(None, "none")],
                    "former ms": ms[(freq, "former")],
                    "now ms": ms[(freq, "now")],
                    "former / now": ms[(freq, "former")] / ms[(freq, "now")],
                }
            )
    return rows


def pipeline_rows(repeats: int) -> list[dict]:
    from experiments.population_lr_wd.main import make_config  # pylint: disable=import-outside-toplevel
    from research.run import register_all_stages  # pylint: disable=import-outside-toplevel
    from research.run import run  # pylint: disable=import-outside-toplevel

    register_all_stages()
    config = make_config(300, 100, "lenet300")
    root = tempfile.mkdtemp(prefix="prune_masks_")
    rows = []
    try:
        for label, fn in (("former", former_mask_from_scores), ("now", mask_from_scores)):
            with selection(fn):
                seconds, stages = [], []
                for r in range(repeats + 1):  # the first compiles
                    workdir = os.path.join(root, f"{label}{r}")
                    t0 = time.perf_counter()
                    report = run(config, workdir, progress=False, echo=False)
                    if r:
                        seconds.append(time.perf_counter() - t0)
                        stages.append([s["seconds"] for s in report["stages"]])
                    shutil.rmtree(workdir)
            rows.append(
                {
                    "selection": label,
                    "run s": statistics.median(seconds),
                    "train stage s": statistics.median(s[0] for s in stages),
                    "prune stage s": statistics.median(s[1] for s in stages),
                    "test accuracy": report["stages"][-1]["metrics"]["test_accuracy"],
                }
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 36_864, 235_200, 589_824])
    parser.add_argument("--models", nargs="+", default=["lenet300", "lenet5"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20, help="train steps per timed call")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the LeNet-300-100 pipeline runs")
    args = parser.parse_args(argv)
    dev = jax.devices()[0]
    print(f"device: {dev.platform} ({dev.device_kind}); jax {jax.__version__}; medians of {args.repeats}")
    print("\none leaf, 90% pruned (half its entries tied at zero):")
    print(format_table([leaf_row(n, args.repeats) for n in args.sizes]))
    print("\nN:M masks (groups along the input axis):")
    nm = [((784, 300), 2, 4), ((784, 300), 4, 8), ((3 * 3 * 256, 256), 2, 4)]
    print(format_table([nm_row(shape, n, m, args.repeats) for shape, n, m in nm]))
    print(f"\nmasked train step, mnist5k batch 128 ({args.steps} steps per timed call):")
    print(format_table(step_rows(args.models, args.repeats, args.steps)))
    if not args.no_pipeline:
        print("\nLeNet-300-100 pipeline (train 300 -> prune 90% with 100 steps; mask update every 5), compiled:")
        print(format_table(pipeline_rows(max(2, args.repeats // 3))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
