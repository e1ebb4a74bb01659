"""How long the ``slimjax`` command line takes to report a config error.

Runs each error case as a fresh ``python -m research.cli ...`` process from one or more
checkouts, interleaved (case by case, checkout by checkout, ``--repeats`` rounds), and prints
the median wall time, the exit code and the first line of the error. Value errors, misspelt
registry names (checked against the names declared in ``research.names`` and
``methods.<package>.names``) and rules that a config file builds are reported before JAX loads;
the import of JAX and Flax is timed as its own row (the floor of an error found after it).

Usage:
  python -m experiments.benchmarks.cli_errors                       # this checkout
  python -m experiments.benchmarks.cli_errors --repo /work/main     # this checkout vs another
  python -m experiments.benchmarks.cli_errors --repeats 5

A case that trains in an older checkout (``latency_batch_size=0`` is only caught after training
there) is stopped after ``--timeout`` seconds (default 30) and shown as ``timeout``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cases(tmp: str) -> list[tuple[str, list[str]]]:
    """``(label, argv after python)`` of every timed case."""
    syntax = os.path.join(tmp, "syntax_error.py")
    with open(syntax, "w") as f:
        f.write("def get_config(arg=None)\n    return 1\n")
    bad_rule = os.path.join(tmp, "bad_rule.py")
    with open(bad_rule, "w") as f:
        f.write(
            "from methods.decomposition import DecomposeStage, DecompositionRule\n"
            "from research.config import Config\n\n"
            "def get_config(arg=None):\n"
            "    return Config(stages=(DecomposeStage(rules=(DecompositionRule(pattern='conv', energy=1.5),)),))\n"
        )
    cli = ["-m", "research.cli"]
    qs = "configs/quickstart.py"
    return [
        ("run missing.py", [*cli, "run", os.path.join(tmp, "missing.py")]),
        ("run syntax_error.py", [*cli, "run", syntax]),
        ("run quickstart --set seed", [*cli, "run", qs, "--set", "seed"]),
        ("sweep quickstart --grid x", [*cli, "sweep", qs, "--grid", "x"]),
        ("run quickstart --set stages.0.stepz=3", [*cli, "run", qs, "--set", "stages.0.stepz=3"]),
        ("run quickstart --set latency_batch_size=0", [*cli, "run", qs, "--set", "latency_batch_size=0"]),
        (
            "run quickstart --set stages.prune.train.learning_rate=-1",
            [*cli, "run", qs, "--set", "stages.prune.train.learning_rate=-1"],
        ),
        ("run quickstart --set data.val_fraction=1.5", [*cli, "run", qs, "--set", "data.val_fraction=1.5"]),
        # Registry names (declared without JAX in research.names, methods.<package>.names).
        (
            "run quickstart --set stages.quantize.observer=bogus",
            [*cli, "run", qs, "--set", "stages.quantize.observer=bogus"],
        ),
        (
            "run quickstart --set stages.export.formats=[tflit]",
            [*cli, "run", qs, "--set", 'stages.export.formats=["tflit"]'],
        ),
        (
            "run quickstart --set stages.export.quantize=[int9]",
            [*cli, "run", qs, "--set", 'stages.export.quantize=["int9"]'],
        ),
        (
            "run quickstart --set stages.prune.scorer=magnitud",
            [*cli, "run", qs, "--set", "stages.prune.scorer=magnitud"],
        ),
        ("run quickstart --set model.name=lenet", [*cli, "run", qs, "--set", "model.name=lenet"]),
        ("run quickstart --set data.name=digit", [*cli, "run", qs, "--set", "data.name=digit"]),
        (
            "sweep quickstart --grid stages.quantize.observer=mse,bogus",
            [*cli, "sweep", qs, "--grid", "stages.quantize.observer=mse,bogus"],
        ),
        # A rule that the config file builds refuses its value (the rule classes load without JAX).
        ("run bad_rule.py (DecompositionRule energy=1.5)", [*cli, "run", bad_rule]),
        ("import jax, flax.nnx (floor)", ["-c", "import jax, flax.nnx"]),
    ]


def time_once(repo: str, argv: list[str], workdir: str, timeout: float) -> tuple[float, str, str]:
    """``(seconds, exit code, first stderr line)`` of one run from ``repo``."""
    env = {**os.environ, "PYTHONPATH": repo, "TF_CPP_MIN_LOG_LEVEL": "3"}
    # A run or sweep that gets past validation writes here, never into the checkout.
    if ("run" in argv or "sweep" in argv) and "--workdir" not in argv and argv[:2] == ["-m", "research.cli"]:
        argv = [*argv, "--workdir", workdir]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, *argv], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return time.perf_counter() - t0, "timeout", ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if len(lines) > 1:
        first += f"  (+{len(lines) - 1} lines)"
    return time.perf_counter() - t0, str(proc.returncode), first


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", action="append", default=[], help="another checkout to time side by side")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    repos = [ROOT, *args.repo]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        all_cases = cases(tmp)
        times: dict[tuple[int, int], list[float]] = {}
        last: dict[tuple[int, int], tuple[str, str]] = {}
        for _ in range(args.repeats):
            for c, (_, case_argv) in enumerate(all_cases):
                for r, repo in enumerate(repos):
                    seconds, code, err = time_once(repo, case_argv, os.path.join(tmp, f"w{r}"), args.timeout)
                    times.setdefault((c, r), []).append(seconds)
                    last[(c, r)] = (code, err)
        load_after = os.getloadavg()[0]
        print(
            f"median of {args.repeats} runs; load average {load_before:.1f} before, {load_after:.1f} after, "
            f"on {os.cpu_count()} CPUs"
        )
        for r, repo in enumerate(repos):
            print(f"[{r}] {repo}")
        width = max(len(label) for label, _ in all_cases)
        head = "".join(f" {f'[{r}] exit':>9} {f'[{r}] s':>7}" for r in range(len(repos)))
        print(f"\n{'case':<{width}}{head}  first line of stderr ([0]; [r] below where it differs)")
        for c, (label, _) in enumerate(all_cases):
            cols = "".join(f" {last[(c, r)][0]:>9} {statistics.median(times[(c, r)]):7.2f}" for r in range(len(repos)))
            print(f"{label:<{width}}{cols}  {last[(c, 0)][1][:110]}")
            for r in range(1, len(repos)):
                if last[(c, r)][1] != last[(c, 0)][1]:
                    print(f"{'':<{width}}{' ' * len(cols)}  [{r}] {last[(c, r)][1][:110]}")


if __name__ == "__main__":
    main()
