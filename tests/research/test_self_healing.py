"""Self-healing reads: damaged checkpoints, partial or repeated metrics rows, unreadable run files."""

import glob
import json
import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from research import cli
from research import data
from research import nn
from research import report as report_lib
from research import run as run_lib
from research import train
from research import workdir as workdir_lib


@pytest.fixture(scope="module")
def setup():
    ds = data.load_dataset("digits", seed=0, limit=256)
    model = nn.build_model("mlp", input_shape=ds.input_shape, num_classes=10, rngs=nnx.Rngs(0), widths=(16,))
    tx = optax.adam(1e-2)
    defs, state = train.create_train_state(model, tx, seed=0)
    sampler = data.BatchSampler(ds.x_train, ds.y_train, batch_size=32, seed=0)
    return defs, state, train.make_train_step(defs, tx, donate=False), sampler


def _fit(state, step, sampler, workdir, on_step=None):
    return train.fit(
        state,
        step,
        sampler,
        num_steps=20,
        workdir=workdir,
        checkpoint_every=5,
        log_every=2,
        progress=False,
        on_step=on_step,
    )


class Killed(Exception):
    pass


def _kill_at(n):
    def on_step(s, _):
        if s == n:
            raise Killed

    return on_step


def _leaves(t):
    def raw(x):
        return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x

    return [np.asarray(raw(x)) for x in jax.tree.leaves(t)]


def _truncate_largest_data_file(step_dir):
    path = max(glob.glob(os.path.join(step_dir, "**", "d", "*"), recursive=True), key=os.path.getsize)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _train_rows(workdir):
    return [(r["step"], r["loss"]) for r in train.read_metrics(workdir) if r["split"] == "train"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, setup):
    defs, state, step, sampler = setup
    d = tmp_path_factory.mktemp("ref")
    final, _ = _fit(state, step, sampler, d)
    return final, _train_rows(d)


def test_damaged_latest_checkpoint_and_partial_metrics_line_heal_bit_identically(tmp_path, setup, reference):
    defs, state, step, sampler = setup
    with pytest.raises(Killed):
        _fit(state, step, sampler, tmp_path, on_step=_kill_at(17))  # checkpoints 10 and 15, rows up to 16
    ckpt_dir = tmp_path / "checkpoints"
    assert train.Checkpointer(ckpt_dir).all_steps() == [10, 15]
    _truncate_largest_data_file(str(ckpt_dir / "15"))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 17, "split": "tr')  # a write cut off by the kill

    with pytest.warns(UserWarning) as caught:
        resumed, _ = _fit(state, step, sampler, tmp_path)
    messages = [str(w.message) for w in caught]
    assert any("checkpoint step 15" in m and "cannot be read" in m and "resumed from step 10" in m for m in messages)
    assert any("partial last line" in m and "metrics.jsonl" in m for m in messages)
    assert os.path.isdir(tmp_path / "corrupt_checkpoints" / "15")  # set aside, not deleted
    final, rows = reference
    assert int(resumed.step) == 20
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(resumed), _leaves(final), strict=True))
    assert _train_rows(tmp_path) == rows  # steps 1..20 once each, the same losses


def test_repeated_rows_from_two_writers_are_kept_once_on_resume(tmp_path, setup, reference):
    defs, state, step, sampler = setup
    with pytest.raises(Killed):
        _fit(state, step, sampler, tmp_path, on_step=_kill_at(13))
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines + lines[:4]))  # what two processes appending to one file leave
    with pytest.warns(UserWarning, match="dropped 4 repeated rows"):
        _fit(state, step, sampler, tmp_path)
    assert _train_rows(tmp_path) == reference[1]


def test_unreadable_checkpoints_and_metrics_name_the_file_and_the_fix(tmp_path, setup):
    defs, state, step, sampler = setup
    with pytest.raises(Killed):
        _fit(state, step, sampler, tmp_path, on_step=_kill_at(12))  # checkpoints 5 and 10
    for s in (5, 10):
        _truncate_largest_data_file(str(tmp_path / "checkpoints" / str(s)))
    with pytest.raises(
        train.CheckpointReadError, match=r"no checkpoint in .*checkpoints can be read \(steps \[10, 5\]"
    ):
        _fit(state, step, sampler, tmp_path)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "5"]  # nothing moved when none reads
    with pytest.raises(train.CheckpointReadError, match="delete .*checkpoints to restart this stage"):
        train.Checkpointer(tmp_path / "checkpoints").restore(state)

    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join([lines[0], "{oops\n", *lines[1:]]))
    with pytest.raises(train.MetricsFileError, match=r"metrics.jsonl line 2 is not valid JSON.*delete that line"):
        train.read_metrics(tmp_path)


def test_truncated_report_and_config_name_the_file_and_the_fix(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"name": "x", "seed": 0, "mod')
    (tmp_path / "report.json").write_text('{"name": "x", "stages": [{"label": "0_tr')
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{tmp_path}/report.json is not valid JSON" in err and f"--workdir {tmp_path} to rewrite it" in err

    (tmp_path / "report.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(workdir_lib.RunFileError, match="is not a slimjax report"):
        report_lib.read_report(str(tmp_path))
    os.remove(tmp_path / "report.json")
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "report.json does not exist" in capsys.readouterr().err

    with pytest.raises(workdir_lib.RunFileError, match=r"config.json is not valid JSON \(line 1"):
        run_lib.load_run_config(str(tmp_path))
