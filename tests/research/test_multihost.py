"""Tests of one run data-parallel over several processes (:mod:`research.distributed.multihost`):
two local CPU processes joined by ``jax.distributed`` (gloo collectives) train the same model as
one process does."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from research.distributed import multihost as M

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIG = """
from research.config import Config, DataConfig, ModelConfig
from research.stages import TrainStage


def get_config(arg=None):
    return Config(
        name="mh",
        model=ModelConfig(name="mlp", options={"widths": (16,)}),
        data=DataConfig(name="digits", limit=300),
        stages=(TrainStage(steps=12, batch_size=32, checkpoint_every=6, eval_every=6, log_every=3, data_parallel=True),),
    )
"""


def test_initialize_names_what_is_missing(monkeypatch):
    for name in (M.ENV_COORDINATOR, M.ENV_NUM_PROCESSES, M.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=r"give coordinator \(or \$SLIMJAX_COORDINATOR\), num_processes"):
        M.initialize()
    with pytest.raises(ValueError, match="coordinator='node0' must be HOST:PORT"):
        M.initialize("node0", 2, 0)
    with pytest.raises(ValueError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
        M.initialize("node0:7777", 2, 2)
    monkeypatch.setenv(M.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match="SLIMJAX_NUM_PROCESSES='two' is not a valid int"):
        M.initialize("node0:7777", None, 0)


def test_process_local_checkpoints_keep_the_newest_and_restore_dtypes(tmp_path):
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from research.train.multiprocess import ProcessLocalCheckpoints

    store = ProcessLocalCheckpoints(str(tmp_path), max_to_keep=2)
    for step in (1, 2, 3):
        store.save(step, ocp.args.StandardSave({"w": jnp.full(3, float(step)), "n": jnp.int32(step)}))
    assert store.all_steps() == [2, 3] and store.latest_step() == 3
    abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32), "n": jax.ShapeDtypeStruct((), jnp.int32)}
    n, w = store.restore(3, ocp.args.StandardRestore(abstract))  # leaves in tree order: n, w
    assert n.dtype == jnp.int32 and int(n) == 3
    np.testing.assert_array_equal(w, [3.0, 3.0, 3.0])
    assert M.process_workdir("runs/a/", 0) == "runs/a/" and M.process_workdir("runs/a/", 1) == "runs/a.process1"


@pytest.mark.slow
def test_two_cpu_processes_train_one_run_as_one_process_does(tmp_path, xla_flags_for):
    config = tmp_path / "mh.py"
    config.write_text(CONFIG)
    env = {**os.environ, "XLA_FLAGS": xla_flags_for(1)}  # one CPU device per process
    env["JAX_PLATFORMS"] = "cpu"
    two = str(tmp_path / "two")
    cmd = [sys.executable, "-m", "research.distributed.multihost", "--local", "2", str(config), "--workdir", two]
    proc = subprocess.run([*cmd, "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "multihost: 2 processes, 2 cpu devices" in proc.stdout
    one = str(tmp_path / "one")
    cmd = [sys.executable, "-m", "research.cli", "run", str(config), "--workdir", one, "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def result(run_dir):
        report = json.load(open(os.path.join(run_dir, "report.json")))
        with np.load(os.path.join(run_dir, "stages", "0_train", "result", "state.npz")) as f:
            arrays = [f[k] for k in sorted(f.files)]
        return report, arrays

    ref, ref_arrays = result(one)
    assert ref["environment"]["device_count"] == 1
    for run_dir, pid in ((two, 0), (two + ".process1", 1)):
        report, arrays = result(run_dir)
        info = json.load(open(os.path.join(run_dir, "multihost.json")))
        assert (info["process_id"], info["num_processes"], info["device_count"]) == (pid, 2, 2)
        assert report["environment"]["device_count"] == 2  # the runtime spanned both processes
        # Every process ends with the parameters one process reaches on the same batches.
        for a, b in zip(arrays, ref_arrays, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
        m, r = report["stages"][-1]["metrics"], ref["stages"][-1]["metrics"]
        np.testing.assert_allclose(m["final_train_loss"], r["final_train_loss"], rtol=1e-4)
        assert sorted(os.listdir(os.path.join(run_dir, "stages", "0_train", "checkpoints"))) == ["12", "6"]
