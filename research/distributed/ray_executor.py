"""The Ray executor: each sweep point or tune trial is one Ray task with declared resources.

``slimjax sweep|tune ... --executor ray [--address auto|HOST:PORT] [--cpus-per-trial N]
[--gpus-per-trial F]``, or ``sweep(..., executor=RayExecutor(address="auto"))`` from Python.

What runs where:

- The driver (the process that called ``sweep``/``tune``) alone owns the study (SQLite stays on the
  driver's disk; workers never open it) and the sweep files. It asks the sampler, submits trials
  and tells the study what comes back.
- A worker runs :func:`research.executors.run_one` on the trial's config in the trial's run
  directory (or, with ``population_chunk=K`` in a sweep, the population executor on K trials): the workdir must be on a file system every node sees (NFS, a shared volume); on one
  machine it always is. The report comes back to the driver as the task's result.
- Without an address a local Ray instance is started (all local CPUs and GPUs) and shut down when
  the executor is closed; ``address="auto"`` joins the cluster ``ray start --head`` started on this
  machine; ``HOST:PORT`` joins that cluster's GCS. A Ray already initialised in this process is used
  as it is (and left running).

JAX on the workers: with a fraction of a GPU per trial (``gpus_per_trial=0.5``) each trial's JAX
may take only its share of the device memory (``XLA_PYTHON_CLIENT_MEM_FRACTION``, 90% of the share)
instead of preallocating 75% of it; with whole GPUs each worker sees only the devices Ray assigned
(Ray sets ``CUDA_VISIBLE_DEVICES``; a GPU trial's worker process exits after the trial, so the next
trial's JAX starts on its own devices); with no GPU declared JAX runs on the CPU
(``JAX_PLATFORMS=cpu``) so a CPU trial never grabs a GPU another trial was given. Variables the user
set in the driver's environment win. The device kind is in each run's ``report.json``
(``environment.device``); the Ray placement of every attempt (host, pid, GPU ids,
``CUDA_VISIBLE_DEVICES``) is in ``RUN_DIR/ray_task.json``.

Failures: a trial that raises is an ordinary failed :class:`~research.executors.Outcome` (its
traceback in ``RUN_DIR/error.txt``). A worker process that dies mid-trial (SIGKILL, out of memory,
a lost node) is retried by Ray up to ``max_retries`` times; the retry resumes the run from its last
checkpoint (run directories resume). After the last retry the trial is failed with the reason.
Ctrl-C cancels the submitted tasks. A killed driver loses nothing finished: run directories are
complete when their report is written, and a rerun of the same command reads them back.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

from research import config as config_lib
from research import report as report_lib
from research.executors import Job
from research.executors import Outcome
from research.executors import finished_report

INSTALL_HINT = 'pip install "slimjax[ray]"'
TASK_FILE = "ray_task.json"
# Environment variables the driver forwards to its workers when it has them set.
_FORWARDED = (
    "XLA_PYTHON_CLIENT_PREALLOCATE",
    "XLA_PYTHON_CLIENT_MEM_FRACTION",
    "XLA_PYTHON_CLIENT_ALLOCATOR",
    "XLA_FLAGS",
    "JAX_PLATFORMS",
    "JAX_ENABLE_X64",
)
_CONNECT_TIMEOUT_S = 5.0


def import_ray():
    """``ray``, or a one-line :class:`~research.config.ConfigError` saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise config_lib.ConfigError(
            f"executor='ray' needs Ray, which is not installed ({e}); install it with {INSTALL_HINT}"
        ) from None
    return ray


