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

import jax

from experiments.benchmarks.later_ways import alternate_ways
from experiments.benchmarks.later_ways import ways_rows
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
    from research.run import register_all_stages  # pylint: disable=import-outside-toplevel

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

    def switch(name):  # alone: no later stage's request has a program key, so each trains as in a sequential run
        pop_executor.request_key = (lambda request: None) if name and name.endswith("alone") else together_key

    def on_report(name, report):
        if report.failed:
            raise RuntimeError(f"{name}: {len(report.failed)} points failed: {report.failed[0].error}")

    dev = jax.devices()[0]
    print(f"device: {dev.platform} ({dev.device_kind}) x {jax.device_count()}; jax {jax.__version__}")
    seconds, accuracy, later = alternate_ways(
        config, grid, ways, switch, rounds=args.rounds, chunk=args.chunk, prefix=f"population_{args.stage}_",
        on_report=on_report,
    )  # fmt: skip
    rows, med = ways_rows(ways, seconds, accuracy, later, f"{args.stage} stages as populations")
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
