"""Shared pytest settings and fixtures of the whole suite.

* ``digits``: the digits dataset (seed 0, every split), loaded once per session, read-only.
* ``tempfiles_under_pytest_tmp``: temporary files (converter diagnostics) go under pytest's temporary directory.
* ``xla_flags_for``: the run's ``XLA_FLAGS`` with another number of host devices (subprocesses).
* ``x64``: runs a test in float64 and restores the previous setting afterwards.
* The export extras: test modules listed in :data:`NEEDS_EXPORT` are reported as skipped (not
  collected, so their imports of TensorFlow / ONNX never run) when TensorFlow is missing.
* The ``slow`` marker (registered in pyproject.toml): long end-to-end tests. CI runs them all;
  ``pytest -m "not slow"`` is a quick local pass.
* One XLA CPU compute thread per process (``NPROC=1``): the same numbers on any number of cores.
* XLA compiles for compile time, not run time (``XLA_FLAGS``, :func:`_suite_xla_flags`).
* One persistent JAX compilation cache for the whole run (:func:`_share_one_compilation_cache`).
* Parameter initialisation draws random numbers through one compiled program per size bucket
  instead of one per shape, with bit-identical values (``tests/shared_random_programs.py``,
  installed by the autouse fixture :func:`_shared_random_programs`).
* pytest-xdist runs by default (``-n auto --dist loadscope`` in pyproject.toml's addopts):
  :func:`pytest_xdist_auto_num_workers` picks the number of worker processes (``-n 0``: none).

Nothing here imports JAX at collection time; fixtures import what they need when first used.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

# XLA compiles the suite's programs for compile time, not run time (:func:`_suite_xla_flags`). Most
# of the suite's time is compiling many small programs that then run a few steps. Two flags:
# * ``--xla_backend_optimization_level=0``: no LLVM optimisation (XLA's own HLO passes, fusion
#   included, still run). Back to back from one clone on an idle 2-core EPYC (AVX2), the whole suite
#   took 692.9 s with XLA's defaults and 522.6 s with it (1,191 s and 878 s of user CPU).
# * ``--xla_cpu_use_fusion_emitters=false``: the older loop emitters for fusions, which compile
#   faster (what research.automl._numerics.CPU_COMPILE_OPTIONS gives the samplers' programs). On
#   tests/methods/test_composition.py + tests/research/test_train.py, alternated twice with the
#   level-0 flag alone: 120.8 / 120.4 s of user CPU without it, 82.1 / 80.6 s with it. Newer XLA
#   releases dropped the flag, and an XLA_FLAGS entry that XLA does not know aborts the process, so
#   it is used only where a probe accepts it.
# What the flags change is rounding, which no test may depend on: the suite passes with XLA's
# defaults too (the int8 export tests check stored weights, tests/trained_models.py, because a
# fine-tuning in the test moved an int8 agreement across its bound). To run it with XLA's defaults,
# set XLA_FLAGS yourself:
#   XLA_FLAGS=--xla_force_host_platform_device_count=1 python -m pytest
SUITE_XLA_FLAGS = "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"
#: Flags added to :data:`SUITE_XLA_FLAGS` where this XLA knows them.
OPTIONAL_XLA_FLAGS = ("--xla_cpu_use_fusion_emitters=false",)


def _suite_xla_flags() -> None:
    """Sets ``XLA_FLAGS`` for the run unless it is set already (by the user, or by the xdist
    controller for its workers): :data:`SUITE_XLA_FLAGS`, plus :data:`OPTIONAL_XLA_FLAGS` when a
    CPU backend started with them in a subprocess accepts them (one probe of ~2 s per run)."""
    if "XLA_FLAGS" in os.environ:
        return
    flags = SUITE_XLA_FLAGS
    optional = " ".join(OPTIONAL_XLA_FLAGS)
    env = {**os.environ, "XLA_FLAGS": f"{flags} {optional}", "JAX_PLATFORMS": "cpu"}
    probe = [sys.executable, "-c", "import jax; jax.devices('cpu')"]
    try:
        accepted = subprocess.run(probe, env=env, capture_output=True, timeout=300).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        accepted = False
    os.environ["XLA_FLAGS"] = f"{flags} {optional}" if accepted else flags


_suite_xla_flags()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One XLA CPU compute thread per process (XLA sizes its CPU thread pool from NPROC, else from the
# core count), in the test processes and everything they start (Ray workers, CLI runs), so that
# a test computes the same numbers on every machine: summation order follows the thread count,
# and a model trained on a 2-core machine differed from the same training on 1 or 4 cores (the
# ViT's trained weights differed for NPROC=1, 2 and 4; its int8 agreement moved by up to 0.016).
# It does not make the suite faster: side by side, half the suite took 616 s of user CPU with
# NPROC=1 and 620 s with 2 (the xdist workers already fill the cores). NPROC=<n> overrides it.
os.environ.setdefault("NPROC", "1")

#: The persistent compilation cache this process made for the session (removed at its end), or
#: None when the cache directory came from the environment (a user's, or the xdist controller's).
_SUITE_JAX_CACHE: str | None = None


def _share_one_compilation_cache() -> None:
    """Points JAX's persistent compilation cache of the whole run at one fresh directory.

    Most of the suite's time is XLA compiling, and many tests compile the same programs in
    different processes: both xdist workers, and every CLI, Ray or multi-host subprocess a test
    starts (they inherit the environment). A program is then compiled once per run and loaded
    from disk elsewhere. The directory is made by the first process (the xdist controller),
    inherited by the workers and subprocesses, and deleted when the run ends; a clean clone starts
    with an empty cache, so no result depends on an earlier run. A ``JAX_COMPILATION_CACHE_DIR``
    already set is used as is (``JAX_COMPILATION_CACHE_DIR=`` with an empty value: no cache).
    """
    global _SUITE_JAX_CACHE
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    _SUITE_JAX_CACHE = tempfile.mkdtemp(prefix="slimjax-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SUITE_JAX_CACHE
    # Every program, however fast it compiles: the many small eager ops (parameter init) add up.
    # The quickstart's smoke run on a warm cache: 14.1 s CPU with 0, 15.6 s with 0.1, 27.7 s without.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


_share_one_compilation_cache()
# The population executor keeps measured chunk sizes beside the compilation cache for later
# processes (research.population.choices); in the suite a test's choice must not depend on which
# test measured the same population first, so none is kept (the store's tests name their file).
os.environ.setdefault("SLIMJAX_POPULATION_CHOICES", "")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SUITE_JAX_CACHE is not None:
        shutil.rmtree(_SUITE_JAX_CACHE, ignore_errors=True)


TESTS = pathlib.Path(__file__).resolve().parent

#: Test modules (paths relative to ``tests/``; a directory ends in ``/``) that need the export
#: extras: TensorFlow, LiteRT, tf2onnx, ONNX and onnxruntime.
NEEDS_EXPORT = ("research/export/", "methods/quantization/test_quant_deploy.py")
EXPORT_SKIP = "export extras not installed: pip install 'slimjax[export]'"


def _needs_export(path: pathlib.Path) -> bool:
    try:
        rel = path.resolve().relative_to(TESTS).as_posix()
    except ValueError:
        return False
    return any(rel.startswith(p) if p.endswith("/") else rel == p for p in NEEDS_EXPORT)


class _SkippedModule(pytest.Module):
    """A test module reported as skipped without importing it."""

    def collect(self):
        pytest.skip(EXPORT_SKIP, allow_module_level=True)


def pytest_pycollect_makemodule(module_path: pathlib.Path, parent: pytest.Collector) -> pytest.Module | None:
    if _needs_export(module_path) and importlib.util.find_spec("tensorflow") is None:
        return _SkippedModule.from_parent(parent, path=module_path)
    return None


@pytest.fixture(scope="session", autouse=True)
def _shared_random_programs():
    """Installs tests/shared_random_programs.py for the session (each xdist worker is a session).

    ``SLIMJAX_TESTS_JAX_RANDOM=own`` leaves JAX's functions alone (its identity tests then fail,
    saying so): for comparing the suite's time with and without the shared programs.
    """
    import shared_random_programs

    own = os.environ.get("SLIMJAX_TESTS_JAX_RANDOM", "") == "own"
    installed = False if own else shared_random_programs.install()
    yield installed
    if installed:
        shared_random_programs.uninstall()


@pytest.fixture(scope="session")
def digits():
    """The digits dataset (seed 0): 8x8x1 images, 10 classes, read-only arrays shared by the session."""
    from research.data import load_dataset

    ds = load_dataset("digits", seed=0)
    for value in vars(ds).values():
        if hasattr(value, "flags"):
            value.flags.writeable = False
    return ds


@pytest.fixture
def tempfiles_under_pytest_tmp(tmp_path_factory, monkeypatch):
    """Python's ``tempfile`` default directory is a fresh directory under pytest's base temporary
    directory for the test (beside ``tmp_path``, whose listing tests check), removed with it.

    A conversion that fails with a long converter message saves it to a temporary file that the
    error names (``research.export._trace``); a user keeps it, a test should not leave it in /tmp.
    """
    import tempfile

    where = tmp_path_factory.mktemp("tempfile")
    monkeypatch.setattr(tempfile, "tempdir", str(where))
    return where


@pytest.fixture
def xla_flags_for():
    """``xla_flags_for(n)``: this run's ``XLA_FLAGS`` (:func:`_suite_xla_flags`) with ``n`` host
    CPU devices, for a subprocess that needs its own device count."""

    def flags(devices: int) -> str:
        others = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
        return f"{others.strip()} --xla_force_host_platform_device_count={devices}".strip()

    return flags


@pytest.fixture
def x64():
    """Runs a test in float64 and restores the previous setting afterwards."""
    import jax

    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker per CPU, at most 4 (each worker holds JAX and TensorFlow in memory);
    none, so the tests run in this process, when one test file is named."""
    files = {str(a).split("::")[0] for a in config.args}
    if len(files) == 1 and os.path.isfile(next(iter(files))):
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cpus))