def worker_environment(gpus_per_trial: float, driver_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment variables a trial's worker process starts with (JAX memory and devices).

    Args:
      gpus_per_trial: the GPUs each trial declares (0, a fraction, or a whole number).
      driver_env: the driver's environment (default ``os.environ``); the variables of
        ``_FORWARDED`` it sets are passed on unchanged and win over the defaults below.

    Returns:
      ``{name: value}``: ``JAX_PLATFORMS=cpu`` without GPUs; ``XLA_PYTHON_CLIENT_MEM_FRACTION`` of
      90% of the share with a fraction of a GPU; preallocation left on with whole GPUs (each worker
      owns its devices).

    Example:
      >>> worker_environment(0.5, {})
      {'XLA_PYTHON_CLIENT_PREALLOCATE': 'true', 'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.45'}
    """
    driver_env = os.environ if driver_env is None else driver_env
    env: dict[str, str] = {}
    if gpus_per_trial <= 0:
        env["JAX_PLATFORMS"] = "cpu"
    elif gpus_per_trial < 1:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "true"
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 * gpus_per_trial:.4g}"
    for name in _FORWARDED:
        if name in driver_env:
            env[name] = driver_env[name]
    return env


def _parse_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of a ``HOST:PORT`` GCS address, or a ConfigError saying what to give."""
    if not isinstance(address, str):
        raise config_lib.ConfigError(f"address={address!r} must be a string: 'auto' or HOST:PORT")
    host, sep, port = address.rpartition(":")
    if address.startswith("ray://"):
        raise config_lib.ConfigError(
            f"address={address!r}: Ray Client addresses (ray://) are not supported; run the driver on a cluster "
            "node and give the GCS address HOST:PORT (default port 6379) or 'auto'"
        )
    if not sep or not host or not port.isdigit():
        raise config_lib.ConfigError(
            f"address={address!r} is not 'auto' or HOST:PORT (the GCS address `ray start --head` prints, e.g. "
            "10.0.0.1:6379); omit it to start a local Ray"
        )
    return host, int(port)


# An HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (Ray's GCS) answers with its
# own SETTINGS frame (9-byte header, type 0x04) at once.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _check_address(address: str) -> None:
    """Fails within seconds when no Ray GCS answers at ``HOST:PORT`` (``ray.init`` would wait much longer).

    Nothing listening is a refused connection; a listener that is not a gRPC server (a web
    server, a database, a silent port) is found by the HTTP/2 handshake every gRPC server
    answers, so a wrong port is refused too instead of ``ray.init`` retrying for half a minute.
    """
    host, port = _parse_address(address)
    hint = "start one with `ray start --head` on that host, check the GCS port it printed, or omit the address to start a local Ray"
    try:
        with socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT_S) as conn:
            conn.sendall(_H2_PREFACE)
            answer = b""
            with contextlib.suppress(TimeoutError, OSError):
                while len(answer) < 9:
                    chunk = conn.recv(9 - len(answer))
                    if not chunk:
                        break
                    answer += chunk
    except OSError as e:
        raise config_lib.ConfigError(f"address={address!r}: no Ray cluster answers there ({e}); {hint}") from None
    if len(answer) < 9 or answer[3] != 0x04:
        heard = f"it answered {answer[:16]!r}" if answer else f"it sent nothing within {_CONNECT_TIMEOUT_S:g} s"
        raise config_lib.ConfigError(
            f"address={address!r}: something listens there but it is not a Ray GCS (no gRPC handshake: {heard}); {hint}"
        )


def _record_attempt(run_dir: str, placement: dict[str, Any]) -> int:
    """Appends this attempt to ``RUN_DIR/ray_task.json``; returns its number (1 for the first)."""
    path = os.path.join(run_dir, TASK_FILE)
    attempts: list[dict[str, Any]] = []
    with contextlib.suppress(OSError, json.JSONDecodeError, KeyError):
        with open(path) as f:
            attempts = list(json.load(f)["attempts"])
    placement = {"attempt": len(attempts) + 1, **placement}
    attempts.append(placement)
    report_lib.write_text_atomic(path, json.dumps({"attempts": attempts}, indent=2) + "\n")
    return placement["attempt"]


