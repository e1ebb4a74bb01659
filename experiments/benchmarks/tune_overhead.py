"""Per-trial overhead of ``slimjax tune``: compile vs run time of the first and later trials of one
study, against a bare ``slimjax run`` of the same config, in one run.

The study tunes the learning rate and weight decay of ``configs/tune_quickstart.py`` (train ->
prune -> quantize, MLP on digits); width, sparsity and bits stay at the config's values, so every
trial has the same shapes. ``--vary sparsity`` also samples the pruning sparsity, which is a
constant of the prune stage's compiled step: each new value compiles that step again. Each measurement runs in a fresh process (cold in-memory caches): the
bare run, then the study (its trials share one worker process and the study's persistent
compilation cache). Compile time is what JAX reports for tracing, lowering and backend
compilation (``jax.monitoring``); run time is the rest of the trial.

Run:
  python -m experiments.benchmarks.tune_overhead                 # 4 trials
  python -m experiments.benchmarks.tune_overhead --trials 6 --arg smoke
  python -m experiments.benchmarks.tune_overhead --against /path/to/other/checkout   # two versions side by side

``--against DIR`` measures the same in a checkout of another version (its own copy of this script,
run with ``PYTHONPATH=DIR``) right before this one, and prints both tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "tune_quickstart.py")


def _bare(workdir: str, arg: str | None) -> dict:
    from research import config as config_lib
    from research import tune as tune_lib
    from research.run import register_all_stages
    from research.run import run

    register_all_stages()
    tune_lib._listen_compile_time()  # noqa: SLF001 - the same accounting tune uses
    config = config_lib.load_config(CONFIG + (f":{arg}" if arg else ""))
    t0, c0 = time.perf_counter(), tune_lib._compile_seconds[0]  # noqa: SLF001
    run(config, workdir, progress=False, echo=False)
    seconds = time.perf_counter() - t0
    compile_s = tune_lib._compile_seconds[0] - c0  # noqa: SLF001
    return {"seconds": seconds, "compile_seconds": compile_s, "run_seconds": seconds - compile_s}


def _tune(workdir: str, arg: str | None, trials: int, vary: str = "lr") -> list[dict]:
    from research import config as config_lib
    from research import tune as tune_lib
    from research.automl import Float
    from research.automl import Space
    from research.run import register_all_stages

    register_all_stages()
    config = config_lib.load_config(CONFIG + (f":{arg}" if arg else ""))
    config = config_lib.apply_overrides(config, ["stages.train.optimizer=adamw"])
    space = Space(
        {
            "stages.train.learning_rate": Float(3e-4, 3e-2, log=True),
            "stages.train.weight_decay": Float(1e-5, 1e-2, log=True),
            **({"stages.prune.sparsity": Float(0.3, 0.95)} if vary == "sparsity" else {}),
        }
    )
    result = tune_lib.tune(config, space, workdir, trials=trials, sampler="random", plot_every=0, echo=False)
    return [
        {k: t[k] for k in ("number", "seconds", "compile_seconds", "run_seconds")}
        for t in sorted(result.trials, key=lambda t: t["number"])
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--arg", default=None, help="config argument, e.g. smoke")
    parser.add_argument("--against", help="a checkout of another version to measure first, side by side")
    parser.add_argument(
        "--vary",
        choices=["lr", "sparsity"],
        default="lr",
        help="what the trials change: learning rate and weight decay (default), or also the pruning sparsity",
    )
    parser.add_argument("--mode", choices=["bare", "tune"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode == "bare":
        print(json.dumps(_bare(args.workdir, args.arg)))
        return
    if args.mode == "tune":
        print(json.dumps(_tune(args.workdir, args.arg, args.trials, args.vary)))
        return

    from research.report import format_table

    root = tempfile.mkdtemp(prefix="tune_overhead-")
    versions = [(os.path.abspath(args.against), "against")] if args.against else []
    for repo, name in [*versions, (ROOT, "this checkout")]:
        print(f"== {name}: {repo}")
        _report(format_table, _measure(repo, os.path.join(root, name.replace(" ", "_")), args))


def _measure(repo: str, root: str, args) -> dict:
    """Runs the bare run and the study in fresh processes of the checkout ``repo``."""
    extra = (["--arg", args.arg] if args.arg else []) + (["--vary", args.vary] if args.vary != "lr" else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
    outs = {}
    for mode in ("bare", "tune"):
        cmd = [sys.executable, "-m", "experiments.benchmarks.tune_overhead", "--mode", mode]
        cmd += ["--workdir", os.path.join(root, mode), "--trials", str(args.trials), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=repo, env=env)
        outs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    return outs


def _report(format_table, outs: dict) -> None:
    rows = [{"what": "bare slimjax run", **outs["bare"]}]
    rows += [{"what": f"tune trial {t['number']}", **t} for t in outs["tune"]]
    for r in rows:
        r["compile share"] = r["compile_seconds"] / r["seconds"]
    cols = [
        ("what", "what", "{}"),
        ("seconds", "wall s", "{:.2f}"),
        ("compile_seconds", "compile s", "{:.2f}"),
        ("run_seconds", "run s", "{:.2f}"),
        ("compile share", "compile share", "{:.1%}"),
    ]
    print(format_table(rows, cols))
    later = rows[2:]
    if later:
        worst = max(r["compile share"] for r in later)
        print(f"\ntrials 1..{len(later)}: compile share at most {worst:.1%} (target < 10%); "
              f"wall time {sum(r['seconds'] for r in later) / len(later):.2f}s per trial vs "
              f"{rows[0]['seconds']:.2f}s for a bare run")  # fmt: skip


if __name__ == "__main__":
    main()
