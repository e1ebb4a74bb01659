"""Full-int8 agreement of the attention + GRU zoo model after fine-tuning with and without the
int8-noise agreement term (``methods.quantization.quant_noise_regularizer``); prints a table.

Same protocol as ``kurtosis.py`` (whose helpers it uses): per (init seed, data-order seed)
variation, the 1500-step model is fine-tuned twice from the same weights on the same batches,
``control`` (task loss) and ``noise`` (task loss + the term), and each result is exported to TFLite
and ONNX ``int8`` with each range rule and compared with its float model on 1009 inputs.

Run from the repository root:
  python -m experiments.int8_seq.noise --cache /tmp/q8/models                   # five variations
  python -m experiments.int8_seq.noise --variations 0,0 --weight 1 --target kl --no-control
"""

from __future__ import annotations

import argparse

from experiments.int8_seq.kurtosis import HEADER
from experiments.int8_seq.kurtosis import VARIATIONS
from experiments.int8_seq.kurtosis import finetune_and_export
from experiments.int8_seq.kurtosis import print_means
from experiments.int8_seq.kurtosis import trained
from methods.quantization import quant_noise_regularizer
from research.data import load_dataset


def main(argv=None) -> None:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variations", nargs="+", default=[f"{i},{d}" for i, d in VARIATIONS], help="init,data pairs")
    p.add_argument("--rules", nargs="+", default=["minmax", "percentile"])
    p.add_argument("--weight", type=float, default=1.0)
    p.add_argument("--target", default="top1", choices=("top1", "kl"))
    p.add_argument("--scale", type=float, default=1.0, help="noise amplitude in int8 grid steps")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--schedule", default="constant", choices=("constant", "cosine"))
    p.add_argument("--cache", default=None, help="directory keeping the 1500-step models")
    p.add_argument("--no-control", action="store_true", help="skip the fine-tuning without the term")
    a = p.parse_args(argv)
    ds = load_dataset("mnist1d", seed=0)
    label = f"noise {a.weight:g} {a.target} x{a.scale:g}"
    runs = ([] if a.no_control else [("control", [])]) + [
        (label, [quant_noise_regularizer(a.weight, scale=a.scale, target=a.target)])
    ]
    print(HEADER)
    print("|" + "---|" * 10)
    rows = []
    for init, data in (tuple(int(v) for v in s.split(",")) for s in a.variations):
        base = trained(ds, init, data, cache=a.cache)
        for name, transforms in runs:
            rows += finetune_and_export(
                base, ds, init, data, name, transforms, a.rules, a.steps, a.learning_rate, a.schedule
            )
    print_means(rows, [name for name, _ in runs], a.rules)


if __name__ == "__main__":
    main()
