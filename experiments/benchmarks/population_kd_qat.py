"""A population's distilled or QAT fine-tunings that differ in KD values or bit widths: together against alone.

``--stage distill``: points of a train -> prune pipeline whose prune stage is distilled from the
trial's own trained model (``train.teacher``, cached logits) at different temperatures and hard
weights. ``--stage qat``: points of a train -> qat pipeline at different bit widths. The population
executor (``chunk_size=K``: the train stage as one vmapped program) fine-tunes them together (the
KD values and teacher logits as data of the batches, the bit widths as the quantizers' grids in the
state), or, with later stages' grouping turned off, each alone as a sequential run does. The
sequential executor runs the same grid as the reference. Each way keeps its own compiled programs;
round 0 compiles and is not counted; the ways alternate. Prints the sweep seconds, how many later
stages trained as populations and the largest test-accuracy difference from the sequential executor.

Run:
  python -m experiments.benchmarks.population_kd_qat --stage distill
  python -m experiments.benchmarks.population_kd_qat --stage qat
  python -m experiments.benchmarks.population_kd_qat --stage qat --chunk 8 --rounds 3   # a GPU
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np

from research.population import executor as pop_executor
from research.report import format_table

GRIDS = {
    "distill": {
        "stages.prune.train.teacher.terms.0.options.temperature": [1.0, 2.0, 4.0, 8.0],
        "stages.prune.train.teacher.hard_weight": [0.1, 0.5],
    },
    "qat": {"stages.qat.bits": [2, 4, 6, 8], "stages.qat.train.learning_rate": [3e-4, 1e-3]},
}


def make_config(stage: str, steps: int, fine_tune_steps: int, model: str):
    from methods.pruning import PruneStage  # pylint: disable=import-outside-toplevel
    from methods.quantization import QATStage  # pylint: disable=import-outside-toplevel
    from research import config as C  # pylint: disable=import-outside-toplevel
    from research.stages import TrainStage  # pylint: disable=import-outside-toplevel
    from research.teacher import KDTermConfig  # pylint: disable=import-outside-toplevel
    from research.teacher import TeacherConfig  # pylint: disable=import-outside-toplevel

    quiet = {"checkpoint_every": 0, "eval_every": 0, "log_every": 0, "batch_size": 128}
    tune = TrainStage(steps=fine_tune_steps, learning_rate=1e-3, **quiet)
    if stage == "distill":
        teacher = TeacherConfig(stage="0_train", terms=(KDTermConfig(name="hinton", weight=0.9),), hard_weight=0.1)
        later = PruneStage(
            sparsity=0.9, train=TrainStage(steps=fine_tune_steps, learning_rate=1e-3, teacher=teacher, **quiet)
        )
    else:
        later = QATStage(calibration_examples=256, train=tune)
    return C.Config(
        name=f"pop-{stage}",
        model=C.ModelConfig(name=model),
        data=C.DataConfig(name="mnist5k"),
        stages=(TrainStage(steps=steps, optimizer="adamw", learning_rate=1e-3, **quiet), later),
    )


def main(argv=None) -> int:
    from research.executors import make_executor  # pylint: disable=import-outside-toplevel
    from research.run import register_all_stages  # pylint: disable=import-outside-toplevel
    from research.sweep import sweep  # pylint: disable=import-outside-toplevel

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=sorted(GRIDS), default="distill")
    parser.add_argument("--model", default="lenet300")
    parser.add_argument("--chunk", type=int, default=8, help="the population's chunk size K")
    parser.add_argument("--steps", type=int, default=300, help="train stage steps")
    parser.add_argument("--fine-tune-steps", type=int, default=100, help="the later stage's fine-tuning steps")
    parser.add_argument("--rounds", type=int, default=2, help="timed sweeps per way")
    args = parser.parse_args(argv)
    register_all_stages()
    config = make_config(args.stage, args.steps, args.fine_tune_steps, args.model)
    grid = GRIDS[args.stage]
    together_key = pop_executor.request_key
    ways = ("sequential", "population, alone", "population, together")
    programs = {name: {} for name in ways}
    seconds = {name: [] for name in ways}
    accuracy, later = {}, {}
    root = tempfile.mkdtemp(prefix=f"population_{args.stage}_")
    dev = jax.devices()[0]
    print(f"device: {dev.platform} ({dev.device_kind}) x {jax.device_count()}; jax {jax.__version__}")
    try:
        for r in range(args.rounds + 1):
            for name in ways if r % 2 == 0 else reversed(ways):
                # alone: no later stage's request has a program key, so each trains as in a sequential run
                pop_executor.request_key = (lambda request: None) if name.endswith("alone") else together_key
                pop_executor._PROGRAMS = programs[name]  # pylint: disable=protected-access
                executor = "sequential" if name == "sequential" else make_executor("population", chunk_size=args.chunk)
                t0 = time.perf_counter()
                report = sweep(config, grid, f"{root}/{r}", progress=False, overwrite=True, executor=executor)
                dt = time.perf_counter() - t0
                print(f"round {r} {name}: {dt:.2f} s{' (compiles; not counted)' if r == 0 else ''}", flush=True)
                if r:
                    seconds[name].append(dt)
                if report.failed:
                    raise RuntimeError(f"{name}: {len(report.failed)} points failed: {report.failed[0].error}")
                accuracy[name] = [p.metrics.get("test_accuracy", float("nan")) for p in report.points]
                pops = report.executor.get("populations", [])
                later[name] = sum(len([s for s in p.get("later_stages", []) if "trials" in s]) for p in pops)
    finally:
        pop_executor.request_key = together_key
        pop_executor._PROGRAMS = {}  # pylint: disable=protected-access
        shutil.rmtree(root, ignore_errors=True)
    med = {name: statistics.median(t) for name, t in seconds.items()}
    rows = [
        {
            "way": name,
            "sweep s (median)": med[name],
            "rounds": " ".join(f"{t:.2f}" for t in seconds[name]),
            f"{args.stage} stages as populations": later[name],
            "max |test acc - sequential|": float(np.max(np.abs(np.subtract(accuracy[name], accuracy["sequential"])))),
        }
        for name in ways
    ]
    points = len(accuracy["sequential"])
    print(
        f"\n{points} points of {args.model} on mnist5k, train {args.steps} -> {args.stage} ({grid}) with "
        f"{args.fine_tune_steps} fine-tuning steps, chunk {args.chunk}:"
    )
    print(format_table(rows))
    print("test accuracy per point (sequential):", " ".join(f"{a:.4f}" for a in accuracy["sequential"]))
    print(
        f"alone / together: {med['population, alone'] / med['population, together']:.2f}x; "
        f"sequential / together: {med['sequential'] / med['population, together']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
