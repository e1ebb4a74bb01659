"""Every zoo model exported to TFLite fp32/int8 and ONNX: sizes, latencies and differences.

Run:
    python -m experiments.benchmarks.export [--quick] [--models lenet5,resnet20]
        [--dataset digits] [--train-steps 150] [--batch 8] [--fixed-batch]

Each zoo model (its default widths; ``--quick``: the smallest widths and 60 training steps) is
trained briefly on the data set (full int8 needs realistic activation ranges and a trained
model makes top-1 agreement meaningful), then :func:`research.export.export` writes TFLite fp32
and int8 (calibrated on 256 training inputs; per-channel kernels, the ``int8_dense_per_tensor``
variant with one scale per fully connected kernel and ``int8_per_tensor`` with one scale per
kernel), ONNX fp32, the ONNX conversion of the int8 TFLite file (asymmetric Q/DQ) and the TensorRT-ready symmetric Q/DQ ONNX file, and runs each in its
runtime (LiteRT, onnxruntime; one thread each) on the same ``--batch`` test inputs as the
jitted JAX model. Files have a variable batch dimension (the API's default route: converted at
a fixed batch, dimension freed; ``--fixed-batch`` keeps it fixed). One table: JAX accuracy, TFLite fp32/int8 sizes and their ratio (target
int8 <= 0.3x fp32), median latency of JAX, TFLite fp32, TFLite int8, ONNX fp32 and the
symmetric int8 ONNX file, max relative difference of each artifact and int8 top-1 agreement
on the test split. Below it, per model that misses the size target, where the int8 file's bytes
go, read from the flatbuffer (:func:`research.export.size_breakdown`): constants, quantization
vectors (a float32 scale and an int64 zero point per output channel of every kernel) and graph;
``gz i8/fp32`` is the same ratio after gzip (what an app download carries: the all-zero zero
points compress away, float32 weights barely compress).

This replaces ``export_latency.py`` (one model, every artifact): ``--models lenet5 --dataset
mnist5k --full-table`` prints that model's full :meth:`ExportReport.table`.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from research.data import load_dataset
from research.export import export
from research.nn import TINY_OPTIONS
from research.nn import build_model
from research.nn import list_models
from research.train import train_scan

ONE_D = {"cnn1d"}


def train(model: nnx.Module, x: np.ndarray, y: np.ndarray, steps: int, batch: int = 128) -> None:
    """Adam on random minibatches, the whole loop one jitted ``lax.scan`` (one compilation)."""
    train_scan(model, x, y, steps=steps, batch_size=batch, learning_rate=3e-3, seed=0)


def bench_model(name: str, data, args) -> tuple[dict, object]:
    """Trains, exports and measures one zoo model; returns a table row and the report."""
    flat = name in ONE_D and len(data.input_shape) > 1
    x_train = data.x_train.reshape(len(data.x_train), -1) if flat else data.x_train
    x_test = data.x_test.reshape(len(data.x_test), -1) if flat else data.x_test
    opts = TINY_OPTIONS.get(name, {}) if args.quick else {}  # --quick: smallest widths
    model = build_model(name, input_shape=x_train.shape[1:], num_classes=data.num_classes, rngs=nnx.Rngs(0), **opts)
    t0 = time.perf_counter()
    train(model, x_train, data.y_train, args.train_steps)
    acc = float(np.mean(np.asarray(model(jnp.asarray(x_test))).argmax(-1) == data.y_test))
    quantize = ("fp16", "dynamic_int8", "int8", "int8_dense_per_tensor", "int8_per_tensor", "int8_qdq_symmetric")
    rep = export(
        model,
        x_test[: args.batch],
        formats=("stablehlo", "tflite", "onnx") if args.full_table else ("tflite", "onnx"),
        out_dir=tempfile.mkdtemp(prefix=f"export_{name}_"),
        quantize=quantize if args.full_table else quantize[2:],
        calibration=x_train[:256],
        eval_data=x_test,
        latency_repeats=args.repeats,
        batch_polymorphic=not args.fixed_batch,
    )
    fp32, int8 = rep["tflite_fp32"].size_bytes, rep["tflite_int8"].size_bytes
    params = sum(np.asarray(v).size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    row = {
        "model": name,
        "params": params,
        "acc": acc,
        "fp32 KiB": fp32 / 1024,
        "int8 KiB": int8 / 1024,
        "int8/fp32": int8 / fp32,
        "i8dpt/fp32": rep["tflite_int8_dense_per_tensor"].size_bytes / fp32,
        "i8pt/fp32": rep["tflite_int8_per_tensor"].size_bytes / fp32,
        "gz i8/fp32": rep["tflite_int8"].gzip_bytes / rep["tflite_fp32"].gzip_bytes,
        "jax ms": rep.jax_latency_ms,
        "tfl32 ms": rep["tflite_fp32"].latency_ms,
        "tfl8 ms": rep["tflite_int8"].latency_ms,
        "ort32 ms": rep["onnx_fp32"].latency_ms,
        "ort8sym ms": rep["onnx_int8_qdq_symmetric"].latency_ms,
        "rel tfl32": rep["tflite_fp32"].max_rel_diff,
        "rel ort32": rep["onnx_fp32"].max_rel_diff,
        "rel tfl8": rep["tflite_int8"].max_rel_diff,
        "agree tfl8": rep["tflite_int8"].top1_agreement,
        "agree tfl8dpt": rep["tflite_int8_dense_per_tensor"].top1_agreement,
        "agree tfl8pt": rep["tflite_int8_per_tensor"].top1_agreement,
        "agree ort8": rep["onnx_int8"].top1_agreement,
        "agree ort8sym": rep["onnx_int8_qdq_symmetric"].top1_agreement,
        "trt sym": rep["onnx_int8_qdq_symmetric"].extra["qdq"]["tensorrt_symmetric"],
        "s": time.perf_counter() - t0,
    }
    row["_parts"] = {k: rep[f"tflite_{k}"].extra["size_breakdown"] for k in ("fp32", "int8")}
    return row, rep


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.2e}" if (v and abs(v) < 1e-2) else f"{v:.3f}"
    return str(v)


def table(rows: list[dict]) -> str:
    """Plain-text table of the rows."""
    cols = [c for c in rows[0] if not c.startswith("_")]
    cells = [[_fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def why_not(row: dict) -> str:
    """Where the bytes of a model's int8 file go, when it is larger than 0.3x its fp32 file."""
    f32, i8 = row["_parts"]["fp32"], row["_parts"]["int8"]
    kib = 1 / 1024
    floor = (i8["constants"] + f32["other"]) / f32["total"]
    return (
        f"{row['model']}: int8/fp32 = {row['int8/fp32']:.3f}. fp32 file {f32['total'] * kib:.1f} KiB = "
        f"{f32['constants'] * kib:.1f} constants + {f32['other'] * kib:.1f} graph. int8 file "
        f"{i8['total'] * kib:.1f} KiB = {i8['constants'] * kib:.1f} constants (int8 kernels, int32 "
        f"biases) + {i8['quant_vectors'] * kib:.1f} quantization vectors ({i8['quant_entries']} "
        f"float32 scale + int64 zero point pairs, mostly one per output channel) + "
        f"{i8['other'] * kib:.1f} graph. Without any quantization metadata the ratio would be "
        f"{floor:.3f}; int8_dense_per_tensor gives {row['i8dpt/fp32']:.3f}, int8_per_tensor "
        f"{row['i8pt/fp32']:.3f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smallest widths, 60 training steps")
    p.add_argument("--models", default=",".join(list_models()))
    p.add_argument("--dataset", default="digits")
    p.add_argument("--train-steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=8, help="batch size of the latency input")
    p.add_argument("--repeats", type=int, default=50, help="timed calls per latency")
    p.add_argument("--fixed-batch", action="store_true", help="export a fixed batch dim")
    p.add_argument("--full-table", action="store_true", help="all artifacts, full report table")
    args = p.parse_args()
    if args.train_steps is None:
        args.train_steps = 60 if args.quick else 150
    if args.quick:
        args.repeats = min(args.repeats, 20)

    data = load_dataset(args.dataset, seed=0)
    names = [n for n in args.models.split(",") if n]
    rows = []
    for name in tqdm(names, desc="export zoo"):
        row, rep = bench_model(name, data, args)
        rows.append(row)
        if args.full_table:
            print(f"\n{name} on {args.dataset}, latency batch {args.batch}")
            print(rep.table())
    print(
        f"\nzoo export on {args.dataset} ({'quick' if args.quick else 'default widths'}), "
        f"latency batch {args.batch}, one thread per runtime, jax {jax.__version__}"
    )
    print(table(rows))
    meet = [r["model"] for r in rows if r["int8/fp32"] <= 0.3]
    meet_dpt = [r["model"] for r in rows if r["i8dpt/fp32"] <= 0.3]
    meet_pt = [r["model"] for r in rows if r["i8pt/fp32"] <= 0.3]
    print(f"\nint8 TFLite <= 0.3x fp32: {', '.join(meet) or 'none'}")
    print(f"int8_dense_per_tensor TFLite <= 0.3x fp32: {', '.join(meet_dpt) or 'none'}")
    print(f"int8_per_tensor TFLite <= 0.3x fp32: {', '.join(meet_pt) or 'none'}")
    for r in rows:
        if r["int8/fp32"] > 0.3:
            print("  " + why_not(r))


if __name__ == "__main__":
    main()
