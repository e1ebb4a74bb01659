"""Tests of the Ray executor (``--executor ray``, :mod:`research.distributed.ray_executor`).

A local Ray cluster of 2 CPUs is started once for the module (in this process, so ``ray.shutdown``
stops it) and shared by the in-process sweeps and by driver subprocesses (``--address``). The
trials are a 6-step MLP on 300 digits; the JAX compilation cache is shared, so each program
compiles once across the workers.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from research import config as C
from research import executors
from research.cli import parse_grid
from research.sweep import sweep
from research.workdir import WorkdirWarning

ray = pytest.importorskip("ray")

from research.distributed import ray_executor as R  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = """
from research.automl import Categorical, Float, Space
from research.config import Config, DataConfig, ModelConfig
from research.stages import TrainStage


def get_config(arg=None):
    steps, every = (int(x) for x in (arg or "6,3").split(","))
    return Config(
        name="tiny",
        model=ModelConfig(name="mlp", options={"widths": (8,)}),
        data=DataConfig(name="digits", limit=300),
        stages=(TrainStage(steps=steps, batch_size=32, checkpoint_every=every, eval_every=0, log_every=every),),
    )


def get_space(arg=None):
    return Space({
        "stages.train.learning_rate": Float(1e-3, 3e-2, log=True),
        "stages.train.optimizer": Categorical(["adam", "adamw"]),
    })
"""
GRID = {"stages.train.learning_rate": [1e-3, 1e-2, 3e-2], "seed": [0, 1]}


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.py"
    path.write_text(TINY)
    return str(path)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local 2-CPU Ray cluster for the module; yields its GCS address for driver subprocesses."""
    import jax

    cache = str(tmp_path_factory.mktemp("jax_cache"))
    before = jax.config.jax_compilation_cache_dir
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "JAX_COMPILATION_CACHE_DIR")}
    # Workers (children of the raylet this process starts) import this checkout and share the cache.
    os.environ["PYTHONPATH"] = ROOT + (os.pathsep + saved["PYTHONPATH"] if saved["PYTHONPATH"] else "")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
    jax.config.update("jax_compilation_cache_dir", cache)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        jax.config.update("jax_compilation_cache_dir", before)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _metrics(report):
    return {p.index: p.metrics for p in report.points}


def _assert_same_metrics(a, b):
    assert a.keys() == b.keys()
    for i in a:
        for name in ("test_accuracy", "val_accuracy", "params", "nonzeros", "bytes_fp32"):
            assert a[i][name] == b[i][name], (i, name, a[i][name], b[i][name])
        np.testing.assert_allclose(a[i]["final_train_loss"], b[i]["final_train_loss"], rtol=1e-6)


def _attempts(run_dir):
    with open(os.path.join(run_dir, R.TASK_FILE)) as f:
        return json.load(f)["attempts"]


# ----------------------------------------------------------------------------- no cluster needed


def test_worker_environment_limits_jax_memory_to_the_gpu_share():
    assert R.worker_environment(0, {}) == {"JAX_PLATFORMS": "cpu"}
    assert R.worker_environment(0.25, {})["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.225"
    assert R.worker_environment(1, {}) == {}  # a whole GPU per process: JAX's default preallocation
    # What the user set in the driver's environment wins.
    env = R.worker_environment(0.5, {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "PATH": "/bin"})
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false" and "PATH" not in env


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"address": "nohost"}, "is not 'auto' or HOST:PORT"),
        ({"address": "ray://head:10001"}, "Ray Client addresses"),
        ({"cpus_per_trial": 0}, "cpus_per_trial=0 must be a number > 0"),
        ({"gpus_per_trial": 1.5}, "use 2"),
        ({"max_retries": -1}, "max_retries=-1"),
    ],
)
def test_bad_options_are_refused_when_the_executor_is_made(options, match):
    with pytest.raises(C.ConfigError, match=match):
        executors.make_executor("ray", **options)


