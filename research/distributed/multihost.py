"""One run trained data-parallel over several processes (hosts) with ``jax.distributed``.

Every process runs the same command on the same config; :func:`initialize` joins them into one
JAX runtime (``jax.distributed.initialize``; on CPUs with the gloo collectives), so
``jax.devices()`` lists the devices of every process. A train stage with ``data_parallel=True``
then splits each step's batch over all of them
(:func:`research.train.multiprocess.global_data_parallel_step`): every process
draws the same batch (the batch sampler is seeded), keeps its slice, and XLA all-reduces the
gradients across processes; the train state stays replicated, so every process holds the same
parameters after every step. Everything else in the run (evaluation, checkpoints, the report) is
computed by each process on its own copy: process 0 writes the run directory, process ``i > 0``
writes ``WORKDIR.process<i>`` (the same numbers; a rerun resumes each from its checkpoints).

Launch, one command per host (the coordinator is process 0's host and a free port)::

    python -m research.distributed.multihost --coordinator 10.0.0.1:7777 --num-processes 2 \\
        --process-id 0 configs/quickstart.py --set stages.train.data_parallel=True --workdir runs/mh
    python -m research.distributed.multihost --coordinator 10.0.0.1:7777 --num-processes 2 \\
        --process-id 1 configs/quickstart.py --set stages.train.data_parallel=True --workdir runs/mh

or the same variables in the environment (``SLIMJAX_COORDINATOR``, ``SLIMJAX_NUM_PROCESSES``,
``SLIMJAX_PROCESS_ID``, e.g. from a cluster scheduler). ``--local N`` starts N processes on this
machine (one CPU device each unless ``XLA_FLAGS`` says otherwise) to try it out::

    python -m research.distributed.multihost --local 2 configs/quickstart.py:smoke \\
        --set stages.train.data_parallel=True --workdir runs/mh_local
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

ENV_COORDINATOR = "SLIMJAX_COORDINATOR"
ENV_NUM_PROCESSES = "SLIMJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "SLIMJAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands in a multi-process run."""

    coordinator: str
    num_processes: int
    process_id: int
    device_count: int
    local_device_count: int
    backend: str
    device: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _from_env(value, name: str, cast):
    if value is not None:
        return value
    text = os.environ.get(name)
    if text is None:
        return None
    try:
        return cast(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a valid {cast.__name__}") from None


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    timeout_s: int = 300,
) -> ProcessInfo:
    """Joins this process to a multi-process JAX runtime (call it before any JAX computation).

    Args:
      coordinator: ``HOST:PORT`` of process 0 (default ``$SLIMJAX_COORDINATOR``).
      num_processes: how many processes take part (default ``$SLIMJAX_NUM_PROCESSES``).
      process_id: this process's index, ``0 <= process_id < num_processes`` (default
        ``$SLIMJAX_PROCESS_ID``).
      local_device_ids: the local devices this process uses (default: all).
      timeout_s: how long to wait for the other processes.

    Returns:
      The :class:`ProcessInfo` (global and local device counts, backend, device kind).

    Raises:
      ValueError: a missing or inconsistent argument (named, with the environment variable to set).
    """
    import jax

    coordinator = _from_env(coordinator, ENV_COORDINATOR, str)
    num_processes = _from_env(num_processes, ENV_NUM_PROCESSES, int)
    process_id = _from_env(process_id, ENV_PROCESS_ID, int)
    missing = [
        f"{arg} (or ${env})"
        for arg, env, value in (
            ("coordinator", ENV_COORDINATOR, coordinator),
            ("num_processes", ENV_NUM_PROCESSES, num_processes),
            ("process_id", ENV_PROCESS_ID, process_id),
        )
        if value is None
    ]
    if missing:
        raise ValueError(f"multi-process run: give {', '.join(missing)}")
    if ":" not in coordinator or not coordinator.rpartition(":")[2].isdigit():
        raise ValueError(f"coordinator={coordinator!r} must be HOST:PORT of process 0, e.g. 10.0.0.1:7777")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    # CPU devices of different processes talk through gloo (JAX's default CPU client has no
    # cross-process collectives); GPUs and TPUs use their own (NCCL, ICI) whatever this says.
    with contextlib.suppress(AttributeError, ValueError):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=list(local_device_ids) if local_device_ids is not None else None,
        initialization_timeout=timeout_s,
    )
    return process_info(coordinator)


