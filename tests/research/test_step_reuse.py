"""Runs of the same shapes in one process share their jitted train steps (the trials of a
``slimjax tune`` study compile them once), and a shared step computes exactly what a fresh one does."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from jax import monitoring

from methods.pruning import PruneStage
from methods.quantization import QuantizeStage
from research import config as config_lib
from research import data
from research import nn
from research import train
from research.config import Config
from research.config import DataConfig
from research.config import ModelConfig
from research.stages import TrainStage
from research.train import masking
from research.train import step as step_lib

_traced: list[str] = []


def _on_event(event: str, duration: float, **kwargs) -> None:
    del duration
    if event == "/jax/core/compile/jaxpr_trace_duration":
        _traced.append(str(kwargs.get("fun_name", "")))


monitoring.register_event_duration_secs_listener(_on_event)


def _step_traces() -> int:
    """How many times a train step (``make_train_step``'s ``step``) was traced since the last call."""
    n = sum(1 for name in _traced if name == "step")
    _traced.clear()
    return n


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits", seed=0, limit=256)


def _mlp():
    return nn.build_model("mlp", input_shape=(8, 8, 1), num_classes=10, widths=(16,), rngs=nnx.Rngs(0))


def _finetune(model, ds, workdir, **kwargs):
    opts = {"steps": 3, "learning_rate": 1e-2, "optimizer": "adamw", "weight_decay": 1e-3, "batch_size": 32}
    opts.update(kwargs)
    trained, records, (_, state) = train.finetune(
        model, ds, workdir=workdir, progress=False, checkpoint_every=0, log_every=1, return_state=True, **opts
    )
    return records, jax.tree.map(np.asarray, state.params)


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_finetune_traces_its_step_once_across_learning_rates_and_weight_decays(digits, tmp_path):
    model = _mlp()
    step_lib.clear_train_step_cache()
    _step_traces()
    _finetune(model, digits, tmp_path / "a", learning_rate=1e-2, weight_decay=1e-3)
    assert _step_traces() == 1
    records_b, params_b = _finetune(model, digits, tmp_path / "b", learning_rate=3e-3, weight_decay=1e-2)
    assert _step_traces() == 0  # the first run's step: the learning rate and decay are state values
    _finetune(model, digits, tmp_path / "c", steps=4)
    assert _step_traces() == 1  # the cosine schedule's length is part of the program: a new step

    # The shared step computes what a fresh one does for the second run's settings.
    step_lib.clear_train_step_cache()
    records_fresh, params_fresh = _finetune(model, digits, tmp_path / "e", learning_rate=3e-3, weight_decay=1e-2)
    assert _step_traces() == 1
    assert records_b == records_fresh
    assert _same(params_b, params_fresh)
    assert not _same(params_b, _finetune(model, digits, tmp_path / "f")[1])  # the learning rate did matter


def test_a_wrapper_is_shared_only_under_a_key_and_its_state_values_are_not_baked_in(digits, tmp_path):
    def keep(threshold):
        """Fixed masks (values in the optimizer state): the kernels' entries above ``threshold``."""

        def masks(params):
            return jax.tree.map(lambda p: p > threshold if p.ndim == 2 else None, params)

        return lambda tx: masking.keep_masks(tx, masks)

    model = _mlp()
    key = ("keep_masks", "kernels")
    step_lib.clear_train_step_cache()
    _step_traces()
    for name in ("a", "b"):
        _finetune(model, digits, tmp_path / name, wrap_tx=keep(0.0))
        assert _step_traces() == 1  # no key: a new step each time
    _finetune(model, digits, tmp_path / "c", wrap_tx=keep(0.0), step_key=key)
    records, params = _finetune(model, digits, tmp_path / "d", wrap_tx=keep(-0.05), step_key=key)
    assert _step_traces() == 1
    step_lib.clear_train_step_cache()
    fresh_records, fresh_params = _finetune(model, digits, tmp_path / "e", wrap_tx=keep(-0.05), step_key=key)
    assert records == fresh_records and _same(params, fresh_params)
    assert not _same(params, _finetune(model, digits, tmp_path / "f", wrap_tx=keep(0.0), step_key=key)[1])


def _metrics_files(workdir: str) -> dict[str, list[dict]]:
    out = {}
    for label in sorted(os.listdir(os.path.join(workdir, "stages"))):
        path = os.path.join(workdir, "stages", label, "metrics.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                out[label] = [json.loads(line) for line in f]
    return out


def _pipeline_config() -> Config:
    """train -> prune -> quantize of a small MLP on digits (``configs/tune_quickstart.py:smoke``)."""
    return Config(
        name="step-reuse",
        seed=0,
        model=ModelConfig(name="mlp", options={"widths": (64,)}),
        data=DataConfig(name="digits", limit=600),
        stages=(
            TrainStage(steps=12, learning_rate=3e-3, batch_size=64, checkpoint_every=6, eval_every=0, log_every=6),
            PruneStage(
                sparsity=0.5,
                schedule="polynomial",
                train=TrainStage(steps=6, learning_rate=1e-3, batch_size=64, eval_every=0),
            ),
            QuantizeStage(bits=8, per_channel=True, calibration_examples=64),
        ),
    )


@pytest.mark.slow
def test_pipeline_runs_share_train_and_prune_steps_and_match_a_fresh_process(tmp_path):
    """Two runs of train -> prune -> quantize in one process (the trials of a study): the second traces
    no train step, and its metrics equal those of the same config run with nothing cached."""
    from research.run import register_all_stages
    from research.run import run

    register_all_stages()
    base = _pipeline_config()

    def config(lr: float, sparsity: float = 0.5):
        sets = ["stages.train.optimizer=adamw", f"stages.train.learning_rate={lr}", f"stages.prune.sparsity={sparsity}"]
        return config_lib.apply_overrides(base, sets)

    step_lib.clear_train_step_cache()
    _step_traces()
    run(config(1e-3), str(tmp_path / "first"), progress=False, echo=False)
    assert _step_traces() == 2  # the train stage's and the prune stage's
    run(config(3e-3), str(tmp_path / "second"), progress=False, echo=False)
    assert _step_traces() == 0
    run(config(3e-3, sparsity=0.8), str(tmp_path / "sparser"), progress=False, echo=False)
    assert _step_traces() == 0  # the pruning targets are optimizer-state values too

    # What the shared steps computed is what steps built afresh compute.
    step_lib.clear_train_step_cache()
    run(config(3e-3), str(tmp_path / "fresh"), progress=False, echo=False)
    step_lib.clear_train_step_cache()
    run(config(3e-3, sparsity=0.8), str(tmp_path / "fresh_sparser"), progress=False, echo=False)
    second, fresh = _metrics_files(str(tmp_path / "second")), _metrics_files(str(tmp_path / "fresh"))
    assert sorted(second) == ["0_train", "1_prune"]
    assert second == fresh
    assert _metrics_files(str(tmp_path / "sparser")) == _metrics_files(str(tmp_path / "fresh_sparser"))
    assert _metrics_files(str(tmp_path / "first"))["0_train"] != second["0_train"]
    assert _metrics_files(str(tmp_path / "sparser"))["1_prune"] != second["1_prune"]


@pytest.mark.slow
def test_a_study_traces_its_train_steps_in_its_first_run_only(tmp_path):
    """``slimjax tune``'s worker runs its trials in one process: three trials of different learning
    rates and weight decays trace the train and prune steps once in all."""
    from research import tune as tune_lib
    from research.automl import Float
    from research.automl import Space
    from research.run import register_all_stages

    register_all_stages()
    config = config_lib.apply_overrides(_pipeline_config(), ["stages.train.optimizer=adamw"])
    space = Space(
        {
            "stages.train.learning_rate": Float(3e-4, 3e-2, log=True),
            "stages.train.weight_decay": Float(1e-5, 1e-2, log=True),
        }
    )
    step_lib.clear_train_step_cache()
    _step_traces()
    result = tune_lib.tune(
        config, space, str(tmp_path), trials=3, sampler="random", plot_every=0, echo=False, compilation_cache=False
    )
    assert [t["state"] for t in result.trials] == ["COMPLETE"] * 3
    assert len({t["params"]["stages.train.learning_rate"] for t in result.trials}) == 3
    assert _step_traces() == 2
