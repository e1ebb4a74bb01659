"""Measured chunk sizes kept on disk, so a later process skips the measurement.

Measuring a population's chunk size compiles and times programs that train nothing (on the
2-core CPU, LeNet-5 with 32 trials: about 3 s of a 22 s sweep, the sequential step's probe and
the K=32 program's compile and timings). Within a process the executor measures once per
population; :class:`ChoiceStore` keeps the figures for the next process on the same machine: a
sweep run again with other learning rates, a resumed tune study. Stored beside JAX's persistent
compilation cache by default, where the programs it chose are kept too, or in the file
``SLIMJAX_POPULATION_CHOICES`` names (:func:`default_path`).

An entry is found only for the same population program (its signature: model, data, the train
stage's fixed keys, the trial count and the executor's options) on the same machine: device kind
and count, CPU model and cores, JAX and jaxlib versions, ``XLA_FLAGS`` and the source of the
modules that build and time the programs (:func:`machine`). Anything else measures anew. A file
that cannot be read is set aside (renamed, never deleted) with a warning, and measured again.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import json
import os
import sys
import tempfile
from typing import Any

import jax

from research.population.chooser import Choice

FILE_NAME = "slimjax-population-choices.json"
ENV = "SLIMJAX_POPULATION_CHOICES"  # the file, or empty for none (the test suite sets it empty)
VERSION = 1
KEPT = 256  # entries kept per file (the oldest go first)
# The modules whose source decides what is compiled and timed: a change to one measures anew.
_PROGRAM_SOURCES = ("research/population/trainer.py", "research/population/chooser.py", "research/train/step.py")


def default_path() -> str | None:
    """``SLIMJAX_POPULATION_CHOICES`` when set (empty: ``None``, nothing stored), else
    ``slimjax-population-choices.json`` in JAX's persistent compilation cache directory
    (``jax_compilation_cache_dir`` or ``JAX_COMPILATION_CACHE_DIR``); ``None`` when none is set."""
    if (path := os.environ.get(ENV)) is not None:
        return os.path.abspath(os.path.expanduser(path)) if path else None
    directory = jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR")
    return os.path.join(os.path.abspath(os.path.expanduser(directory)), FILE_NAME) if directory else None


@functools.cache
def _sources_digest() -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    digest = hashlib.sha256()
    for name in _PROGRAM_SOURCES:
        with open(os.path.join(root, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


@functools.cache
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform  # pylint: disable=import-outside-toplevel

    return platform.processor() or platform.machine()


def machine(devices: list[jax.Device]) -> dict[str, Any]:
    """What a measured choice depends on beside the population: the devices, the host and the software."""
    import jaxlib  # pylint: disable=import-outside-toplevel

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "cpu": _cpu_model(),
        "cores": cores,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "programs": _sources_digest(),
    }


def entry_key(memo: Any, machine_: dict[str, Any]) -> str:
    """The file's key of the executor's ``memo`` (a population program and size) on ``machine_``
    (:func:`machine` of its devices)."""
    text = json.dumps({"memo": memo, "machine": machine_}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class ChoiceStore:
    """Measured choices in one JSON file: ``{"version", "entries": {key: entry}}``.

    Each entry holds the :class:`Choice` (its ``to_dict``), when it was measured, a short
    description of the population and the :func:`machine` it was measured on. Writes replace the
    file atomically (two processes writing at once lose at most one of the two entries: it is
    measured again).
    """

    def __init__(self, path: str):
        self.path = path

    def _read(self) -> dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            if (
                not isinstance(data, dict)
                or data.get("version") != VERSION
                or not isinstance(data.get("entries"), dict)
            ):
                raise ValueError(f"not a version-{VERSION} choices file")
            return data["entries"]
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            aside = f"{self.path}.unreadable-{datetime.datetime.now():%Y%m%d-%H%M%S}"
            try:
                os.replace(self.path, aside)
                moved = f"moved to {aside}"
            except OSError as why:
                moved = f"left where it is ({why})"
            print(
                f"warning: the population choices file {self.path} could not be read ({e}); {moved}; "
                "chunk sizes are measured again",
                file=sys.stderr,
            )
            return {}

    def get(self, key: str) -> tuple[Choice, dict[str, Any]] | None:
        """The stored choice for ``key`` and its entry (``measured``, ``population``), or ``None``."""
        entry = self._read().get(key)
        if entry is None:
            return None
        try:
            return Choice.from_dict(entry["choice"]), entry
        except (KeyError, TypeError, ValueError):
            return None

    def put(self, key: str, choice: Choice, *, population: str, machine_: dict[str, Any]) -> None:
        """Stores ``choice`` under ``key`` (an unwritable directory only warns: the sweep goes on)."""
        entries = self._read()
        entries[key] = {
            "choice": choice.to_dict(),
            "measured": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "population": population,
            "machine": machine_,
        }
        if len(entries) > KEPT:
            for old in sorted(entries, key=lambda k: entries[k].get("measured", ""))[: len(entries) - KEPT]:
                del entries[old]
        directory = os.path.dirname(self.path) or "."
        try:
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".choices-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump({"version": VERSION, "entries": entries}, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
        except OSError as e:
            print(f"warning: could not store the measured chunk size in {self.path}: {e}", file=sys.stderr)
