"""Variable-batch TFLite files by the two routes: graph, size and LiteRT latency side by side.

Run:
    python -m experiments.benchmarks.export_batch_route [--models mobilenetv2,resnet20]
        [--dataset digits] [--repeats 50]

For each zoo model (default widths, initial weights, eval mode; the graph and the latency do not
depend on training) the float32 and int8 TFLite files are converted twice with a variable
batch dimension: ``batch_route="jax2tf"`` (jax2tf shape polymorphism) and ``"static"`` (traced
at a fixed batch, the batch dimension freed in the flatbuffer; the default route of
:func:`research.export.to_tflite`). Both files run in LiteRT (one thread) at batch 1 and 8 on the
same test inputs; the table gives operator counts, sizes, median latencies, the jax2tf/static
latency ratio and the largest difference from JAX of each float32 file (at batch 1 and 8).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from research.data import load_dataset
from research.export import TFLiteRunner
from research.export import inference_fn
from research.export import to_tflite
from research.export.tflite import op_counts
from research.metrics.cost import latency
from research.nn import build_model
from research.nn import list_models
from research.report import format_table

ROUTES = ("jax2tf", "static")


def bench_model(name: str, data, repeats: int) -> list[dict]:
    """Both routes of one zoo model; one row per (route, fp32/int8)."""
    flat = name == "cnn1d" and len(data.input_shape) > 1
    x_train = data.x_train.reshape(len(data.x_train), -1) if flat else data.x_train
    x_test = data.x_test.reshape(len(data.x_test), -1) if flat else data.x_test
    model = build_model(name, input_shape=x_train.shape[1:], num_classes=data.num_classes, rngs=nnx.Rngs(0))
    model.eval()
    fn = inference_fn(model)
    jfn = jax.jit(fn)
    refs = {b: np.asarray(jfn(x_test[:b])) for b in (1, 8)}
    rows = []
    for q in ("fp32", "int8"):
        by_route = {}
        for route in ROUTES:
            blob = to_tflite(fn, x_test[:8], quantize=q, calibration=x_train[:256], batch_route=route)
            run = TFLiteRunner(blob)
            ops = op_counts(blob)
            row = {
                "model": name,
                "q": q,
                "route": route,
                "ops": sum(ops.values()),
                "broadcast_to": ops.get("BROADCAST_TO", 0),
                "KiB": len(blob) / 1024,
            }
            for b in (1, 8):
                row[f"ms b{b}"] = latency(run, x_test[:b], repeats=repeats)["median"] * 1e3
            if q == "fp32":
                row["max diff"] = max(float(np.max(np.abs(run(x_test[:b]) - refs[b]))) for b in (1, 8))
            by_route[route] = row
            rows.append(row)
        for b in (1, 8):
            by_route["static"][f"speedup b{b}"] = by_route["jax2tf"][f"ms b{b}"] / by_route["static"][f"ms b{b}"]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(list_models()))
    p.add_argument("--dataset", default="digits")
    p.add_argument("--repeats", type=int, default=50, help="timed calls per latency")
    args = p.parse_args()
    data = load_dataset(args.dataset, seed=0)
    rows = []
    for name in tqdm([n for n in args.models.split(",") if n], desc="batch routes"):
        rows += bench_model(name, data, args.repeats)
    print(f"\nvariable-batch TFLite routes on {args.dataset}, LiteRT one thread, jax {jax.__version__}")
    print(format_table(rows))


if __name__ == "__main__":
    main()