def _finish_attempt(run_dir: str, attempt: int, changes: Mapping[str, Any]) -> None:
    path = os.path.join(run_dir, TASK_FILE)
    with open(path) as f:
        data = json.load(f)
    data["attempts"][attempt - 1].update(changes)
    report_lib.write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def _portable(error: BaseException | None) -> BaseException | None:
    """``error`` if the driver can rebuild it, else a RuntimeError naming it.

    An exception travels back to the driver as its type (found again by module and qualified
    name) called with its ``args``, so a local class, or one whose constructor needs other
    arguments, would fail on the driver with an error about serialisation instead of the
    trial's own. This checks both conditions here, in the worker, without pickling.
    """
    if error is None:
        return None
    kind = type(error)
    owner = sys.modules.get(kind.__module__)
    found = owner
    for part in kind.__qualname__.split("."):
        found = getattr(found, part, None)
    try:
        if found is not kind:
            raise TypeError("not importable by name")
        kind(*error.args)
        return error
    except Exception:  # an exception type the driver cannot rebuild
        return RuntimeError(f"{kind.__name__}: {error}")


class _InterruptLatch:
    """Ctrl-C that the driver cannot lose.

    Python raises KeyboardInterrupt wherever the main thread is when the signal lands; inside a
    garbage-collector callback (JAX registers one) or a ``__del__`` it is printed as "Exception
    ignored" and dropped, and the driver would go on submitting trials. This handler also records
    the signal, and the executor raises it again at its next safe point (waiting for a trial,
    submitting one). It is installed only over Python's default handler, from the main thread.
    """

    def __init__(self) -> None:
        self.pending = False
        self._previous: Any = None

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self.pending = True
        raise KeyboardInterrupt

    def install(self) -> None:
        if self._previous is not None or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def uninstall(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
        self._previous = None

    def check(self) -> None:
        """Raises the KeyboardInterrupt a Ctrl-C left behind (once)."""
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


def _placement(started: float) -> dict[str, Any]:
    """Where a Ray task runs: host, pid, node, GPU ids, ``CUDA_VISIBLE_DEVICES``, JAX settings, slimjax path."""
    import ray

    ctx = ray.get_runtime_context()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "node_id": ctx.get_node_id(),
        "gpu_ids": [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "jax_env": {k: os.environ[k] for k in _FORWARDED if k in os.environ},
        "research": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),  # which slimjax the worker ran
        "started": started,
        "status": "running",
    }


def run_trial(key: int, config: config_lib.Config, run_dir: str, first_submit: float) -> dict[str, Any]:
    """The body of one Ray task (runs on a worker): the trial through :func:`research.executors.run_one`.

    Records the attempt (host, pid, GPU ids, ``CUDA_VISIBLE_DEVICES``, JAX memory settings) in
    ``RUN_DIR/ray_task.json`` before training, so a retried trial shows each attempt.

    Returns:
      ``{"report", "error", "traceback", "seconds", "reused", "attempt", "placement", "queued_s"}``.
    """
    started = time.time()
    os.makedirs(run_dir, exist_ok=True)
    placement = _placement(started)
    # What a retry resumes from: the checkpoints the run directory already holds.
    checkpoints = glob.glob(os.path.join(run_dir, "stages", "*", "checkpoints", "*"))
    placement["checkpoints_at_start"] = sorted(os.path.relpath(p, run_dir) for p in checkpoints)
    attempt = _record_attempt(run_dir, placement)
    from research.executors import run_one

    out = run_one(Job(key=key, config=config, run_dir=run_dir))
    device = (out.report or {}).get("environment", {}).get("device")
    if device is None:  # a failed run: ask JAX directly (it is imported by now)
        with contextlib.suppress(Exception):
            import jax

            device = jax.devices()[0].device_kind
    status = "done" if out.report is not None else "failed"
    _finish_attempt(run_dir, attempt, {"status": status, "device": device, "seconds": out.seconds})
    placement.update(device=device, status=status)
    return {
        "report": out.report,
        "error": _portable(out.error),
        "traceback": out.traceback,
        "seconds": out.seconds,
        "reused": out.reused,
        "attempt": attempt,
        "placement": placement,
        "queued_s": max(started - first_submit, 0.0),
    }


