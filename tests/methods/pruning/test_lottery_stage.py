"""Lottery-ticket helpers and the prune stage (tiny runs)."""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import methods.pruning as P
from research.data import Dataset
from research.nn import build_model
from research.stages import Bundle
from research.stages import StageContext
from research.stages import TrainStage
from research.stages import get_stage


def _tiny_ds():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    return Dataset("tiny", x[:64], y[:64], x[64:80], y[64:80], x[80:], y[80:], 2)


def test_random_reinit_keeps_mask_and_values():
    p = {"kernel": jnp.arange(1.0, 9.0).reshape(2, 4), "bias": jnp.ones(4)}
    m = P.magnitude_masks(p, 0.5)
    r = P.random_reinit(p, m, jax.random.key(0))
    assert np.all(np.asarray(r["kernel"])[~np.asarray(m["kernel"])] == 0)
    assert set(np.asarray(r["kernel"]).ravel()) - {0.0} <= set(range(1, 9))
    np.testing.assert_array_equal(r["bias"], p["bias"])
    np.testing.assert_array_equal(P.rewind(p, m)["kernel"], jnp.where(m["kernel"], p["kernel"], 0))


def test_imp_rows():
    ds = _tiny_ds()
    model = build_model("mlp", input_shape=(6,), num_classes=2, widths=(8,), rngs=nnx.Rngs(0))
    rows = P.imp(model, ds, [0.5, 0.75], steps=6, batch_size=16, rewind_step=2, controls=[0.75])
    assert [r["kind"] for r in rows] == ["dense", "ticket", "ticket", "random_reinit"]
    assert rows[2]["sparsity"] == pytest.approx(0.75, abs=0.01)
    with pytest.raises(ValueError, match="increase"):
        P.imp(model, ds, [0.5, 0.4], steps=4)


def test_prune_stage(tmp_path):
    ds = _tiny_ds()
    model = build_model("mlp", input_shape=(6,), num_classes=2, widths=(16,), rngs=nnx.Rngs(0))
    cfg = P.PruneStage(
        sparsity=0.5,
        channel_ratio=0.25,
        train=TrainStage(steps=8, batch_size=16, checkpoint_every=0, eval_every=0),
    )
    _, run = get_stage("prune")
    res = run(
        Bundle(model=model, dataset=ds),
        cfg,
        StageContext(0, "0_prune", pathlib.Path(tmp_path), progress=False),
    )
    rows = {r["path"]: r for r in res.tables["layers"]}
    assert rows["layers/0/kernel"]["shape"] == "6x12" and rows["layers/0/kernel"]["kept_channels"] == "12/16"
    assert rows["layers/0/kernel"]["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert res.metrics["bitmask_bytes"] < res.metrics["dense_bytes"]
    assert "masks" in res.bundle.extras
    with pytest.raises(ValueError, match="outside"):
        dataclasses.replace(cfg, sparsity=1.0).validate()