def test_missing_ray_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(C.ConfigError, match=r'pip install "slimjax\[ray\]"'):
        executors.make_executor("ray")


def test_ray_flags_without_the_ray_executor_are_refused(config_file, capsys):
    from research import cli

    rc = cli.main(["sweep", config_file, "--grid", "seed=0", "--address", "auto", "--workdir", "/nonexistent/x"])
    assert rc == 2
    assert "--address applies only to --executor ray" in capsys.readouterr().err
    rc = cli.main(["tune", config_file, "--trials", "2", "--executor", "ray", "--population-chunk", "2"])
    assert rc == 2
    assert "--population-chunk applies to sweep" in capsys.readouterr().err


class _NeedsTwoArguments(Exception):
    def __init__(self, what, why):
        super().__init__(f"{what}: {why}")


def test_errors_the_driver_cannot_rebuild_travel_as_runtime_errors_naming_them():
    plain = ValueError("bad learning rate")
    assert R._portable(plain) is plain
    assert R._portable(None) is None

    class LocalError(Exception):
        pass

    for error in (LocalError("local class"), _NeedsTwoArguments("lr", "negative")):
        out = R._portable(error)
        assert type(out) is RuntimeError
        assert str(out) == f"{type(error).__name__}: {error}"


@contextlib.contextmanager
def _python_sigint():
    """Python's own SIGINT handler while inside, whatever this process inherited.

    A test run started in the background by a non-interactive shell (``pytest ... &`` in a script)
    inherits SIGINT ignored, and so would every process it starts: Ctrl-C would reach neither the
    latch nor a driver subprocess (an ignored signal stays ignored across exec).
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the drop being tested
def test_a_ctrl_c_the_interpreter_drops_is_raised_at_the_next_check():
    with _python_sigint():
        _check_the_latch()


def _check_the_latch():
    latch = R._InterruptLatch()
    latch.install()
    try:
        assert signal.getsignal(signal.SIGINT) == latch._handle

        class RaisesInDel:  # KeyboardInterrupt raised in __del__ is printed and dropped
            def __del__(self):
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):  # the handler runs between these bytecodes
                    pass

        try:
            RaisesInDel()
        except KeyboardInterrupt:  # pragma: no cover - delivered after __del__ returned instead
            pass
        assert latch.pending
        with pytest.raises(KeyboardInterrupt):
            latch.check()
        latch.check()  # raised once
    finally:
        latch.uninstall()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_core_never_imports_ray():
    code = (
        "import sys, research.cli, research.sweep, research.tune, research.executors, research.distributed; "
        "sys.exit('ray' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_bad_address_is_a_clear_error_not_a_hang(config_file, tmp_path):
    """Nothing listens on port 1: the CLI says so and exits (a hang would hit the subprocess timeout)."""
    cmd = [sys.executable, "-m", "research.cli", "sweep", config_file, "--grid", "seed=0", "--executor", "ray"]
    cmd += ["--address", "127.0.0.1:1", "--workdir", str(tmp_path / "s"), "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "address='127.0.0.1:1': no Ray cluster answers there" in proc.stderr
    assert "ray start --head" in proc.stderr
    assert not os.path.exists(tmp_path / "s" / "sweep.json")  # refused before anything was written


def _listener(reply: bytes | None):
    """A TCP server on a free local port that answers each connection with ``reply`` (None: silence)."""
    import socket

    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)

    def serve():
        with contextlib.suppress(OSError):
            conn, _ = server.accept()
            with conn:
                conn.recv(64)  # the client's preface
                if reply is not None:
                    conn.sendall(reply)
                conn.recv(64)  # holds the connection open until the client closes it

    threading.Thread(target=serve, daemon=True).start()
    return server


@pytest.mark.parametrize(
    ("reply", "heard"),
    [
        (b"HTTP/1.0 400 Bad Request\r\n\r\n", "it answered b'HTTP/1.0 '"),
        (None, "it sent nothing within"),
    ],
)
def test_a_port_that_is_not_a_ray_gcs_is_refused_by_the_handshake(reply, heard, monkeypatch):
    monkeypatch.setattr(R, "_CONNECT_TIMEOUT_S", 0.5)  # the silent port is given up on after this
    server = _listener(reply)
    try:
        address = f"127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(C.ConfigError, match="not a Ray GCS") as e:
            R._check_address(address)
        assert heard in str(e.value) and "ray start --head" in str(e.value)
    finally:
        server.close()


def test_the_handshake_accepts_a_grpc_server():
    """An HTTP/2 server's first frame is SETTINGS (type 4), which is all the check reads."""
    server = _listener(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    try:
        R._check_address(f"127.0.0.1:{server.getsockname()[1]}")
    finally:
        server.close()


@pytest.mark.slow
def test_without_an_address_a_local_ray_is_started_and_shut_down(config_file, tmp_path):
    script = (
        "import sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import ray\n"
        "from research.config import load_config\n"
        "from research.sweep import sweep\n"
        "report = sweep(load_config(sys.argv[1]), {'seed': [0]}, sys.argv[2], progress=False, executor='ray')\n"
        "assert [p.status for p in report.points] == ['done'], report.points\n"
        "assert report.executor['address'] == 'local' and report.executor['slots'] >= 1, report.executor\n"
        "assert not ray.is_initialized()\n"
        "import json, os\n"
        "task = json.load(open(os.path.join(report.points[0].run_dir, 'ray_task.json')))\n"
        "print('WORKER-RESEARCH', task['attempts'][0]['research'])\n"
        "print('LOCAL-RAY-OK')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    proc = subprocess.run(
        [sys.executable, "-c", script, config_file, str(tmp_path / "s")],
        cwd=str(tmp_path),  # not the checkout: the workers find it through the runtime environment
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "LOCAL-RAY-OK" in proc.stdout, proc.stderr[-3000:]
    assert f"WORKER-RESEARCH {os.path.join(ROOT, 'research')}" in proc.stdout  # this checkout's slimjax


# ----------------------------------------------------------------------------- on the cluster


@pytest.mark.slow
def test_six_point_sweep_over_ray_equals_the_sequential_sweep(cluster, config_file, tmp_path):
    config = C.load_config(config_file)
    local = sweep(config, GRID, str(tmp_path / "local"), progress=False)
    with R.RayExecutor() as ex:
        remote = sweep(config, GRID, str(tmp_path / "ray"), progress=False, executor=ex)
        summary = ex.summary()
    assert [p.status for p in remote.points] == ["done"] * 6
    _assert_same_metrics(_metrics(remote), _metrics(local))
    assert summary["slots"] == 2 and summary["cluster"]["CPU"] == 2.0
    for p in remote.points:
        (attempt,) = _attempts(p.run_dir)
        assert attempt["status"] == "done" and attempt["device"] == "cpu"
        assert attempt["jax_env"]["JAX_PLATFORMS"] == "cpu"
        assert attempt["pid"] != os.getpid()  # it ran in a Ray worker
        assert p.note.startswith("ray attempt 1 on ")
    written = json.load(open(tmp_path / "ray" / "sweep.json"))
    assert written["executor"]["executor"] == "ray" and len(written["executor"]["trials"]) == 6
    # A rerun reads every point back on the driver: nothing is submitted again.
    again = sweep(config, GRID, str(tmp_path / "ray"), progress=False, executor=R.RayExecutor())
    assert all(p.reused for p in again.points)
    assert all(len(_attempts(p.run_dir)) == 1 for p in again.points)


@pytest.mark.slow
def test_population_chunks_as_ray_tasks_equal_the_local_population_executor(cluster, config_file, tmp_path):
    config = C.load_config(config_file)
    grid = {"stages.train.learning_rate": [1e-3, 1e-2], "seed": [0, 1]}
    local = sweep(
        config,
        grid,
        str(tmp_path / "local"),
        progress=False,
        executor=executors.make_executor("population", chunk_size=2),
    )
    ex = R.RayExecutor(population_chunk=2, population={"chunk_size": 2})
    remote = sweep(config, grid, str(tmp_path / "ray"), progress=False, executor=ex)
    assert [p.status for p in remote.points] == ["done"] * 4
    _assert_same_metrics(_metrics(remote), _metrics(local))
    summary = ex.summary()
    # Two Ray tasks, each a population of 2 trained as one vmapped chunk.
    assert [(p["ray_task"], p["k"], len(p["trials"])) for p in summary["populations"]] == [(0, 2, 2), (1, 2, 2)]
    for p in remote.points:
        (attempt,) = _attempts(p.run_dir)
        assert attempt["population_of"] == 2 and attempt["status"] == "done"
        assert "chunk of 2" in p.note, p.note


@pytest.mark.slow
def test_eight_trial_tune_over_ray_equals_the_sequential_tune(cluster, config_file, tmp_path):
    """Sobol points do not depend on earlier results, so batches of 2 ask the same trials as one at a time."""
    from research import tune as T

    config, space = T.load_config_and_space(config_file)
    kw = {"trials": 8, "sampler": "sobol", "echo": False, "plot_every": 0, "compilation_cache": False}
    local = T.tune(config, space, str(tmp_path / "local"), **kw)
    executor = R.RayExecutor()
    remote = T.tune(config, space, str(tmp_path / "ray"), executor=executor, **kw)
    assert json.load(open(tmp_path / "ray" / "executor.json"))["slots"] == 2  # 2 trials in flight at a time
    a = {t["number"]: t for t in local.trials}
    b = {t["number"]: t for t in remote.trials}
    assert sorted(b) == list(range(8)) and all(t["state"] == "COMPLETE" for t in b.values())
    for n in range(8):
        assert b[n]["params"] == a[n]["params"]
        np.testing.assert_allclose(b[n]["values"], a[n]["values"], rtol=1e-6)
        info = json.load(open(tmp_path / "ray" / "trials" / f"{n:04d}" / "trial.json"))
        assert info["executor"].startswith("ray attempt 1")
    assert json.load(open(tmp_path / "ray" / "executor.json"))["executor"] == "ray"
    starts = sorted(_attempts(tmp_path / "ray" / "trials" / f"{n:04d}")[0]["started"] for n in range(8))
    ends = sorted(
        a["started"] + a["seconds"] for n in range(8) for a in _attempts(tmp_path / "ray" / "trials" / f"{n:04d}")
    )
    # Never more trials at once than slots: the third starts only after the first has finished.
    assert all(starts[i + 2] >= ends[i] for i in range(6))
    assert not os.path.exists(tmp_path / "ray" / "trials" / "0000" / "study.db")  # the study stays with the driver


@pytest.mark.slow
def test_asha_over_ray_promotes_from_the_lower_budget_checkpoint(cluster, config_file, tmp_path):
    from research import tune as T

    base, space = T.load_config_and_space(config_file + ":9,3")
    result = T.tune(base, space, str(tmp_path), trials=3, sampler="random", budget_key="stages.train.steps",
                    scheduler="asha", min_budget=3, eta=3, executor=R.RayExecutor(), compilation_cache=False,
                    plot_every=0, echo=False)  # fmt: skip
    # Three configurations at budget 3; ASHA promoted the best one to 9 (its entry shows the last budget).
    assert sorted(t["budget"] for t in result.trials) == [3.0, 3.0, 9.0], result.trials
    assert not [t for t in result.trials if t["state"] in ("FAILED", "RUNNING")], result.trials
    (promoted,) = [t for t in result.trials if t["budget"] == 9.0]
    assert promoted["state"] == "COMPLETE"
    assert promoted["resumed_from"] == 3  # the driver copied the step-3 checkpoint; the worker continued it
    run_dir = os.path.join(str(tmp_path), promoted["run_dir"])
    (attempt,) = _attempts(run_dir)
    assert attempt["checkpoints_at_start"] and attempt["status"] == "done"
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "stages", "0_train", "metrics.jsonl"))]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 10))  # steps 4..9 ran once


