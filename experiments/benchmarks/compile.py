"""Latency of every zoo model in every runtime: JAX (jit), LiteRT, onnxruntime, TVM; fusion on vs off.

Run:
    python -m experiments.benchmarks.compile [--models mlp,resnet20] [--repeats 30]
        [--tune-trials 0] [--out experiments/benchmarks/compile]

For each zoo model at its smallest widths (``research.nn.TINY_OPTIONS``), trained briefly on
digits, ``research.export.export`` writes the float32 and int8 TFLite files, their ONNX
conversions and the TVM libraries compiled from those; every file is checked against JAX there.
Then each runtime is timed at batch 1 and 32 (LiteRT, onnxruntime and TVM with one thread; JAX
with XLA's default CPU threading; median of ``--repeats`` calls, all in this one process), with
its fusion on and off:

* JAX: the jitted function, and the same function compiled with XLA's ``fusion`` pass disabled;
* LiteRT: default interpreter (XNNPACK delegate) vs builtin kernels without the delegate (the
  converter's own fusions have no switch);
* onnxruntime: ``ORT_ENABLE_ALL`` vs ``ORT_DISABLE_ALL``;
* TVM: the default Relax pipeline vs the same pipeline without FuseOps/FuseTIR (untuned), and
  MetaSchedule-tuned libraries when ``--tune-trials`` > 0.

Every cell is a measurement or a letter pointing to the exact reason it is missing. Writes
``<out>.txt`` (the table), ``<out>.json`` and ``<out>.png`` (batch 1 and 32 latency per model and
runtime, fusion on).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from research.data import load_dataset
from research.export import export
from research.export import inference_fn
from research.export import tvm as tvm_lib
from research.export.fusion import _tflite_without_delegates
from research.export.tflite import TFLiteRunner
from research.metrics import median_ms
from research.nn import TINY_OPTIONS
from research.nn import build_model
from research.nn import list_models
from research.train import train_scan

BATCHES = (1, 32)
FLAT = {"cnn1d"}


def _ort(path: str, level: str) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort  # noqa: PLC0415

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: np.ascontiguousarray(x, np.float32)})[0]


def bench_model(name: str, data: Any, repeats: int, tune_trials: int, work: str) -> list[dict[str, Any]]:
    """One zoo model: rows (runtime, precision) with latency per batch and fusion on/off, or reasons."""
    x_train = data.x_train.reshape(len(data.x_train), -1) if name in FLAT else data.x_train
    x_test = data.x_test.reshape(len(data.x_test), -1) if name in FLAT else data.x_test
    model = build_model(
        name,
        input_shape=x_train.shape[1:],
        num_classes=data.num_classes,
        rngs=nnx.Rngs(0),
        **TINY_OPTIONS.get(name, {}),
    )
    train_scan(model, x_train, data.y_train, steps=150)
    out = os.path.join(work, name)
    rep = export(
        model,
        x_test[:32],
        formats=("tflite", "onnx", "tvm"),
        out_dir=out,
        quantize=("int8",),
        calibration=x_train[:256],
        eval_data=x_test,
        latency_repeats=3,
    )
    xs = {b: np.ascontiguousarray(x_test[:b]) for b in BATCHES}
    rows: list[dict[str, Any]] = []

    def row(runtime: str, q: str, on: dict, off: dict, agree: float | None, note: str = "") -> None:
        r = {"model": name, "runtime": runtime, "precision": q, "top1": agree, "note": note}
        for b in BATCHES:
            r[f"b{b}_on"] = on.get(b)
            r[f"b{b}_off"] = off.get(b)
        rows.append(r)

    # JAX
    fn = inference_fn(model)
    on, off = {}, {}
    for b in BATCHES:
        lowered = jax.jit(fn).lower(xs[b])
        c_on = lowered.compile()
        c_off = lowered.compile(compiler_options={"xla_disable_hlo_passes": "fusion"})
        on[b] = median_ms(lambda c=c_on, b=b: c(xs[b]).block_until_ready(), repeats)
        off[b] = median_ms(lambda c=c_off, b=b: c(xs[b]).block_until_ready(), repeats)
    row("jax", "fp32", on, off, 1.0)
    row("jax", "int8", {}, {}, None, "J")
    # LiteRT
    for q in ("fp32", "int8"):
        a = rep[f"tflite_{q}"]
        with open(a.path, "rb") as f:
            blob = f.read()
        r_on, r_off = TFLiteRunner(blob), _tflite_without_delegates(blob, 1)
        on = {b: median_ms(lambda b=b, r=r_on: r(xs[b]), repeats) for b in BATCHES}
        off = {b: median_ms(lambda b=b, r=r_off: r(xs[b]), repeats) for b in BATCHES} if r_off is not None else {}
        row("litert", q, on, off, a.top1_agreement)
    # onnxruntime
    for q in ("fp32", "int8"):
        a = rep[f"onnx_{q}"]
        r_on, r_off = _ort(a.path, "ORT_ENABLE_ALL"), _ort(a.path, "ORT_DISABLE_ALL")
        on = {b: median_ms(lambda b=b, r=r_on: r(xs[b]), repeats) for b in BATCHES}
        off = {b: median_ms(lambda b=b, r=r_off: r(xs[b]), repeats) for b in BATCHES}
        row("onnxruntime", q, on, off, a.top1_agreement)
    # TVM (untuned): the export's fused library, and one compiled without FuseOps/FuseTIR.
    for q in ("fp32", "int8"):
        names = {a.name for a in rep.artifacts}
        if f"tvm_{q}" not in names:
            row("tvm", q, {}, {}, None, next(n for n in rep.notes if n.startswith(f"tvm_{q}:")))
            continue
        a = rep[f"tvm_{q}"]
        unfused = os.path.join(out, f"model_{q}_unfused_tvm.so")
        tvm_lib.export_tvm(rep[f"onnx_{q}"].path, unfused, fuse=False, verify_input=xs[1])
        r_on, r_off = tvm_lib.TVMRunner(a.path), tvm_lib.TVMRunner(unfused)
        on = {b: median_ms(lambda b=b, r=r_on: r(xs[b]), repeats) for b in BATCHES}
        off = {b: median_ms(lambda b=b, r=r_off: r(xs[b]), repeats) for b in BATCHES}
        note = "F" if a.extra.get("int8_compute", {}).get("int8_matmul_or_conv", 0) == 0 and q == "int8" else ""
        row("tvm", q, on, off, a.top1_agreement, note)
    # TVM tuned (fp32; a tuned library has a fixed batch: one per batch size).
    if tune_trials:
        on = {}
        for b in BATCHES:
            path = os.path.join(out, f"model_fp32_tuned_b{b}_tvm.so")
            tvm_lib.export_tvm(
                rep["onnx_fp32"].path, path, tuning_trials=tune_trials, tuning_batch=b, verify_input=xs[b]
            )
            r = tvm_lib.TVMRunner(path)
            on[b] = median_ms(lambda r=r, b=b: r(xs[b]), repeats)
        row("tvm tuned", "fp32", on, {}, None, "T")
    else:
        row("tvm tuned", "fp32", {}, {}, None, "U")
    return rows


REASONS = {
    "J": "JAX has no int8 deployment path: a fake-quant model computes int8-rounded values in float32",
    "U": "not tuned in this run (pass --tune-trials N; MetaSchedule builds every candidate in a subprocess)",
    "T": "tuned: fused only (tuning needs the fused pipeline), fixed batch",
    "F": "TVM imports Q/DQ as quantize/dequantize around float32 ops: int8 values, float arithmetic",
    "-off": "LiteRT off = no XNNPACK delegate; XLA off = `fusion` pass disabled; ORT off = ORT_DISABLE_ALL; TVM off = "
    "no FuseOps/FuseTIR",
}


def _cell(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def table(rows: list[dict[str, Any]]) -> str:
    """The printable table: latency ms at batch 1 and 32, fusion on/off, with reason letters."""
    head = [
        "model",
        "runtime",
        "prec",
        "b1 on",
        "b1 off",
        "b1 off/on",
        "b32 on",
        "b32 off",
        "b32 off/on",
        "top-1",
        "note",
    ]
    cells = [head]
    for r in rows:
        line = [r["model"], r["runtime"], r["precision"]]
        for b in BATCHES:
            on, off = r[f"b{b}_on"], r[f"b{b}_off"]
            line += [_cell(on), _cell(off), f"{off / on:.2f}x" if on and off else "n/a"]
        line += ["" if r["top1"] is None else f"{r['top1']:.3f}", r["note"]]
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    used = sorted({r["note"] for r in rows if r["note"] in REASONS})
    lines += [f"{k}: {REASONS[k]}" for k in used]
    lines += [f"n/a off: {REASONS['-off']}", "long notes (tvm int8 errors) are TVM's exact messages"]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Bar chart of latency (fusion on) per model and runtime at batch 1 and 32, log scale."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    models = list(dict.fromkeys(r["model"] for r in rows))
    series = [
        (rt, q)
        for rt, q in dict.fromkeys((r["runtime"], r["precision"]) for r in rows)
        if any(r[f"b{b}_on"] for r in rows if (r["runtime"], r["precision"]) == (rt, q) for b in BATCHES)
    ]
    fig, axes = plt.subplots(1, len(BATCHES), figsize=(7 * len(BATCHES), 4.5), sharey=False)
    width = 0.8 / max(1, len(series))
    for ax, b in zip(np.atleast_1d(axes), BATCHES, strict=True):
        for i, (rt, q) in enumerate(series):
            vals = []
            for m in models:
                r = next((r for r in rows if (r["model"], r["runtime"], r["precision"]) == (m, rt, q)), None)
                vals.append(r[f"b{b}_on"] if r and r[f"b{b}_on"] else np.nan)
            ax.bar(np.arange(len(models)) + i * width, vals, width, label=f"{rt} {q}")
        ax.set_xticks(np.arange(len(models)) + 0.4 - width / 2, models, rotation=30)
        ax.set_yscale("log")
        ax.set_ylabel("latency ms, fusion on (JAX: XLA threads; others: 1 thread)")
        ax.set_title(f"batch {b}")
    np.atleast_1d(axes)[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(list_models()))
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials per tuned TVM library (0: none)")
    ap.add_argument("--out", default="experiments/benchmarks/compile", help="path stem of .txt/.json/.png")
    args = ap.parse_args()
    data = load_dataset("digits", seed=0)
    tvm_lib.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.models.split(","):
            try:
                rows += bench_model(name, data, args.repeats, args.tune_trials, work)
            except Exception as err:  # noqa: BLE001 - one model failing is a row with its error
                rows.append(
                    {
                        "model": name,
                        "runtime": "all",
                        "precision": "",
                        "top1": None,
                        "note": f"{type(err).__name__}: {err}",
                    }
                    | {f"b{b}_{k}": None for b in BATCHES for k in ("on", "off")}
                )
            print(table(rows), flush=True)
            with open(args.out + ".json", "w") as f:
                json.dump({"rows": rows, "cpu": tvm_lib.host_cpu(), "jax": jax.__version__}, f, indent=1)
    text = table(rows)
    with open(args.out + ".txt", "w") as f:
        f.write(f"CPU {tvm_lib.host_cpu()}, 1 thread, median of {args.repeats} calls\n{text}\n")
    plot(rows, args.out + ".png")
    print(text)


if __name__ == "__main__":
    main()
