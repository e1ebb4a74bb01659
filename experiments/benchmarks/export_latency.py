"""Export a small CNN to every format and print size / latency / max difference per artifact.

Run:
    python experiments/benchmarks/export_latency.py [--model lenet5] [--dataset mnist5k]
        [--train-steps 300] [--batch 32]

Trains the zoo model briefly (full int8 needs realistic activation ranges and a trained model
makes top-1 agreement meaningful), then exports StableHLO, TFLite fp32/fp16/dynamic-int8/int8
and ONNX fp32/int8, runs each artifact in its runtime (jax.export, LiteRT, onnxruntime, one
thread each) on the same batch, and prints one table: size, gzip size, median latency next to
the jitted JAX model, max abs/rel difference and top-1 agreement on the test split.
"""

from __future__ import annotations

import argparse
import tempfile

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from research.data import load_dataset
from research.export import export
from research.nn import build_model


def train(model: nnx.Module, x: np.ndarray, y: np.ndarray, steps: int, batch: int = 128) -> None:
    """A few Adam steps on random minibatches (enough for a meaningful int8 comparison)."""
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, xb, yb):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(0)
    for _ in tqdm(range(steps), desc="train", leave=False):
        idx = rng.integers(0, len(x), size=batch)
        step(model, opt, jnp.asarray(x[idx]), jnp.asarray(y[idx]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="lenet5")
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32, help="batch size of the latency input")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args()

    data = load_dataset(args.dataset, seed=0)
    model = build_model(
        args.model, input_shape=data.input_shape, num_classes=data.num_classes, rngs=nnx.Rngs(0)
    )
    train(model, data.x_train, data.y_train, args.train_steps)
    acc = float(np.mean(np.asarray(model(jnp.asarray(data.x_test))).argmax(-1) == data.y_test))
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="export_latency_")
    report = export(
        model,
        data.x_test[: args.batch],
        out_dir=out_dir,
        quantize=("fp16", "dynamic_int8", "int8"),
        calibration=data.x_train[:512],
        eval_data=data.x_test,
        latency_repeats=100,
    )
    print(
        f"{args.model} on {args.dataset}: JAX test accuracy {acc:.4f}, latency batch {args.batch}"
    )
    print(report.table())
    fp32, int8 = report["tflite_fp32"].size_bytes, report["tflite_int8"].size_bytes
    print(f"int8 / fp32 TFLite size: {int8 / fp32:.3f} (target <= 0.3)")
    qdq = report["onnx_int8"].extra["qdq"]
    print(
        f"onnx_int8: {qdq['quantize_linear']} QuantizeLinear, {qdq['dequantize_linear']} "
        f"DequantizeLinear, TensorRT-symmetric: {qdq['tensorrt_symmetric']}"
    )


if __name__ == "__main__":
    main()