def test_a_trial_that_raises_is_recorded_with_its_traceback(cluster, config_file, tmp_path):
    config = C.load_config(config_file)
    grid = {"stages.train.learning_rate": [1e30]}  # the loss becomes NaN: the run raises
    report = sweep(config, grid, str(tmp_path), progress=False, executor=R.RayExecutor())
    (point,) = report.points
    assert point.status == "failed" and "NonFiniteLossError" in point.error
    tb = open(os.path.join(point.run_dir, "error.txt")).read()
    assert "Traceback" in tb and "NonFiniteLossError" in tb
    (attempt,) = _attempts(point.run_dir)  # an error in the trial is not retried
    assert attempt["status"] == "failed"


def _kill_mid_trial(run_dir, killed):
    """A thread that SIGKILLs the worker running ``run_dir``'s trial once it has written a checkpoint."""

    def kill():
        ckpts = run_dir / "stages" / "0_train" / "checkpoints"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                attempt = _attempts(run_dir)[0]
            except (OSError, ValueError, json.JSONDecodeError):
                time.sleep(0.05)
                continue
            if ckpts.is_dir() and any(ckpts.iterdir()) and attempt["status"] == "running":
                os.kill(attempt["pid"], signal.SIGKILL)
                killed["pid"] = attempt["pid"]
                return
            time.sleep(0.02)

    thread = threading.Thread(target=kill)
    thread.start()
    return thread


