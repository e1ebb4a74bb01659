"""Wall time of a sweep of N small trials: one after another in this process against the Ray
executor on a local Ray with W workers, and the per-trial overhead Ray adds; one table, one run.

Every sweep runs N points of the same train-only config (an MLP on the shipped digits; the points
differ in seed, so every trial does the same work) through the public :func:`research.sweep.sweep`:

- ``sequential``: ``executor="sequential"``, in this process.
- ``ray xW``: ``executor=RayExecutor()`` on a local Ray started with ``num_cpus=W`` (one CPU per
  trial, so W trials at once). ``cold`` is the first Ray sweep (the W worker processes start and
  import JAX and slimjax); ``warm`` a second sweep of new seeds on the same workers.

Columns: ``wall s`` of the sweep call; ``sum trial s``, the trials' own seconds (measured by
:func:`research.executors.run_one` where the trial ran); ``overhead/trial s`` = (wall x slots - sum
trial s) / N: slot time not spent in a trial (scheduling, shipping config and report, worker start,
idle slots at the end), per trial. For the sequential sweep (1 slot) it is the sweep's own
bookkeeping. ``speedup`` is against the sequential sweep of the same temperature (cold/warm). Below
the table: the time ``ray.init`` took to start the local Ray (paid once per sweep command), and the
round trip of a no-op task with the same options as a trial (Ray's scheduling floor).

Run:
  python -m experiments.benchmarks.ray_sweep                    # N=8 trials, 2 workers, 300 steps
  python -m experiments.benchmarks.ray_sweep --trials 4 --steps 50
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time


def _config(steps: int):
    from research import config as C
    from research.stages import TrainStage

    return C.Config(
        name="ray-bench",
        model=C.ModelConfig(name="mlp", options={"widths": (64,)}),
        data=C.DataConfig(name="digits"),
        stages=(TrainStage(steps=steps, batch_size=64, checkpoint_every=0, eval_every=0, log_every=0),),
    )


def _sweep(config, seeds, workdir, executor) -> tuple[float, float, list[str]]:
    """``(wall seconds, sum of the trials' seconds, statuses)``."""
    from research.sweep import sweep

    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        report = sweep(config, {"seed": list(seeds)}, workdir, progress=False, executor=executor)
    wall = time.perf_counter() - t0
    return wall, sum(p.seconds for p in report.points), [p.status for p in report.points]


def _noop_round_trip_ms(executor, n: int = 40) -> float:
    """Median round trip of a no-op task with a trial's resources and runtime environment."""
    import ray

    remote = ray.remote(lambda: None).options(
        num_cpus=executor.cpus_per_trial, runtime_env={"env_vars": dict(executor._worker_env)}
    )
    ray.get(remote.remote())  # a worker for this environment is up
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        ray.get(remote.remote())
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help="N, trials per sweep")
    parser.add_argument("--workers", type=int, default=2, help="W, CPUs of the local Ray (one trial per CPU)")
    parser.add_argument("--steps", type=int, default=300, help="training steps per trial")
    args = parser.parse_args(argv)

    import jax

    from research.distributed.ray_executor import RayExecutor
    from research.run import register_all_stages

    register_all_stages()
    config = _config(args.steps)
    n = args.trials
    cold, warm = range(n), range(n, 2 * n)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        seq = {}
        for label, seeds in (("cold", cold), ("warm", warm)):
            wall, busy, status = _sweep(config, seeds, os.path.join(tmp, f"seq_{label}"), "sequential")
            seq[label] = wall
            rows.append((f"sequential ({label})", 1, wall, busy, status))
        t0 = time.perf_counter()
        executor = RayExecutor(num_cpus=args.workers).start()
        init_s = time.perf_counter() - t0
        try:
            slots = executor.slots()
            for label, seeds in (("cold", cold), ("warm", warm)):
                wall, busy, status = _sweep(config, seeds, os.path.join(tmp, f"ray_{label}"), executor)
                rows.append((f"ray x{slots} ({label})", slots, wall, busy, status))
            noop_ms = _noop_round_trip_ms(executor)
        finally:
            executor.close()

    print(
        f"ray_sweep: {n} trials per sweep, mlp(64) on digits, {args.steps} steps; jax {jax.__version__} "
        f"{jax.devices()[0].device_kind}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}"
    )
    header = f"{'executor':<22} {'slots':>5} {'wall s':>8} {'trials/s':>9} {'sum trial s':>12} {'overhead/trial s':>17} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    for label, slots, wall, busy, status in rows:
        temp = "cold" if "cold" in label else "warm"
        overhead = (wall * slots - busy) / n
        failed = sum(s != "done" for s in status)
        note = f"  ({failed} failed)" if failed else ""
        print(
            f"{label:<22} {slots:>5} {wall:>8.2f} {n / wall:>9.2f} {busy:>12.2f} {overhead:>17.2f} "
            f"{seq[temp] / wall:>7.2f}x{note}"
        )
    print(f"local Ray start (ray.init, once per command): {init_s:.2f} s")
    print(f"no-op Ray task round trip (median of 40, same options as a trial): {noop_ms:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
