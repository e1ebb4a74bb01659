"""Run directories end to end: stage reuse by content, refusal and --overwrite, and kill -9 of a real process."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from flax import nnx

from research import cli
from research import config as C
from research import run as run_lib
from research import stages as stages_lib
from research import workdir as W
from research.data import BatchSampler

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIG = textwrap.dedent(
    """
    from methods.pruning import PruneStage
    from research.config import Config, DataConfig, ModelConfig
    from research.stages import TrainStage

    def get_config(arg=None):
        train = TrainStage(steps=20, batch_size=32, checkpoint_every=10, eval_every=10, log_every=2)
        prune = PruneStage(
            sparsity=0.5,
            train=TrainStage(steps=10, batch_size=16, learning_rate=2e-3, checkpoint_every=5, eval_every=0),
        )
        return Config(
            name="tiny",
            model=ModelConfig(name="mlp", options={"widths": (16,)}),
            data=DataConfig(name="digits", limit=400),
            stages=(train,) if arg == "train" else (train, prune),
        )
    """
)


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(CONFIG)
    return str(path)


def _rows(run_dir, label):
    with open(os.path.join(run_dir, "stages", label, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _params(run_dir):
    _, model, _ = run_lib.load_run(str(run_dir))
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _same_run(a, b, labels):
    for label in labels:
        assert _rows(a, label) == _rows(b, label), label  # every logged value, bit for bit
    assert all(np.array_equal(x, y) for x, y in zip(_params(a), _params(b), strict=True))
    sa = json.loads((a / "report.json").read_text())["stages"]
    sb = json.loads((b / "report.json").read_text())["stages"]
    assert [s["label"] for s in sa] == [s["label"] for s in sb] == labels
    for ma, mb in ((x["metrics"], y["metrics"]) for x, y in zip(sa, sb, strict=True)):
        for key in ("test_accuracy", "nonzeros", "final_train_loss"):
            assert ma.get(key) == mb.get(key), key
    assert sa[0]["metrics"]["final_train_loss"] is not None


def test_a_fixed_later_stage_reuses_the_prefix_and_a_changed_first_stage_is_refused(
    config_file, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    run_lib.register_all_stages()
    calls = []
    for kind in ("train", "prune"):
        cls, fn = stages_lib.get_stage(kind)

        def counted(bundle, cfg, ctx, fn=fn, kind=kind):
            calls.append(kind)
            return fn(bundle, cfg, ctx)

        monkeypatch.setattr(stages_lib.STAGES, "_entries", {**stages_lib.STAGES._entries, kind: (cls, counted)})

    class Failed(Exception):
        pass

    original = BatchSampler.batch

    def failing(self, step):
        if self.batch_size == 16 and step == 7:  # the prune stage, after its checkpoint at step 5
            raise Failed
        return original(self, step)

    # A run whose second stage fails midway (a bad value found after the first stage trained) ...
    monkeypatch.setattr(BatchSampler, "batch", failing)
    bad = ["--set", "stages.1.train.learning_rate=0.001"]
    with pytest.raises(Failed):
        cli.main(["run", config_file, "--workdir", os.path.join("runs", "tiny"), *bad, "--no-progress"])
    monkeypatch.setattr(BatchSampler, "batch", original)
    assert calls == ["train", "prune"]
    capsys.readouterr()

    # ... is fixed and rerun in the same directory: stage 0 is reused, stage 1 starts over.
    assert cli.main(["run", config_file, "--no-progress"]) == 0
    assert calls == ["train", "prune", "prune"]
    err = capsys.readouterr().err
    assert "[0_train] finished earlier" in err
    assert (
        "[1_prune] config changed (stages.1.train.learning_rate: 0.001 -> 0.002): its earlier results were moved" in err
    )
    run_dir = tmp_path / "runs" / "tiny"
    (replaced,) = os.listdir(run_dir / "replaced")
    assert os.path.isdir(run_dir / "replaced" / replaced / "checkpoints" / "5")  # the failed attempt, kept

    # The same config given by --set lands in its own default directory (no collision with runs/tiny).
    # Given only stage 0 there, it trains stage 1 from scratch, exactly as the rerun above did (had the
    # rerun resumed the failed attempt's checkpoint, its first steps would carry the old learning rate).
    fresh = tmp_path / W.default_workdir("tiny", ["stages.1.train.learning_rate=0.002"])
    assert fresh != run_dir
    shutil.copytree(run_dir / "stages" / "0_train", fresh / "stages" / "0_train")
    shutil.copy(run_dir / "config.json", fresh / "config.json")
    assert cli.main(["run", config_file, "--set", "stages.1.train.learning_rate=0.002", "--no-progress"]) == 0
    assert calls == ["train", "prune", "prune", "prune"]
    _same_run(run_dir, fresh, ["0_train", "1_prune"])
    capsys.readouterr()

    # A different first stage: one line that says how to proceed; nothing touched.
    before = sorted(os.listdir(run_dir / "stages")), (run_dir / "config.json").read_text()
    assert cli.main(["run", config_file, "--workdir", str(run_dir), "--set", "stages.0.steps=21"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"slimjax: {run_dir} holds a run of a different config (stages.0.steps: 20 -> 21), which changes its "
        "first stage; use a new --workdir, or --overwrite to delete that run and start over"
    )
    assert (sorted(os.listdir(run_dir / "stages")), (run_dir / "config.json").read_text()) == before
    assert calls == ["train", "prune", "prune", "prune"]

    # --overwrite deletes that run and starts over (stopped at its first batch here, to save the training).
    monkeypatch.setattr(BatchSampler, "batch", lambda self, step: (_ for _ in ()).throw(Failed()))
    with pytest.raises(Failed):
        cli.main(["run", config_file, "--workdir", str(run_dir), "--set", "stages.0.steps=21", "--overwrite"])
    assert sorted(os.listdir(run_dir)) == [".lock", "config.json", "stages"]  # replaced/, report.json: gone
    assert os.listdir(run_dir / "stages") == ["0_train"]
    key = json.loads((run_dir / "stages" / "0_train" / "key.json").read_text())
    assert key["config"]["stages"][0]["steps"] == 21
    assert not os.path.exists(run_dir / "stages" / "0_train" / "metrics.jsonl")


KILLED_RUN = textwrap.dedent(
    """
    import sys, time
    from research import config as C, run as R
    from research.data import BatchSampler

    config_file, workdir, marker = sys.argv[1:]
    original = BatchSampler.batch

    def batch(self, step):
        if step == 14:  # rows 1..14 are logged, the checkpoint is at step 10
            open(marker, "w").close()
            time.sleep(600)
        return original(self, step)

    BatchSampler.batch = batch
    R.run(C.load_config(config_file), workdir, progress=False, echo=False)
    """
)


def test_kill_9_mid_training_refuses_a_second_run_then_resumes_bit_identically(config_file, tmp_path, capsys):
    workdir, marker = tmp_path / "killed", tmp_path / "at_step_14"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, config_file + ":train", str(workdir), str(marker)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The uninterrupted reference, while the other process starts.
        reference = tmp_path / "reference"
        run_lib.run(C.load_config(config_file + ":train"), str(reference), progress=False, echo=False)
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the training process never reached step 14"
            time.sleep(0.1)
        # A second run on the busy directory is refused at once, and writes nothing.
        rows_before = (workdir / "stages" / "0_train" / "metrics.jsonl").read_text()
        assert cli.main(["run", config_file + ":train", "--workdir", str(workdir), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"slimjax: workdir {workdir} is in use by pid {proc.pid} on " in err
        assert (workdir / "stages" / "0_train" / "metrics.jsonl").read_text() == rows_before
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert [r["step"] for r in _rows(workdir, "0_train") if r["split"] == "train"] == list(range(1, 15))
    with open(workdir / "stages" / "0_train" / "metrics.jsonl", "a") as f:
        f.write('{"step": 15, "split": "train", "lo')  # as if the kill had landed mid-write

    with pytest.warns(UserWarning) as caught:
        report = run_lib.run(C.load_config(config_file + ":train"), str(workdir), progress=False, echo=False)
    messages = [str(w.message) for w in caught]
    assert any(f"left by pid {proc.pid} on " in m and "no longer running" in m for m in messages), messages
    assert any("metrics.jsonl: dropped a partial last line" in m for m in messages), messages
    assert [r["step"] for r in _rows(workdir, "0_train") if r["split"] == "train"] == list(range(1, 21))
    _same_run(workdir, reference, ["0_train"])
    assert report["stages"][0]["metrics"]["final_train_loss"] == _rows(reference, "0_train")[-2]["loss"]