@pytest.mark.slow
def test_worker_killed_mid_trial_is_retried_from_its_checkpoint(cluster, config_file, tmp_path):
    config = C.load_config(config_file + ":400,40")
    grid = {"seed": [0, 1]}
    killed = {}
    thread = _kill_mid_trial(tmp_path / "ray" / "runs" / "0_seed=0", killed)
    try:
        report = sweep(config, grid, str(tmp_path / "ray"), progress=False, executor=R.RayExecutor(max_retries=1))
    finally:
        thread.join()
    assert killed, "the trial finished before its worker could be killed"
    assert [p.status for p in report.points] == ["done", "done"]
    first, second = _attempts(report.points[0].run_dir)
    assert first["pid"] == killed["pid"] and first["status"] == "running"  # it never finished
    assert second["status"] == "done" and second["pid"] != killed["pid"]
    assert second["checkpoints_at_start"]  # the retry resumed from the killed attempt's checkpoints
    assert report.points[0].note.startswith("ray attempt 2")
    # Nothing lost: the resumed run ends exactly where an uninterrupted one does.
    local = sweep(config, grid, str(tmp_path / "local"), progress=False)
    _assert_same_metrics(_metrics(report), _metrics(local))


@pytest.mark.slow
def test_worker_killed_with_no_retries_left_is_a_failed_trial_with_the_reason(cluster, config_file, tmp_path):
    config = C.load_config(config_file + ":400,40")
    killed = {}
    thread = _kill_mid_trial(tmp_path / "runs" / "0_seed=0", killed)
    try:
        report = sweep(config, {"seed": [0]}, str(tmp_path), progress=False, executor=R.RayExecutor(max_retries=0))
    finally:
        thread.join()
    assert killed, "the trial finished before its worker could be killed"
    (point,) = report.points
    assert point.status == "failed"
    assert "the Ray worker running this trial died" in point.error and "max_retries=0" in point.error
    assert "tried 1 time(s)" in point.error
    assert "died" in open(os.path.join(point.run_dir, "error.txt")).read().lower()


