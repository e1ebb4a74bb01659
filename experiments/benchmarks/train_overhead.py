"""Overhead of slimjax's train step against a hand-written jitted optax step.

Both steps train the same model on the same batch with the same optimizer and both donate their
input buffers; they are timed interleaved (A, B, C, A, B, C, ...) in one process so machine noise
hits all alike. Prints the median step time of each, their ratio (target <= 1.05), the ratio of
the step that also logs the gradient norm, and the compile time of the first step.

Run:
  python -m experiments.benchmarks.train_overhead                 # lenet5 + resnet20 + mlp on CPU
  python -m experiments.benchmarks.train_overhead --models resnet20 --batch 256 --repeats 200
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from research import nn
from research import train
from research.report import format_table


def hand_written_step(model: nnx.Module, tx: optax.GradientTransformation):
    """The baseline: what a user writes by hand with nnx.split/merge, optax and jax.jit."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))  # donates like slimjax's default step
    def step(params, rest, opt_state, x, y):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest)
            logits = m(x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, nnx.to_pure_dict(nnx.state(m, nnx.Not(nnx.Param)))

        (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_rest, opt_state, loss

    return step, (params, rest, opt_state)


def bench(name: str, input_shape, batch: int, repeats: int) -> dict:
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, *input_shape)).astype(np.float32))
    y = jnp.asarray(np.random.default_rng(1).integers(0, 10, size=batch).astype(np.int32))
    tx = optax.adam(1e-3)

    model = nn.build_model(name, input_shape=input_shape, num_classes=10, rngs=nnx.Rngs(0))
    model.train()
    hw_step, hw_state = hand_written_step(model, tx)
    b = {"x": x, "y": y}

    def fresh():
        return train.create_train_state(
            nn.build_model(name, input_shape=input_shape, num_classes=10, rngs=nnx.Rngs(0)), tx
        )

    defs, fw_state = fresh()
    _, gn_state = fresh()
    fw_step = train.make_train_step(defs, tx)  # the default: donating, logs loss and accuracy
    gn_step = train.make_train_step(defs, tx, log_grad_norm=True)

    t0 = time.perf_counter()
    hw_state = hw_step(*hw_state, x, y)[:3]
    jax.block_until_ready(hw_state)
    hw_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    fw_state, _ = fw_step(fw_state, b)
    jax.block_until_ready(fw_state)
    fw_compile = time.perf_counter() - t0
    gn_state, _ = gn_step(gn_state, b)

    hw_times, fw_times, gn_times = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = hw_step(*hw_state, x, y)
        jax.block_until_ready(out)
        hw_times.append(time.perf_counter() - t0)
        hw_state = out[:3]
        t0 = time.perf_counter()
        fw_state, m = fw_step(fw_state, b)
        jax.block_until_ready((fw_state, m))
        fw_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        gn_state, m = gn_step(gn_state, b)
        jax.block_until_ready((gn_state, m))
        gn_times.append(time.perf_counter() - t0)
    hw, fw, gn = (statistics.median(t) for t in (hw_times, fw_times, gn_times))
    return {
        "model": name,
        "batch": batch,
        "hand-written ms": 1e3 * hw,
        "slimjax ms": 1e3 * fw,
        "ratio": fw / hw,
        "ratio with grad_norm": gn / hw,
        "compile hand s": hw_compile,
        "compile slimjax s": fw_compile,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,lenet5,resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=100)
    args = p.parse_args(argv)
    shapes = {"mlp": (28, 28, 1), "lenet5": (28, 28, 1), "cnn1d": (40,)}
    rows = [bench(m, shapes.get(m, (32, 32, 3)), args.batch, args.repeats) for m in args.models.split(",")]
    print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
