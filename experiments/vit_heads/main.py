"""ViT heads pruned 50% + int8, fine-tuned with and without KD from the dense ViT; prints the table.

Run from the repository root:
  python -m experiments.vit_heads.main              # 3 seeds (about 10 minutes on 2 CPU cores)
  python -m experiments.vit_heads.main --quick      # smoke run (tiny steps, one seed)
  python -m experiments.vit_heads.main --seeds 0 1 2 3 4 --json out.json
"""

import argparse
import dataclasses
import json
import pathlib

from experiments.vit_heads.experiment import QUICK
from experiments.vit_heads.experiment import Recipe
from experiments.vit_heads.experiment import run_experiment


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration, one seed")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2; --quick: 0)")
    p.add_argument("--finetune-steps", type=int, help="fine-tuning steps of both arms")
    p.add_argument("--workdir", help="keep the exported files here (default: temporary)")
    p.add_argument("--json", help="write the results to this JSON file")
    args = p.parse_args(argv)
    recipe = QUICK if args.quick else Recipe()
    if args.finetune_steps:
        recipe = dataclasses.replace(recipe, finetune_steps=args.finetune_steps)
    seeds = tuple(args.seeds) if args.seeds else ((0,) if args.quick else (0, 1, 2))
    result = run_experiment(recipe, seeds, workdir=args.workdir)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