def _driver(config_spec, workdir, address, *extra):
    # Each driver is a new Ray job, and every job starts its own worker processes (each imports
    # JAX and slimjax again, seconds of CPU): trials that take the cluster's two CPUs run one at a
    # time in one worker per driver.
    cmd = [sys.executable, "-m", "research.cli", *extra[:1], config_spec, *extra[1:]]
    cmd += ["--executor", "ray", "--address", address, "--workdir", workdir, "--no-progress", "--cpus-per-trial", "2"]
    with _python_sigint():  # the driver must not inherit SIGINT ignored: the tests send it Ctrl-C
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.mark.slow
def test_killed_sweep_driver_reruns_and_resumes_without_rerunning_finished_points(cluster, config_file, tmp_path):
    workdir = str(tmp_path / "s")
    args = ("sweep", "--grid", "seed=0,1,2,3")

    def some_done():
        try:
            points = json.load(open(os.path.join(workdir, "sweep.json")))["points"]
        except (OSError, ValueError):
            return False
        return any(p["status"] == "done" for p in points)

    proc = _driver(config_file + ":60,20", workdir, cluster, *args)
    assert _wait_for(some_done, proc), proc.communicate()[0]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p["index"]: p for p in json.load(open(os.path.join(workdir, "sweep.json")))["points"]}
    finished = [i for i, p in before.items() if p["status"] == "done"]
    assert finished and len(finished) < 4
    # The rerun is this process (the CLI's sweep call on its warm Ray job): a second driver
    # subprocess would import JAX and start new workers again for the same resume logic.
    config = C.load_config(config_file + ":60,20")
    with pytest.warns(
        WorkdirWarning, match=r"taking over the lock .* which is no longer running"
    ):  # the killed driver's
        report = sweep(
            config, parse_grid(["seed=0,1,2,3"]), workdir, progress=False, executor=R.RayExecutor(cpus_per_trial=2)
        )
    assert [p.status for p in report.points] == ["done"] * 4
    after = {p["index"]: p for p in json.load(open(os.path.join(workdir, "sweep.json")))["points"]}
    assert all(p["status"] == "done" for p in after.values())
    for i in finished:  # read back, not rerun: still the one attempt of the first driver
        assert after[i]["reused"]
        assert len(_attempts(after[i]["run_dir"])) == 1


