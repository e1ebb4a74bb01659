"""Quickstart: train LeNet-5 on scikit-learn's shipped 8x8 digits, prune it, quantize it to int8
and export it, then print the report.

Run:
  slimjax run configs/quickstart.py

Pipeline: train (600 steps) -> prune (gradual magnitude pruning to 60% sparsity of every kernel,
with fine-tuning) -> quantize (post-training int8, per-channel kernels, BatchNorm folded,
min-max calibration) -> export (StableHLO, TFLite fp32 + int8, ONNX fp32 + int8, each run in its
runtime against JAX; the fake-quant model is deployed through methods.quantization's deploy
hook: its quantized kernels and learned activation ranges go into the int8 files, and a
symmetric-Q/DQ int8 ONNX file is written for TensorRT).

Expected on a 2-core CPU: about a minute; test accuracy about 0.97-0.98 on the 359 test digits
after every stage; the report table lists parameters, non-zeros, bytes, FLOPs and latency per
stage, and the export table sizes, differences and latencies per artifact.
``configs/quickstart.py:smoke`` shrinks every stage for tests (seconds).
"""

from methods.pruning import PruneStage
from methods.quantization import QuantizeStage
from research.config import Config
from research.config import DataConfig
from research.config import ModelConfig
from research.export import ExportStage
from research.stages import TrainStage


def get_config(arg: str | None = None) -> Config:
    smoke = arg == "smoke"
    return Config(
        name="quickstart" if not smoke else "quickstart-smoke",
        seed=0,
        model=ModelConfig(name="lenet5"),
        data=DataConfig(name="digits"),
        stages=(
            TrainStage(
                steps=40 if smoke else 600,
                learning_rate=3e-3,
                batch_size=64,
                checkpoint_every=20 if smoke else 200,
                eval_every=20 if smoke else 100,
            ),
            PruneStage(
                sparsity=0.6,
                schedule="polynomial",
                train=TrainStage(steps=20 if smoke else 400, learning_rate=2e-3, batch_size=64, eval_every=0),
            ),
            QuantizeStage(bits=8, per_channel=True, calibration_examples=64 if smoke else 256),
            ExportStage(
                formats=("stablehlo", "tflite", "onnx"),
                quantize=("int8", "int8_qdq_symmetric"),
                calibration_examples=64 if smoke else 256,
                eval_examples=64 if smoke else 359,
            ),
        ),
    )
