"""QAT/PTQ on LeNet-5 and the shipped 5,000-image MNIST subset: float vs PTQ vs QAT (STE, LSQ).

Run (defaults: 2 seeds, bits 8 and 4, a few minutes on a 2-core CPU)::

    python -m experiments.qat_int8.main
    python -m experiments.qat_int8.main --seeds 0 1 2 --bits 8 6 4 3 2 --plot /tmp/acc_vs_bits.png

For every seed a float LeNet-5 is trained, then for every bit width: PTQ (min-max calibration
on 512 training images, no training), QAT with the straight-through estimator and QAT with LSQ,
both fine-tuned from the calibrated PTQ model. Weights are per-channel symmetric, activations
(every layer input) per tensor; all layers are quantized. Prints a table of test accuracy
(mean and spread over seeds) and optionally plots accuracy against bits.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import optax
from flax import nnx

from methods.quantization import QuantRule
from methods.quantization import calibrate
from methods.quantization import quantize_model
from research.data import BatchSampler
from research.data import Dataset
from research.data import calibration_subset
from research.data import load_dataset
from research.nn import build_model
from research.train import create_train_state
from research.train import evaluate
from research.train import fit
from research.train import make_train_step
from research.train import split_model
from research.train import state_to_model


def _load(dataset: str) -> Dataset:
    """A registered data set, or a ``.npz`` of a saved split (machines without its package)."""
    if not dataset.endswith(".npz"):
        return load_dataset(dataset)
    with np.load(dataset, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    return Dataset(name=dataset, num_classes=int(arrays["y_train"].max()) + 1, **arrays)


def save_split(dataset: str, path: str) -> None:
    """Saves the train/val/test split of ``dataset`` to ``path`` (``.npz``) for :func:`_load`."""
    ds = load_dataset(dataset)
    np.savez_compressed(path, **{f"{a}_{s}": getattr(ds, f"{a}_{s}") for a in "xy" for s in ("train", "val", "test")})


def _train(model, ds, steps, lr, seed, batch_size=128):
    tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
    defs, state = create_train_state(model, tx, seed=seed)
    step = make_train_step(defs, tx, donate=False)
    sampler = BatchSampler(ds.x_train, ds.y_train, batch_size=batch_size, seed=seed)
    state, _ = fit(state, step, sampler, num_steps=steps, progress=False)
    return state_to_model(defs, state)


def _accuracy(model, ds) -> float:
    defs, params, model_state = split_model(nnx.clone(model))
    return evaluate(defs, params, model_state, ds.x_test, ds.y_test)["accuracy"]


def train_and_evaluate(
    *,
    seeds=(0, 1),
    bits=(8, 4),
    dataset="mnist5k",
    model_name="lenet5",
    float_steps=300,
    qat_steps=150,
    float_lr=3e-3,
    qat_lr=5e-4,
    calibration_examples=512,
) -> list[dict]:
    """Returns one row per (seed, method, bits) with test accuracy."""
    ds = _load(dataset)
    rows = []
    for seed in seeds:
        model = build_model(model_name, input_shape=ds.input_shape, num_classes=ds.num_classes, rngs=nnx.Rngs(seed))
        t0 = time.perf_counter()
        model = _train(model, ds, float_steps, float_lr, seed)
        rows.append({"seed": seed, "method": "float", "bits": 32, "accuracy": _accuracy(model, ds)})
        print(f"seed {seed}: float {rows[-1]['accuracy']:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
        calib = calibration_subset(ds, calibration_examples, seed=seed)
        batches = [calib[i : i + 128] for i in range(0, len(calib), 128)]
        for b in bits:
            for method in ("ste", "lsq"):
                q = calibrate(quantize_model(model, [QuantRule(bits=b, method=method)]), batches)
                if method == "ste":
                    rows.append({"seed": seed, "method": "ptq", "bits": b, "accuracy": _accuracy(q, ds)})
                t0 = time.perf_counter()
                q = _train(q, ds, qat_steps, qat_lr, seed)
                name = "qat_ste" if method == "ste" else "qat_lsq"
                rows.append({"seed": seed, "method": name, "bits": b, "accuracy": _accuracy(q, ds)})
                print(
                    f"seed {seed}: {b}-bit ptq {rows[-2]['accuracy'] if method == 'ste' else '':} "
                    f"{name} {rows[-1]['accuracy']:.4f} ({time.perf_counter() - t0:.0f}s)",
                    flush=True,
                )
    return rows


def summarize(rows: list[dict]) -> str:
    """Table: method x bits, test accuracy mean ± std over seeds and the gap to float."""
    floats = [r["accuracy"] for r in rows if r["method"] == "float"]
    f_mean = float(np.mean(floats))
    lines = [f"{'method':<8} {'bits':>4}  {'test acc (mean ± std)':>22}  {'vs float (points)':>17}  seeds"]
    keys = sorted({(r["method"], r["bits"]) for r in rows}, key=lambda k: (k[0] != "float", -k[1], k[0]))
    for method, b in keys:
        acc = np.array([r["accuracy"] for r in rows if r["method"] == method and r["bits"] == b])
        lines.append(
            f"{method:<8} {b:>4}  {100 * acc.mean():>14.2f} ± {100 * acc.std():4.2f}  "
            f"{100 * (acc.mean() - f_mean):>+17.2f}  {len(acc)}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """Accuracy against bits for PTQ, QAT-STE and LSQ (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    f_mean = np.mean([r["accuracy"] for r in rows if r["method"] == "float"])
    ax.axhline(100 * f_mean, color="gray", ls="--", label="float")
    for method in ("ptq", "qat_ste", "qat_lsq"):
        bits = sorted({r["bits"] for r in rows if r["method"] == method})
        acc = [100 * np.mean([r["accuracy"] for r in rows if r["method"] == method and r["bits"] == b]) for b in bits]
        ax.plot(bits, acc, marker="o", label=method)
    ax.set_xlabel("bits (weights and activations)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    p.add_argument("--dataset", default="mnist5k", help="a registered data set or a saved .npz split")
    p.add_argument("--float-steps", type=int, default=300)
    p.add_argument("--qat-steps", type=int, default=150)
    p.add_argument("--plot", default="")
    args = p.parse_args(argv)
    rows = train_and_evaluate(
        seeds=tuple(args.seeds),
        bits=tuple(args.bits),
        dataset=args.dataset,
        float_steps=args.float_steps,
        qat_steps=args.qat_steps,
    )
    print(summarize(rows))
    if args.plot:
        plot(rows, args.plot)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
