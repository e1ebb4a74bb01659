"""Timings taken in a fresh Python process: what a one-shot command pays (the benchmarks' cold figures).

The child runs ``python -m MODULE ARGS...`` and prints :func:`seconds_line` of what it timed; the
parent reads the last such line (:func:`fresh_seconds`).
"""

from __future__ import annotations

import subprocess
import sys

_PREFIX = "SECONDS "


def seconds_line(seconds: float) -> str:
    """The line a child prints for the parent."""
    return f"{_PREFIX}{seconds}"


def fresh_seconds(module: str, *args: str, what: str) -> float:
    """Seconds the child ``python -m module args...`` timed and printed with :func:`seconds_line`.

    Raises:
      RuntimeError: the child failed or printed no timing (its stderr's tail in the message, ``what`` naming it).
    """
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(_PREFIX)]
    if done.returncode or not lines:
        raise RuntimeError(f"{what} failed (rc {done.returncode}): {done.stderr[-2000:]}")
    return float(lines[-1][len(_PREFIX) :])
