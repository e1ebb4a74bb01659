"""Distillation vs. plain fine-tuning after 90% pruning and 4-bit quantization; prints the table.

Run from the repository root:
  python -m experiments.kd_recovery.main                 # 3 seeds, both pipelines
  python -m experiments.kd_recovery.main --quick         # smoke run (tiny steps, one seed)
  python -m experiments.kd_recovery.main --seeds 0 1 --variants prune quant2 --workdir runs/kdr
  python -m experiments.kd_recovery.main --json out.json
  python -m experiments.kd_recovery.main --cnn1d         # MNIST-1D's CNN, the fine-tuning stages' own teacher
"""

import argparse
import dataclasses
import json
import pathlib

from experiments.kd_recovery.experiment import STAGE_VARIANTS
from experiments.kd_recovery.experiment import VARIANTS
from experiments.kd_recovery.experiment import config_module
from experiments.kd_recovery.experiment import run_experiment


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration, one seed")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2; --quick: 0)")
    p.add_argument("--cnn1d", action="store_true", help="the cnn1d (MNIST-1D) variants with the stage-level teacher")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS) + list(STAGE_VARIANTS))
    p.add_argument("--steps", type=int, help="fine-tuning steps of both arms")
    p.add_argument("--temperature", type=float, help="KD temperature (default 4)")
    p.add_argument("--alpha", type=float, help="KD soft-loss weight (default 0.9)")
    p.add_argument("--workdir", help="keep the run directories here (default: temporary)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument("--json", help="write the results to this JSON file")
    args = p.parse_args(argv)
    module = config_module()
    variants = args.variants or list(STAGE_VARIANTS if args.cnn1d else VARIANTS)
    recipe = module.CNN1D if args.cnn1d else module.Recipe()
    if args.quick:
        recipe = dataclasses.replace(recipe, teacher_steps=30, steps=10, batch_size=64, limit=256)
    overrides = {"steps": args.steps, "temperature": args.temperature, "alpha": args.alpha}
    recipe = dataclasses.replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    seeds = tuple(args.seeds) if args.seeds else ((0,) if args.quick else (0, 1, 2))
    result = run_experiment(
        recipe,
        seeds,
        variants=tuple(variants),
        workdir=args.workdir,
        progress=args.progress,
    )
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
