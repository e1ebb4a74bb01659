"""Distillation train-step time against the plain step: online teacher and teacher cache.

For each (teacher, student) pair, three jitted steps train the same student on the same
batches: the plain cross-entropy step, Hinton KD with the teacher run online in every step,
and Hinton KD with the teacher's logits looked up from a ``TeacherCache`` by example index.
They are timed interleaved (A, B, C, A, B, C, ...) in one process so machine noise hits all
alike. Prints median step times and the ratios to the plain step (target with the cache:
<= 1.1x).

Run from the repository root:
  python -m experiments.benchmarks.distillation
  python -m experiments.benchmarks.distillation --pairs mlp --batch 256 --repeats 100
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
import optax
from flax import nnx

from methods.distillation import IndexedBatchSampler
from methods.distillation import build_teacher_cache
from methods.distillation import distill
from research.nn import build_model
from research.report import format_table
from research.train import create_train_state
from research.train import make_train_step

# name -> (input shape, teacher (zoo name, options), student (zoo name, options))
PAIRS = {
    "mlp": ((28, 28, 1), ("mlp", {"widths": (1200, 1200)}), ("mlp", {"widths": (800, 800)})),
    "cnn": ((32, 32, 3), ("resnet20", {}), ("lenet5", {})),
}


def bench_pair(name: str, *, batch: int, repeats: int, examples: int = 2048) -> dict:
    shape, (t_name, t_opts), (s_name, s_opts) = PAIRS[name]
    r = np.random.default_rng(0)
    x = r.normal(size=(examples, *shape)).astype(np.float32)
    y = r.integers(0, 10, examples).astype(np.int32)
    teacher = build_model(t_name, input_shape=shape, num_classes=10, rngs=nnx.Rngs(0), **t_opts)
    sampler = IndexedBatchSampler(x, y, batch_size=batch, seed=0)
    cache = build_teacher_cache(teacher, x)
    transforms = {
        "plain": [],
        "kd online": [distill(None, teacher, temperature=4.0, alpha=0.9)],
        "kd cached": [distill(None, cache, temperature=4.0, alpha=0.9)],
    }
    steps, states = {}, {}
    for label, ts in transforms.items():
        student = build_model(s_name, input_shape=shape, num_classes=10, rngs=nnx.Rngs(1), **s_opts)
        tx = optax.adam(1e-3)
        defs, state = create_train_state(student, tx)
        steps[label] = make_train_step(defs, tx, loss_transforms=ts)
        states[label], _ = steps[label](state, sampler.batch(0))  # compile
        jax.block_until_ready(states[label])
    times = {k: [] for k in transforms}
    batches = [jax.device_put(sampler.batch(i)) for i in range(1, 9)]
    for i in range(repeats):
        for label in transforms:
            t0 = time.perf_counter()
            states[label], m = steps[label](states[label], batches[i % len(batches)])
            jax.block_until_ready(m["loss"])
            times[label].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "pair": f"{name}: {t_name} -> {s_name}",
        "batch": batch,
        "plain_ms": 1e3 * med["plain"],
        "online_ms": 1e3 * med["kd online"],
        "cached_ms": 1e3 * med["kd cached"],
        "online_x": med["kd online"] / med["plain"],
        "cached_x": med["kd cached"] / med["plain"],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)
    print(f"device: {jax.devices()[0].platform} ({jax.devices()[0].device_kind})")
    rows = [bench_pair(n, batch=args.batch, repeats=args.repeats) for n in args.pairs]
    print(
        format_table(
            rows,
            [
                ("pair", "pair", "{}"),
                ("batch", "batch", "{}"),
                ("plain_ms", "plain ms", "{:.2f}"),
                ("online_ms", "KD online ms", "{:.2f}"),
                ("cached_ms", "KD cached ms", "{:.2f}"),
                ("online_x", "online / plain", "{:.2f}x"),
                ("cached_x", "cached / plain", "{:.2f}x"),
            ],
        )
    )
    print("target: cached / plain <= 1.10x")
    return rows


if __name__ == "__main__":
    main()
