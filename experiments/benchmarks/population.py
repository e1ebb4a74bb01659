"""Trials per second of the population executor against the sequential executor, through the public
sweep API, with a hand-written plain-JAX vmapped loop as the reference ratio; one table, one run.

For each model (LeNet-300-100 ``lenet300`` and LeNet-5 ``lenet5``) and each K, the sweep runs K
learning rates of a train-only config (digits; the same steps and batches for every trial):

- ``seq trials/s``: :func:`research.sweep.sweep` with ``executor="sequential"``. Sequential
  throughput does not depend on K, so it is measured once per model on ``--seq-trials`` trials.
- ``pop trials/s``: the same sweep with ``executor="population"`` (``max_k=K``); the chooser
  measures its chunk size (``chosen K``; 1 means it fell back to one after another).
- ``plain ratio``: a hand-written plain-JAX loop (the whole training as one ``lax.scan``, Adam with
  the learning rate as a traced value), K trials vmapped in one program against the same program
  called K times; compilation excluded. ``kept`` = ``pop/seq`` over ``plain ratio``: how much of
  the plain vmap gain the executor keeps (the issue's target: at least 90% on the MLP).

Both sweeps count everything a sweep does per trial: compilation, training, measuring each run
(accuracy, FLOPs, latency) and writing its run directory.

Run:
  python -m experiments.benchmarks.population                      # CPU: 20 steps, K in 1 8 32 128
  python -m experiments.benchmarks.population --steps 200 --seq-trials 8   # a GPU
  python -m experiments.benchmarks.population --models lenet300 --ks 1 8 --steps 10 --seq-trials 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time


def _config(model: str, steps: int, batch_size: int):
    from research import config as C
    from research.stages import TrainStage

    return C.Config(
        name=f"pop-{model}",
        model=C.ModelConfig(name=model),
        data=C.DataConfig(name="digits"),
        stages=(
            TrainStage(
                steps=steps, batch_size=batch_size, learning_rate=1e-3, checkpoint_every=0, eval_every=0, log_every=0
            ),
        ),
    )


def _lrs(k: int) -> list[float]:
    import numpy as np

    return [float(f"{v:.6g}") for v in np.geomspace(1e-4, 1e-2, k)]


def _sweep_seconds(config, k: int, executor) -> tuple[float, object]:
    """``(sweep seconds, report)`` of a K-trial sweep."""
    from research.sweep import sweep

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):
        t0 = time.perf_counter()
        report = sweep(config, {"stages.train.learning_rate": _lrs(k)}, tmp, progress=False, executor=executor)
        seconds = time.perf_counter() - t0
        if report.failed:
            raise RuntimeError(f"{len(report.failed)} trials failed: {report.failed[0].error}")
    return seconds, report


def _plain_ratio(model_name: str, k: int, steps: int, batch_size: int) -> float:
    """Seconds of K one-after-another plain-JAX trainings over seconds of the K vmapped in one program."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from research.data import load_dataset
    from research.nn import build_model

    ds = load_dataset("digits", seed=0)
    model = build_model(model_name, input_shape=ds.input_shape, num_classes=ds.num_classes, rngs=nnx.Rngs(0))
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    xs, ys = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    idx = jnp.asarray(np.random.default_rng(0).integers(0, len(ds.x_train), (steps, batch_size)))
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)

    def train(params, lr):
        opt = tx.init(params)
        opt.hyperparams["learning_rate"] = lr

        def body(carry, i):
            p, o = carry

            def loss(p):
                m = nnx.merge(graphdef, p, rest, copy=True)
                return optax.softmax_cross_entropy_with_integer_labels(m(xs[i]), ys[i]).mean()

            value, grads = jax.value_and_grad(loss)(p)
            updates, o = tx.update(grads, o, p)
            return (optax.apply_updates(p, updates), o), value

        (p, _), losses = jax.lax.scan(body, (params, opt), idx)
        return losses[-1]

    one = jax.jit(train)
    many = jax.jit(jax.vmap(train, in_axes=(None, 0)))
    lrs = jnp.asarray(_lrs(k), jnp.float32)
    jax.block_until_ready(one(params, lrs[0]))
    jax.block_until_ready(many(params, lrs))
    t0 = time.perf_counter()
    for lr in lrs:
        jax.block_until_ready(one(params, lr))
    seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(many(params, lrs))
    return seq / (time.perf_counter() - t0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["lenet300", "lenet5"])
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 8, 32, 128])
    parser.add_argument("--steps", type=int, default=20, help="train steps per trial")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-trials", type=int, default=4, help="trials the sequential sweep runs per model")
    args = parser.parse_args(argv)

    import jax

    from research.executors import make_executor
    from research.run import register_all_stages
    from research.sweep import report_populations

    register_all_stages()
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}) x {jax.device_count()}; jax {jax.__version__}")
    print(f"digits, train-only, {args.steps} steps of batch {args.batch_size} per trial\n")
    header = (
        f"{'model':<9} {'K':>4} {'chosen K':>8} {'seq trials/s':>12} {'pop trials/s':>12} "
        f"{'pop/seq':>8} {'plain ratio':>11} {'kept':>6}"
    )
    print(header)
    print("-" * len(header))
    notes = []
    for model in args.models:
        config = _config(model, args.steps, args.batch_size)
        _sweep_seconds(config, 1, make_executor("sequential"))  # warm-up: data loading, first compilations
        seq_s, _ = _sweep_seconds(config, args.seq_trials, make_executor("sequential"))
        seq_tps = args.seq_trials / seq_s
        for k in args.ks:
            pop_s, report = _sweep_seconds(config, k, make_executor("population", max_k=k))
            chosen = max((p.get("k", 1) for p in report.executor["populations"]), default=1)
            notes += [f"{model} K={k}: {line}" for line in report_populations(report.executor)]
            pop_tps = k / pop_s
            plain = _plain_ratio(model, k, args.steps, args.batch_size) if k > 1 else 1.0
            ratio = pop_tps / seq_tps
            print(
                f"{model:<9} {k:>4} {chosen:>8} {seq_tps:>12.2f} {pop_tps:>12.2f} {ratio:>8.2f} {plain:>11.2f} "
                f"{ratio / plain:>6.0%}",
                flush=True,
            )
    print("\nchooser:")
    for line in notes:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
