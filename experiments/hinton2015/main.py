"""Reproduces Hinton et al. (2015) Sec. 3 on the shipped MNIST subset; prints the error table.

Run from the repository root:
  python -m experiments.hinton2015.main              # 3 seeds, about 5 minutes on 2 CPU cores
  python -m experiments.hinton2015.main --quick      # smoke run in seconds
  python -m experiments.hinton2015.main --temperature 8 --seeds 0 1 2 3 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

from experiments.hinton2015.experiment import HintonConfig
from experiments.hinton2015.experiment import quick_config
from experiments.hinton2015.experiment import run_experiment


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2)")
    p.add_argument("--temperature", type=float, help="distillation temperature (default 20)")
    p.add_argument("--alpha", type=float, help="soft-loss weight (default 0.9)")
    p.add_argument("--teacher-steps", type=int)
    p.add_argument("--student-steps", type=int)
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument("--json", help="write the results to this JSON file")
    args = p.parse_args(argv)
    cfg = quick_config() if args.quick else HintonConfig()
    overrides = {
        "seeds": tuple(args.seeds) if args.seeds else None,
        "temperature": args.temperature,
        "alpha": args.alpha,
        "teacher_steps": args.teacher_steps,
        "student_steps": args.student_steps,
    }
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    result = run_experiment(cfg, progress=args.progress)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
