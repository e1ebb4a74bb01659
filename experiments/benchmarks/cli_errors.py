"""How long the ``slimjax`` command line takes to report a config error.

Runs each error case as a fresh ``python -m research.cli ...`` process from one or more
checkouts, interleaved (case by case, checkout by checkout, ``--repeats`` rounds), and prints
the median wall time, the exit code and the first line of the error. Value errors are reported
before JAX loads; a registry-name error needs the stage plugins, so its floor is the import of
JAX and Flax, timed as its own row.

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
        # Registry names are known once the stage plugins load (JAX and Flax).
        (
            "run quickstart --set stages.quantize.observer=bogus",
            [*cli, "run", qs, "--set", "stages.quantize.observer=bogus"],
        ),
        (
            "run quickstart --set stages.export.formats=[tflit]",
            [*cli, "run", qs, "--set", 'stages.export.formats=["tflit"]'],
        ),
        ("import jax, flax.nnx (floor)", ["-c", "import jax, flax.nnx"]),
    ]


def time_once(repo: str, argv: list[str], workdir: str, timeout: float) -> tuple[float, str, str]:
    """``(seconds, exit code, first stderr line)`` of one run from ``repo``."""
    env = {**os.environ, "PYTHONPATH": repo, "TF_CPP_MIN_LOG_LEVEL": "3"}
    # A run that gets past validation writes here, never into the checkout.
    if "run" in argv and "--workdir" not in argv and argv[:2] == ["-m", "research.cli"]:
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
        print(f"median of {args.repeats} runs; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        for r, repo in enumerate(repos):
            print(f"\n{repo}")
            print(f"{'case':<42} {'exit':>7} {'seconds':>8}  first line of stderr")
            for c, (label, _) in enumerate(all_cases):
                code, err = last[(c, r)]
                print(f"{label:<42} {code:>7} {statistics.median(times[(c, r)]):8.2f}  {err[:100]}")


if __name__ == "__main__":
    main()
