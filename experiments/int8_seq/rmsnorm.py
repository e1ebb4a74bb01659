"""Full-int8 agreement of transformers whose norms are ``nnx.RMSNorm`` (Llama-style), converted with
the norm as one ``L2_NORMALIZATION`` (the default ``int8_layernorm="l2_normalization"``) against the
layer's own ops (``"as_is"``); prints a table, both forms side by side per training.

The zoo ViT (digits) and attention + GRU (MNIST-1D), at their defaults (as the slow tests train them), with every
``nnx.LayerNorm`` replaced by an ``nnx.RMSNorm`` of the same width before training (same init seed
otherwise), then trained as the slow tests train the LayerNorm models (``train_scan``, 1500 Adam
steps, lr 1e-2, batch 128, data order ``d``). Each trained model is exported once per form to a
TFLite ``int8`` file (min/max activation ranges from the first 256 training inputs); columns: the
float model's test accuracy, the file's top-1 agreement with it (test split + sample + a batch of
one, as the export reports it), and the median over the test split of the largest absolute logit
error.

Run from the repository root:
  python -m experiments.int8_seq.rmsnorm                         # vit and attn_gru, data orders 0-2
  python -m experiments.int8_seq.rmsnorm --models vit --seeds 0
"""

from __future__ import annotations

import argparse
import tempfile
import warnings

import numpy as np
from flax import nnx

from research.data import load_dataset
from research.export import TFLiteRunner
from research.export import export
from research.nn import build_model
from research.nn import replace_modules
from research.train import train_scan

DATASETS = {"vit": "digits", "attn_gru": "mnist1d"}
FORMS = ("l2_normalization", "as_is")


def rms_model(name: str, ds, init: int) -> nnx.Module:
    """The zoo model ``name`` at its defaults with each LayerNorm replaced by an RMSNorm."""
    model = build_model(name, input_shape=ds.x_train.shape[1:], num_classes=ds.num_classes, rngs=nnx.Rngs(init))
    rngs = nnx.Rngs(init)
    model, replaced = replace_modules(model, nnx.LayerNorm, lambda p, m: nnx.RMSNorm(m.scale.shape[-1], rngs=rngs))
    if not replaced:
        raise ValueError(f"{name} has no nnx.LayerNorm to replace")
    return model


def export_form(model: nnx.Module, ds, ref: np.ndarray, form: str) -> dict:
    """Top-1 agreement and median max-logit error of ``model``'s int8 TFLite file in ``form``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = export(
            model,
            ds.x_test[:8],
            formats=("tflite",),
            out_dir=tempfile.mkdtemp(),
            quantize="int8",
            calibration=ds.x_train[:256],
            eval_data=ds.x_test,
            latency_repeats=1,
            format_options={"tflite": {"int8_layernorm": form}},
        )
    y = TFLiteRunner(rep["tflite_int8"].path)(ds.x_test)
    return {"agreement": rep["tflite_int8"].top1_agreement, "median_err": float(np.median(np.abs(y - ref).max(-1)))}


def main(argv=None) -> None:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="data-order seeds (init seed 0)")
    p.add_argument("--steps", type=int, default=1500)
    a = p.parse_args(argv)
    print(
        "| model | data order | test acc | l2_normalization agreement | as_is agreement | l2 median err | as_is median err |"
    )
    print("|---|---|---|---|---|---|---|")
    rows = []
    for name in a.models:
        ds = load_dataset(DATASETS[name], seed=0)
        for seed in a.seeds:
            model = rms_model(name, ds, 0)
            train_scan(model, ds.x_train, ds.y_train, steps=a.steps, batch_size=128, seed=seed)
            ref = np.asarray(nnx.jit(lambda m, x: m(x))(model, ds.x_test))
            acc = float(np.mean(ref.argmax(-1) == ds.y_test))
            got = {form: export_form(model, ds, ref, form) for form in FORMS}
            rows.append((name, got))
            l2, as_is = got["l2_normalization"], got["as_is"]
            print(
                f"| {name} | {seed} | {acc:.3f} | {l2['agreement']:.4f} | {as_is['agreement']:.4f} | "
                f"{l2['median_err']:.3f} | {as_is['median_err']:.3f} |",
                flush=True,
            )
    for name in a.models:
        sel = [g for n, g in rows if n == name]
        means = {f: np.mean([g[f]["agreement"] for g in sel]) for f in FORMS}
        lows = {f: min(g[f]["agreement"] for g in sel) for f in FORMS}
        print(
            f"{name}: mean agreement l2_normalization {means['l2_normalization']:.4f} (min "
            f"{lows['l2_normalization']:.4f}), as_is {means['as_is']:.4f} (min {lows['as_is']:.4f})"
        )


if __name__ == "__main__":
    main()