def run_chunk(
    keys: Sequence[int],
    configs: Sequence[config_lib.Config],
    run_dirs: Sequence[str],
    first_submit: float,
    population: Mapping[str, Any],
) -> dict[str, Any]:
    """The body of one Ray task that trains several trials as a population (runs on a worker).

    The trials go through :class:`research.population.executor.PopulationExecutor` (``population``
    are its options; its chooser still falls back to one after another when vmap does not pay on
    the worker's device). Each trial's attempt is recorded in its ``RUN_DIR/ray_task.json``.

    Returns:
      ``{"trials": [one dict per trial as :func:`run_trial` returns], "population": its summary}``.
    """
    from research.population.executor import PopulationExecutor

    started = time.time()
    base = {**_placement(started), "population_of": len(keys)}
    jobs, attempts = [], {}
    for key, config, run_dir in zip(keys, configs, run_dirs, strict=True):
        os.makedirs(run_dir, exist_ok=True)
        attempts[key] = _record_attempt(run_dir, dict(base))
        jobs.append(Job(key=key, config=config, run_dir=run_dir))
    executor = PopulationExecutor(**population)
    results = []
    for out in executor.run(jobs):
        device = (out.report or {}).get("environment", {}).get("device")
        status = "done" if out.report is not None else "failed"
        run_dir = out.job.run_dir
        _finish_attempt(run_dir, attempts[out.job.key], {"status": status, "device": device, "note": out.note})
        results.append(
            {
                "key": out.job.key,
                "report": out.report,
                "error": _portable(out.error),
                "traceback": out.traceback,
                "seconds": out.seconds,
                "reused": out.reused,
                "attempt": attempts[out.job.key],
                "placement": {**base, "device": device, "status": status, "note": out.note},
                "queued_s": max(started - first_submit, 0.0),
            }
        )
    return {"trials": results, "population": executor.summary()}


