"""Timings taken in a fresh Python process: what a one-shot command pays (the benchmarks' cold figures).

The child runs ``python -m MODULE ARGS...`` and prints :func:`seconds_line` of what it timed; the
parent reads the last such line (:func:`fresh_seconds`, or :func:`fresh_timing` with the child's note).
"""

from __future__ import annotations

import os
import subprocess
import sys

_PREFIX = "SECONDS "


_NOTE = " | "


def seconds_line(seconds: float, note: str = "") -> str:
    """The line a child prints for the parent (``note``: one line the parent gets back with the
    seconds, e.g. what the child chose)."""
    return f"{_PREFIX}{seconds}" + (f"{_NOTE}{note}" if note else "")


CACHE_VARIABLES = (
    "JAX_COMPILATION_CACHE_DIR",
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES",
)


def fresh_seconds(module: str, *args: str, what: str, cache_dir: str | None = None) -> float:
    """Seconds the child ``python -m module args...`` timed and printed with :func:`seconds_line`
    (:func:`fresh_timing` without the note)."""
    return fresh_timing(module, *args, what=what, cache_dir=cache_dir)[0]


def fresh_timing(module: str, *args: str, what: str, cache_dir: str | None = None) -> tuple[float, str]:
    """``(seconds, note)`` the child ``python -m module args...`` printed with :func:`seconds_line`.

    The child runs without a persistent compilation cache (a cold process compiles everything, also
    when this process's environment sets one), or with ``cache_dir`` as its cache, every program
    kept in it however fast it compiled.

    Raises:
      RuntimeError: the child failed or printed no timing (its stderr's tail in the message, ``what`` naming it).
    """
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES}
    if cache_dir is not None:
        env.update(dict(zip(CACHE_VARIABLES, (cache_dir, "0", "0"), strict=True)))
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, check=False, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(_PREFIX)]
    if done.returncode or not lines:
        raise RuntimeError(f"{what} failed (rc {done.returncode}): {done.stderr[-2000:]}")
    seconds, _, note = lines[-1][len(_PREFIX) :].partition(_NOTE)
    return float(seconds), note