def process_info(coordinator: str = "") -> ProcessInfo:
    """This process's :class:`ProcessInfo` (one process: ``num_processes == 1``)."""
    import jax

    return ProcessInfo(
        coordinator=coordinator,
        num_processes=jax.process_count(),
        process_id=jax.process_index(),
        device_count=jax.device_count(),
        local_device_count=jax.local_device_count(),
        backend=jax.default_backend(),
        device=jax.devices()[0].device_kind,
    )


def process_workdir(workdir: str, process_id: int) -> str:
    """Process 0 writes ``workdir``; process ``i`` writes ``workdir.process<i>``."""
    return workdir if process_id == 0 else f"{workdir.rstrip(os.sep)}.process{process_id}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(n: int, argv: Sequence[str], *, timeout_s: float | None = None) -> int:
    """Runs ``main(argv)`` in ``n`` processes on this machine (process ids 0..n-1); returns the worst exit code."""
    port = _free_port()
    procs = []
    for i in range(n):
        env = {
            **os.environ,
            ENV_COORDINATOR: f"127.0.0.1:{port}",
            ENV_NUM_PROCESSES: str(n),
            ENV_PROCESS_ID: str(i),
        }
        procs.append(subprocess.Popen([sys.executable, "-m", "research.distributed.multihost", *argv], env=env))
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=timeout_s))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return max(codes, key=abs) if codes else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m research.distributed.multihost [--local N | --coordinator ...] CONFIG [--set ...] --workdir W``."""
    parser = argparse.ArgumentParser(
        prog="python -m research.distributed.multihost",
        description="Run one config data-parallel over several processes (jax.distributed).",
    )
    parser.add_argument("config", help="path/to/config.py[:arg]; its train stage needs data_parallel=True")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    parser.add_argument("--workdir", required=True, help="run directory of process 0 (process i: WORKDIR.process<i>)")
    parser.add_argument("--local", type=int, metavar="N", help="start N processes on this machine")
    parser.add_argument("--coordinator", help=f"HOST:PORT of process 0 (or ${ENV_COORDINATOR})")
    parser.add_argument("--num-processes", type=int, help=f"number of processes (or ${ENV_NUM_PROCESSES})")
    parser.add_argument("--process-id", type=int, help=f"this process's index (or ${ENV_PROCESS_ID})")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    if args.local is not None:
        if args.local < 1:
            parser.error(f"--local {args.local}: give at least 1 process")
        rest = [args.config, "--workdir", args.workdir, *(f"--set={s}" for s in args.set or [])]
        return launch_local(args.local, [*rest, *(["--no-progress"] if args.no_progress else [])])
    try:
        info = initialize(args.coordinator, args.num_processes, args.process_id)
    except ValueError as e:
        print(f"multihost: {e}", file=sys.stderr)
        return 2
    from research import config as config_lib
    from research.run import register_all_stages
    from research.run import run

    register_all_stages()
    config = config_lib.apply_overrides(config_lib.load_config(args.config), args.set or [])
    if info.num_processes > 1 and not any(getattr(s, "data_parallel", False) for s in config.stages):
        print(
            f"multihost: {info.num_processes} processes but no stage of {args.config} has data_parallel=True; "
            "each would train its own copy. Add --set stages.train.data_parallel=True",
            file=sys.stderr,
        )
        return 2
    workdir = process_workdir(args.workdir, info.process_id)
    report = run(config, workdir, progress=not args.no_progress and info.process_id == 0, echo=info.process_id == 0)
    from research import report as report_lib

    report_lib.write_text_atomic(os.path.join(workdir, "multihost.json"), json.dumps(info.to_dict(), indent=2) + "\n")
    if info.process_id == 0:
        metrics = report["stages"][-1]["metrics"]
        print(
            f"multihost: {info.num_processes} processes, {info.device_count} {info.device} devices; "
            f"test acc {metrics['test_accuracy']:.4f}; run directory {workdir}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