class RayExecutor:
    """Runs each trial as a Ray task (see the module docstring).

    Args:
      address: ``None`` (start a local Ray, shut down by :meth:`close`), ``"auto"`` (the cluster
        ``ray start`` started on this machine) or ``"HOST:PORT"`` (a cluster's GCS address).
      cpus_per_trial: CPUs each task declares (Ray runs as many trials at once as fit).
      gpus_per_trial: GPUs each task declares; a fraction shares a GPU between trials.
      max_retries: times a trial whose worker process died is rerun (from its checkpoints).
      num_cpus: CPUs of the local Ray started without ``address`` (default: all).
      num_gpus: GPUs of that local Ray (default: those Ray detects).
      population_chunk: in :meth:`run` (sweeps), send the trials ``population_chunk`` at a time, each
        chunk one Ray task trained by the population executor on its worker (one vmapped program per
        GPU, say); 0 (default): one trial per task. ``tune`` always sends one trial per task.
      population: options of that population executor (e.g. ``{"chunk_size": 8}`` to skip measuring K).

    Raises:
      ConfigError: a negative or zero resource, or a fraction of a GPU above 1 that is not whole.

    Example:
      From the repository root (``pip install "slimjax[ray]"``; a local Ray when no address)::

        from research.config import load_config
        from research.distributed.ray_executor import RayExecutor
        from research.sweep import sweep

        with RayExecutor(cpus_per_trial=1) as executor:  # address="auto" joins `ray start --head`
            report = sweep(load_config("configs/quickstart.py:smoke"), {"seed": [0, 1]}, "runs/ray_smoke",
                           executor=executor)
        print(report.table())
    """

    name = "ray"

    def __init__(
        self,
        *,
        address: str | None = None,
        cpus_per_trial: float = 1,
        gpus_per_trial: float = 0,
        max_retries: int = 2,
        num_cpus: int | None = None,
        num_gpus: int | None = None,
        population_chunk: int = 0,
        population: Mapping[str, Any] | None = None,
    ):
        if not (isinstance(cpus_per_trial, (int, float)) and cpus_per_trial > 0):
            raise config_lib.ConfigError(f"cpus_per_trial={cpus_per_trial!r} must be a number > 0, e.g. 1")
        if not (isinstance(gpus_per_trial, (int, float)) and gpus_per_trial >= 0):
            raise config_lib.ConfigError(f"gpus_per_trial={gpus_per_trial!r} must be >= 0, e.g. 1 or 0.5")
        if gpus_per_trial > 1 and gpus_per_trial != int(gpus_per_trial):
            raise config_lib.ConfigError(
                f"gpus_per_trial={gpus_per_trial}: above one GPU Ray needs a whole number; use {math.ceil(gpus_per_trial)}"
            )
        if not isinstance(max_retries, int) or max_retries < 0:
            raise config_lib.ConfigError(f"max_retries={max_retries!r} must be an int >= 0")
        if not isinstance(population_chunk, int) or population_chunk < 0:
            raise config_lib.ConfigError(
                f"population_chunk={population_chunk!r} must be an int >= 0 (0: one trial per task)"
            )
        if address is not None and address != "auto":
            _parse_address(address)  # probed when the executor starts
        self.address = address
        self.cpus_per_trial, self.gpus_per_trial = cpus_per_trial, gpus_per_trial
        self.max_retries = max_retries
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.population_chunk, self.population = population_chunk, dict(population or {})
        self._populations: list[dict[str, Any]] = []
        self._ready: list[Outcome] = []  # outcomes of a finished population chunk not yet returned
        self._owns_ray = False
        self._started = False
        self._cluster: dict[str, float] = {}
        self._trials: dict[int, dict[str, Any]] = {}
        self._pending: dict[Any, tuple[Job, float]] = {}
        self._remote = None
        self._interrupt = _InterruptLatch()

    # -- connecting
    def start(self) -> RayExecutor:
        """Connects to (or starts) Ray; a bad address fails here within seconds. Idempotent."""
        if self._started:
            return self
        ray = import_ray()
        if ray.is_initialized():
            self._owns_ray = False
        else:
            if self.address not in (None, "auto"):
                _check_address(self.address)
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "WARNING"}
            if self.address is None:
                kwargs.update(address="local", num_cpus=self.num_cpus, num_gpus=self.num_gpus)
                # Workers import the same `research` the driver runs (a source checkout included).
                root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
                path = os.environ.get("PYTHONPATH")
                kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": root + (os.pathsep + path if path else "")}}
            else:
                kwargs["address"] = self.address
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise config_lib.ConfigError(
                    f"address={self.address!r}: could not connect to Ray ({type(e).__name__}: {str(e).splitlines()[0]}); "
                    "start a cluster with `ray start --head`, give its HOST:PORT, or omit the address for a local Ray"
                ) from None
            self._owns_ray = self.address is None
            if self._owns_ray:
                atexit.register(self.close)
        self._cluster = {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        if self.gpus_per_trial > self._cluster.get("GPU", 0.0):
            gpus = self._cluster.get("GPU", 0.0)
            self.close()
            raise config_lib.ConfigError(
                f"gpus_per_trial={self.gpus_per_trial} but the Ray cluster has {gpus:g} GPU(s); "
                "use --gpus-per-trial 0 (CPU trials) or join a cluster with GPUs"
            )
        if self.cpus_per_trial > self._cluster.get("CPU", 0.0):
            cpus = self._cluster.get("CPU", 0.0)
            self.close()
            raise config_lib.ConfigError(
                f"cpus_per_trial={self.cpus_per_trial} but the Ray cluster has {cpus:g} CPU(s); no trial could start"
            )
        options: dict[str, Any] = {
            "num_cpus": self.cpus_per_trial,
            "num_gpus": self.gpus_per_trial,
            "max_retries": self.max_retries,
            "retry_exceptions": False,  # run_one never raises: a trial's own error is its outcome
        }
        if self.gpus_per_trial > 0:
            options["max_calls"] = 1  # a fresh process per GPU trial: JAX binds its devices once per process
        env = worker_environment(self.gpus_per_trial)
        cache = _compilation_cache_dir()
        if cache:
            env.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
        if env:
            options["runtime_env"] = {"env_vars": env}
        self._worker_env = env
        self._remote = ray.remote(run_trial).options(**options)
        self._remote_chunk = ray.remote(run_chunk).options(**options)
        self._interrupt.install()
        self._started = True
        return self

    def slots(self) -> int:
        """How many trials the cluster runs at once with the declared resources."""
        self.start()
        n = math.floor(self._cluster.get("CPU", 0.0) / self.cpus_per_trial + 1e-9)
        if self.gpus_per_trial > 0:
            n = min(n, math.floor(self._cluster.get("GPU", 0.0) / self.gpus_per_trial + 1e-9))
        return max(n, 1)

    def close(self) -> None:
        """Cancels trials in flight; shuts down the local Ray this executor started (a joined cluster is left running)."""
        self.cancel_all()
        self._interrupt.uninstall()
        if self._owns_ray:
            ray = import_ray()
            with contextlib.suppress(Exception):
                ray.shutdown()
            self._owns_ray = False
            with contextlib.suppress(Exception):
                atexit.unregister(self.close)
        self._started = False
        self._remote = None

    def __enter__(self) -> RayExecutor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- running
    def run(self, jobs: Sequence[Job], *, progress: bool = False) -> Iterator[Outcome]:
        """Submits every job not finished earlier as a Ray task; yields outcomes as they finish.

        Finished runs are read back on the driver and never submitted. Closing the generator
        early (or Ctrl-C) cancels the tasks still queued or running.
        """
        del progress  # workers write no progress bars (their output is not the driver's terminal)
        try:
            if self.population_chunk:
                todo = []
                for job in jobs:
                    report = finished_report(job.run_dir, job.config)
                    if report is not None:
                        yield Outcome(job=job, report=report, reused=True, note="finished earlier")
                    else:
                        todo.append(job)
                for start in range(0, len(todo), self.population_chunk):
                    self._submit_chunk(todo[start : start + self.population_chunk])
            else:
                for job in jobs:
                    reused = self.submit(job)
                    if reused is not None:
                        yield reused
            while self.in_flight:
                yield self.next_outcome()
        finally:
            self.cancel_all()

    def _submit_chunk(self, jobs: Sequence[Job]) -> None:
        self.start()
        self._interrupt.check()
        now = time.time()
        ref = self._remote_chunk.remote(
            [j.key for j in jobs],
            [j.config for j in jobs],
            [os.path.abspath(j.run_dir) for j in jobs],
            now,
            self.population,
        )
        self._pending[ref] = (list(jobs), now)

    # -- one trial at a time (``tune`` keeps every slot busy: a new trial as soon as one finishes)
    @property
    def in_flight(self) -> int:
        """Trials submitted and not yet returned by :meth:`next_outcome`."""
        return len(self._ready) + sum(len(j) if isinstance(j, list) else 1 for j, _ in self._pending.values())

    def submit(self, job: Job) -> Outcome | None:
        """Starts ``job`` as a Ray task; returns its outcome at once (nothing submitted) when its run
        directory already holds the finished run."""
        report = finished_report(job.run_dir, job.config)
        if report is not None:
            return Outcome(job=job, report=report, reused=True, note="finished earlier")
        self.start()
        self._interrupt.check()
        now = time.time()
        ref = self._remote.remote(job.key, job.config, os.path.abspath(job.run_dir), now)
        self._pending[ref] = (job, now)
        return None

    def next_outcome(self) -> Outcome:
        """Waits for the next submitted trial to finish and returns its outcome.

        Raises:
          RuntimeError: nothing is in flight.
        """
        if self._ready:
            return self._ready.pop(0)
        if not self._pending:
            raise RuntimeError("next_outcome() with no trial in flight; submit() one first")
        ray = import_ray()
        ready: list[Any] = []
        while not ready:  # in short waits, so a Ctrl-C the interpreter dropped is still seen
            self._interrupt.check()
            ready, _ = ray.wait(list(self._pending), num_returns=1, timeout=0.5)
        (ref,) = ready
        job, submitted = self._pending.pop(ref)
        if isinstance(job, list):  # a population chunk
            self._ready.extend(self._chunk_outcomes(ray, job, ref, submitted))
            return self._ready.pop(0)
        return self._outcome(ray, job, ref, submitted)

    def cancel_all(self) -> None:
        """Cancels every trial in flight (Ctrl-C, an abandoned run); their run directories resume later."""
        if not self._pending:
            return
        ray = import_ray()
        for ref in list(self._pending):
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        self._pending.clear()
        self._ready.clear()

    def _outcome(self, ray, job: Job, ref, submitted: float) -> Outcome:
        t_done = time.time()
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as e:  # the worker died more than max_retries times, a lost node...
            attempts = _attempts(job.run_dir)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            error = RuntimeError(
                f"the Ray worker running this trial died ({type(e).__name__}: {reason}); tried {attempts} time(s), "
                f"max_retries={self.max_retries}"
            )
            tb = f"{type(e).__name__}: {e}\n"
            os.makedirs(job.run_dir, exist_ok=True)
            report_lib.write_text_atomic(os.path.join(job.run_dir, "error.txt"), tb)
            self._trials[job.key] = {"attempts": attempts, "status": "failed", "error": str(error)}
            return Outcome(job=job, error=error, traceback=tb, seconds=t_done - submitted, note="ray: worker died")
        return self._from_result(job, result)

    def _chunk_outcomes(self, ray, jobs: list[Job], ref, submitted: float) -> list[Outcome]:
        """The outcomes of a population chunk (each a failed outcome when its worker died for good)."""
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError:
            return [self._outcome(ray, job, ref, submitted) for job in jobs]
        task = len({p["ray_task"] for p in self._populations})
        for entry in result["population"]["populations"]:  # numbered across tasks, as sweep reports them
            self._populations.append(
                {
                    **entry,
                    "population": len(self._populations),
                    "ray_task": task,
                    "device": result["population"]["device"],
                }
            )
        by_key = {j.key: j for j in jobs}
        return [self._from_result(by_key[r["key"]], r) for r in result["trials"]]

    def _from_result(self, job: Job, result: Mapping[str, Any]) -> Outcome:
        placement = result["placement"]
        note = f"ray attempt {result['attempt']} on {placement['host']} ({placement.get('device')})"
        if placement.get("note"):
            note += f"; {placement['note']}"
        if placement["gpu_ids"]:
            note += f", GPU {','.join(placement['gpu_ids'])}"
        self._trials[job.key] = {
            "attempts": result["attempt"],
            "status": "done" if result["report"] is not None else "failed",
            "seconds": result["seconds"],
            "queued_s": result["queued_s"],
            "host": placement["host"],
            "device": placement.get("device"),
            "gpu_ids": placement["gpu_ids"],
        }
        return Outcome(
            job=job,
            report=result["report"],
            error=result["error"],
            traceback=result["traceback"],
            seconds=result["seconds"],
            reused=result["reused"],
            note=note,
        )

    def summary(self) -> dict[str, Any]:
        """The cluster, the declared resources, the workers' JAX settings and each trial's attempts."""
        return {
            "executor": self.name,
            "address": self.address or "local",
            "cluster": dict(self._cluster),
            "cpus_per_trial": self.cpus_per_trial,
            "gpus_per_trial": self.gpus_per_trial,
            "max_retries": self.max_retries,
            "slots": self.slots() if self._started else None,
            "worker_env": dict(getattr(self, "_worker_env", {})),
            "trials": {str(k): v for k, v in sorted(self._trials.items())},
            **(
                {"population_chunk": self.population_chunk, "populations": self._populations}
                if self.population_chunk
                else {}
            ),
        }


def _attempts(run_dir: str) -> int:
    try:
        with open(os.path.join(run_dir, TASK_FILE)) as f:
            return len(json.load(f)["attempts"])
    except (OSError, json.JSONDecodeError, KeyError):
        return 0


def _compilation_cache_dir() -> str | None:
    """The driver's JAX persistent compilation cache directory, when it set one (workers share it)."""
    jax = sys.modules.get("jax")
    if jax is None:
        return os.environ.get("JAX_COMPILATION_CACHE_DIR")
    return jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR")
