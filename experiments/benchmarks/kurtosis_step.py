"""Cost of the activation-kurtosis penalty in a train step, side by side with the plain step.

Two slimjax train steps (``research.train.make_train_step``) on the same model, optimizer and batch:
the task loss alone, and the task loss plus ``methods.quantization.kurtosis_regularizer(0.01)``.
They are timed interleaved (A, B, A, B, ...) in one process, so machine noise hits both alike.
Prints, per model, the number of activations the penalty covers, each step's compile time (first
call) and median step time, and the ratio.

Run:
  python -m experiments.benchmarks.kurtosis_step                       # attn_gru (MNIST-1D), vit, mlp
  python -m experiments.benchmarks.kurtosis_step --models attn_gru --batch 128 --repeats 100
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from methods.quantization import activations
from methods.quantization import kurtosis_regularizer
from research import nn
from research import train
from research.report import format_table

#: model name -> (input shape, zoo options)
MODELS = {
    "attn_gru": ((40,), {}),
    "vit": ((8, 8, 1), {}),
    "mlp": ((8, 8, 1), {"widths": (64, 64)}),
}


def bench(name: str, batch: int, repeats: int) -> dict:
    """Times both steps on ``name``; returns one table row."""
    shape, options = MODELS[name]
    model = nn.build_model(name, input_shape=shape, num_classes=10, rngs=nnx.Rngs(0), **options)
    rng = np.random.default_rng(0)
    data = {
        "x": jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32),
        "y": jnp.asarray(rng.integers(0, 10, size=batch)),
    }
    count = len(activations(model, data["x"])[1])
    tx = train.make_optimizer(steps=10_000, learning_rate=1e-3, schedule="constant")
    steps, states, compile_s = {}, {}, {}
    for label, transforms in (("plain", []), ("kurtosis", [kurtosis_regularizer(0.01)])):
        defs, state = train.create_train_state(nnx.clone(model), tx)
        steps[label] = train.make_train_step(defs, tx, loss_transforms=transforms)
        t = time.perf_counter()
        state, m = steps[label](state, data)
        jax.block_until_ready(m["loss"])
        compile_s[label] = time.perf_counter() - t
        states[label] = state
    times = {label: [] for label in steps}
    for _ in range(repeats):
        for label, step in steps.items():
            t = time.perf_counter()
            states[label], m = step(states[label], data)
            jax.block_until_ready(m["loss"])
            times[label].append(time.perf_counter() - t)
    plain, kurt = statistics.median(times["plain"]), statistics.median(times["kurtosis"])
    return {
        "model": name,
        "activations": count,
        "compile plain s": round(compile_s["plain"], 2),
        "compile kurtosis s": round(compile_s["kurtosis"], 2),
        "plain ms/step": round(1e3 * plain, 2),
        "kurtosis ms/step": round(1e3 * kurt, 2),
        "ratio": round(kurt / plain, 2),
    }


def main(argv=None) -> None:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=50)
    a = p.parse_args(argv)
    rows = [bench(name, a.batch, a.repeats) for name in a.models]
    print(format_table(rows))


if __name__ == "__main__":
    main()