@pytest.mark.slow
def test_interrupted_tune_driver_cancels_and_a_rerun_completes_the_study(cluster, config_file, tmp_path):
    workdir = str(tmp_path / "t")
    args = ("tune", "--trials", "6", "--sampler", "sobol")
    trials_dir = os.path.join(workdir, "trials")

    def some_told():
        for n in range(6):
            path = os.path.join(trials_dir, f"{n:04d}", "trial.json")
            try:
                if json.load(open(path)).get("status") == "COMPLETE":
                    return True
            except (OSError, ValueError):
                pass
        return False

    proc = _driver(config_file + ":60,20", workdir, cluster, *args)
    assert _wait_for(some_told, proc), proc.communicate()[0]
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, out
    done_before = {
        n: json.load(open(os.path.join(trials_dir, f"{n:04d}", "trial.json")))
        for n in range(6)
        if os.path.exists(os.path.join(trials_dir, f"{n:04d}", "report.json"))
    }
    assert 0 < len(done_before) < 6, out
    # The rerun is this process, with the arguments `slimjax tune` passed (see the sweep test above).
    from research import tune as T

    spec = config_file + ":60,20"
    config, space = T.load_config_and_space(spec)
    T.tune(config, space, workdir, trials=6, sampler="sobol", executor=R.RayExecutor(cpus_per_trial=2),
           config_spec=spec, policies=T.load_policies(spec), echo=False)  # fmt: skip
    out = ""
    summary = json.load(open(os.path.join(workdir, "tune.json")))
    states = {t["number"]: t["state"] for t in summary["trials"]}
    assert states == {n: "COMPLETE" for n in range(6)}, out
    for n in done_before:  # finished before the interrupt: told once, never rerun
        assert len(_attempts(os.path.join(trials_dir, f"{n:04d}"))) == 1, (n, out)
