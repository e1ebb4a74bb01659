"""What int8 files compute on this CPU: onnxruntime's fused kernels vs the file executed as written.

Two steps, so that the second can run on another (or an emulated) CPU::

    python -m experiments.benchmarks.export_int8_isa write /tmp/int8_isa        # trains + exports
    python -m experiments.benchmarks.export_int8_isa measure /tmp/int8_isa      # this CPU
    qemu-x86_64 -cpu Haswell $(python -c 'import sys; print(sys.executable)') \\
        -m experiments.benchmarks.export_int8_isa measure /tmp/int8_isa        # an AVX2 CPU, no VNNI

``write`` trains every zoo model as ``tests/research/export/test_export_zoo.py`` does (plus an
untrained tiny MLP, 64-10-10) and exports ``tflite_int8``, ``onnx_int8`` (tf2onnx from it),
``onnx_int8_qdq_symmetric`` and ``onnx_int8_qdq_reduce_range`` with the inputs and JAX outputs
(``io.npz``). ``measure`` imports only numpy, onnxruntime and LiteRT (no JAX, so it is quick
under qemu's user-mode emulation, whose CPU model decides which kernels onnxruntime dispatches)
and prints, per model and file, top-1 agreement and max abs difference with JAX for: LiteRT;
onnxruntime with the file executed as written (``ORT_DISABLE_ALL``); the default fused session
(``ORT_ENABLE_ALL``); and the fused session with ``session.x64quantprecision=1``. The first
line says whether onnxruntime's fused int8 kernels saturate here (a one-MatMul probe).
"""

from __future__ import annotations

import argparse
import glob
import os

import numpy as np

FLAT = {"cnn1d"}
TRAIN_STEPS = {"resnet20": 400, "resnet56": 400, "mobilenetv2": 400}
FILES = ("model_int8.tflite", "model_int8.onnx", "model_int8_qdq_symmetric.onnx", "model_int8_qdq_reduce_range.onnx")


def write(root: str) -> None:
    """Trains and exports every zoo model (and a tiny untrained MLP) into ``root/<model>``."""
    from flax import nnx

    from research.data import load_dataset
    from research.export import export
    from research.export.onnx_export import saturation_probe
    from research.nn import TINY_OPTIONS
    from research.nn import build_model
    from research.nn import list_models
    from research.train import train_scan

    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "probe.onnx"), "wb") as f:
        f.write(saturation_probe().SerializeToString())
    ds = load_dataset("digits", seed=0)
    for name in [*list_models(), "tiny_mlp"]:
        base = "mlp" if name == "tiny_mlp" else name
        flat = base in FLAT
        x_train = ds.x_train.reshape(len(ds.x_train), -1) if flat else ds.x_train
        x_test = ds.x_test.reshape(len(ds.x_test), -1) if flat else ds.x_test
        opts = {"widths": (10,)} if name == "tiny_mlp" else TINY_OPTIONS.get(name, {})
        model = build_model(base, input_shape=x_train.shape[1:], num_classes=10, rngs=nnx.Rngs(0), **opts)
        if name != "tiny_mlp":
            train_scan(model, x_train, ds.y_train, steps=TRAIN_STEPS.get(name, 150))
        out = os.path.join(root, name)
        export(
            model,
            x_test[:8],
            formats=("tflite", "onnx"),
            out_dir=out,
            quantize=("int8", "int8_qdq_symmetric", "int8_qdq_reduce_range"),
            calibration=x_train[:256],
            eval_data=x_test,
            latency_repeats=1,
        )
        np.savez(os.path.join(out, "io.npz"), x=x_test, ref=np.asarray(model(x_test)))
        print("wrote", out, flush=True)


def _ort(path: str, optimized: bool, precise: bool = False):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    level = "ORT_ENABLE_ALL" if optimized else "ORT_DISABLE_ALL"
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    if precise:
        opts.add_session_config_entry("session.x64quantprecision", "1")
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def _litert(path: str):
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=path, num_threads=1)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]

    def run(x):
        interp.resize_tensor_input(inp["index"], list(x.shape), strict=False)
        interp.allocate_tensors()
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        return interp.get_tensor(out["index"]).copy()

    return run


def measure(root: str) -> None:
    """Prints the agreement table for the files ``write`` left in ``root``."""
    k = 64
    probe = _ort(os.path.join(root, "probe.onnx"), optimized=True)(np.ones((1, k), np.float32))
    print(f"onnxruntime fused int8 kernels here: {'exact' if np.allclose(probe, k) else 'SATURATE'}")
    runs = {
        "LiteRT": lambda p: _litert(p),
        "ORT as written": lambda p: _ort(p, optimized=False),
        "ORT fused": lambda p: _ort(p, optimized=True),
        "ORT fused x64quantprecision": lambda p: _ort(p, optimized=True, precise=True),
    }
    rows = [("model", "file", "session", "top-1 agree", "max abs diff")]
    for case in sorted(d for d in glob.glob(os.path.join(root, "*")) if os.path.isdir(d)):
        io = np.load(os.path.join(case, "io.npz"), allow_pickle=False)
        x, ref = io["x"].astype(np.float32), io["ref"]
        for file in FILES:
            path = os.path.join(case, file)
            for session, make in runs.items():
                if (session == "LiteRT") != file.endswith(".tflite"):
                    continue
                try:
                    y = make(path)(x)
                    top1 = f"{np.mean(y.argmax(-1) == ref.argmax(-1)):.3f}"
                    diff = f"{np.max(np.abs(y - ref)):.3f}"
                except Exception as err:  # noqa: BLE001 - onnxruntime refuses some graphs with x64quantprecision
                    top1, diff = "refused", str(err).strip().splitlines()[-1][-60:]
                rows.append((os.path.basename(case), file, session, top1, diff))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("write", "measure"))
    parser.add_argument("root")
    args = parser.parse_args()
    (write if args.step == "write" else measure)(args.root)


if __name__ == "__main__":
    main()
