"""The decompose stage: factorize, fine-tune with KD, report, and resume with the same structure."""

import json

import pytest
from flax import nnx

from methods.decomposition import DecomposeStage
from methods.decomposition import DecompositionRule
from methods.decomposition import LowRankLinear
from methods.decomposition import Tucker2Conv
from research.data import load_dataset
from research.nn import build_model
from research.stages import Bundle
from research.stages import StageContext
from research.stages import TrainStage
from research.stages import get_stage


def test_decompose_stage_runs_and_resumes(tmp_path):
    ds = load_dataset("digits", limit=96)
    model = build_model("lenet5", input_shape=ds.input_shape, num_classes=ds.num_classes, rngs=nnx.Rngs(0))
    cfg = DecomposeStage(
        rules=(
            DecompositionRule(pattern="conv2", rank=(3, 8)),
            DecompositionRule(pattern="fc1", energy=0.9),
        ),
        check_speed=False,
        distill=True,
        train=TrainStage(steps=4, batch_size=32, checkpoint_every=2, eval_every=0, log_every=2),
    )
    config_cls, run = get_stage("decompose")
    assert config_cls is DecomposeStage
    ctx = StageContext(index=1, label="1_decompose", workdir=tmp_path / "s", seed=0, progress=False)
    result = run(Bundle(model=model, dataset=ds), cfg, ctx)
    out = result.bundle.model
    assert isinstance(out.conv2, Tucker2Conv) and isinstance(out.fc1, LowRankLinear)
    assert result.metrics["layers_factorized"] == 2 and result.metrics["params_after"] < result.metrics["params_before"]
    assert {r["path"] for r in result.tables["layers"]} == {"conv2", "fc1"}
    assert any("stage's input model: 0.1 CE + 0.9 hinton(temperature=4.0)" in n for n in result.notes)
    saved = json.loads((tmp_path / "s" / "factorization.json").read_text())
    assert saved["layers"][0]["rank"] == "(3, 8)"
    again = run(Bundle(model=model, dataset=ds), cfg, ctx)  # finished checkpoint: rebuilt from the record
    assert any("resumed" in n for n in again.notes)
    assert nnx.graphdef(again.bundle.model) == nnx.graphdef(out)


def test_decompose_stage_validates():
    with pytest.raises(ValueError, match="rules is empty"):
        DecomposeStage(rules=()).validate()
    with pytest.raises(ValueError, match="at most one"):
        DecomposeStage(budget_param_ratio=0.5, budget_flop_ratio=0.5).validate()
