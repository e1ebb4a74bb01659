"""Time one batch of q GP suggestions (one jitted call) with N observations.

Records the device name, the first call (compilation included) and the median of the
following calls, for single suggestions and batches (default q=64) on Hartmann-6.
Checks that the batch holds no near-duplicates.

Usage:
  python -m experiments.benchmarks.automl_gp_batch                # N=100,300; q=1,64
  python -m experiments.benchmarks.automl_gp_batch --n 300 --q 64 --repeats 5
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from research.automl import GPSampler
from research.automl import InMemoryStorage
from research.automl import RandomSampler
from research.automl import Study
from research.automl import testfunctions as tf


def time_batch(n_obs: int, q: int, repeats: int, seed: int = 0) -> dict:
    space = tf.hartmann6_space()
    storage = InMemoryStorage()
    filler = Study(space, sampler=RandomSampler(seed=seed), storage=storage, name="b")
    for t in filler.ask(n_obs):
        filler.tell(t, tf.hartmann6(t.params))
    sampler = GPSampler(seed=seed)
    study = Study(space, sampler=sampler, storage=storage, name="b")
    trials = filler.trials
    times = []
    min_dist = np.inf
    for r in range(repeats + 2):
        t0 = time.perf_counter()
        out = sampler.sample(space, trials, ["minimize"], q)
        times.append(time.perf_counter() - t0)
        u = np.array([[p[f"x{i}"] for i in range(6)] for p in out])
        if q > 1:
            d = np.sqrt(((u[:, None] - u[None]) ** 2).sum(-1))
            min_dist = min(min_dist, d[np.triu_indices(q, 1)].min())
        del r
    del study
    # Call 0 compiles (restart fit + acquisition), call 1 compiles the warm-fit variant.
    return {
        "first_s": times[0],
        "second_s": times[1],
        "median_s": float(np.median(times[2:])),
        "min_pair_distance": float(min_dist),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", default="100,300")
    ap.add_argument("--q", default="1,64")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    print(f"device: {dev.platform} {dev.device_kind}; jax {jax.__version__}")
    print("| N | q | first call s (compile) | 2nd call s | median s/batch | ms/point | min pair dist |")
    print("|---|---|---|---|---|---|---|")
    for n in [int(x) for x in args.n.split(",")]:
        for q in [int(x) for x in args.q.split(",")]:
            r = time_batch(n, q, args.repeats)
            print(
                f"| {n} | {q} | {r['first_s']:.2f} | {r['second_s']:.3f} | {r['median_s']:.4f} | "
                f"{1e3 * r['median_s'] / q:.2f} | {r['min_pair_distance']:.3g} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
