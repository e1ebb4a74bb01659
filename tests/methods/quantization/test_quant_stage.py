"""The ``quantize`` and ``qat`` stages through the experiment runner."""

import numpy as np
import pytest

from methods.quantization import QATStage
from methods.quantization import QuantizeStage
from methods.quantization import QuantRule
from research.config import Config
from research.config import DataConfig
from research.config import ModelConfig
from research.config import apply_overrides
from research.run import load_run
from research.run import run
from research.stages import TrainStage
from research.stages import list_stages


def test_stages_are_registered():
    assert {"quantize", "qat"} <= set(list_stages())


def test_quantize_then_qat_run(tmp_path):
    config = Config(
        name="quant-smoke",
        model=ModelConfig(name="mlp", options={"widths": (32,)}),
        data=DataConfig(name="digits", limit=400),
        stages=(
            TrainStage(steps=30, learning_rate=3e-3, batch_size=32, checkpoint_every=0, eval_every=0),
            QuantizeStage(bits=8, calibration_examples=64, calibration_batch_size=32),
            QATStage(
                rules=(QuantRule(pattern="^head$", bits=8), QuantRule(pattern=".*", bits=4, method="lsq")),
                observer="percentile",
                calibration_examples=64,
                train=TrainStage(steps=10, learning_rate=1e-3, batch_size=32, checkpoint_every=0, eval_every=0),
            ),
        ),
    )
    config = apply_overrides(config, ["stages.1.observer=mse"])
    report = run(config, str(tmp_path / "run"), progress=False, echo=False)
    ptq, qat = report["stages"][1], report["stages"][2]
    train_acc = report["stages"][0]["metrics"]["test_accuracy"]
    assert abs(ptq["metrics"]["test_accuracy"] - train_acc) < 0.05
    assert {r["path"]: r["weight_bits"] for r in ptq["tables"]["quant_layers"]} == {"head": 8, "layers/0": 8}
    assert ptq["metrics"]["compression_vs_fp32"] > 3.0  # scales and biases stay 32-bit
    # the qat stage fine-tunes the PTQ model it received
    assert any("previous stage" in n for n in qat["notes"])
    assert np.isfinite(qat["metrics"]["test_accuracy"])
    _, model, extras = load_run(str(tmp_path / "run"))
    params = extras["quant_params"]
    assert set(params["layers"]) == {"head", "layers/0"} and params["float_layers"] == []


def test_stage_validation():
    with pytest.raises(ValueError, match="bits=9"):
        QuantizeStage(bits=9).validate()
    with pytest.raises(ValueError, match="not registered"):
        QATStage(method="magic").validate()
