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

from experiments.int8_seq.kurtosis import experiment_parser
from experiments.int8_seq.kurtosis import finetune_and_export
from experiments.int8_seq.kurtosis import print_means
from experiments.int8_seq.kurtosis import trained
from experiments.int8_seq.kurtosis import variations_of
from methods.quantization import quant_noise_regularizer
from research.data import load_dataset


def main(argv=None) -> None:
    """Command line: see the module docstring."""
    p = experiment_parser(__doc__)
    p.add_argument("--weight", type=float, default=1.0)
    p.add_argument("--target", default="top1", choices=("top1", "kl"))
    p.add_argument("--scale", type=float, default=1.0, help="noise amplitude in int8 grid steps")
    p.add_argument("--no-control", action="store_true", help="skip the fine-tuning without the term")
    a = p.parse_args(argv)
    ds = load_dataset("mnist1d", seed=0)
    label = f"noise {a.weight:g} {a.target} x{a.scale:g}"
    runs = ([] if a.no_control else [("control", [])]) + [
        (label, [quant_noise_regularizer(a.weight, scale=a.scale, target=a.target)])
    ]
    rows = []
    for init, data in variations_of(a):
        base = trained(ds, init, data, cache=a.cache)
        for name, transforms in runs:
            rows += finetune_and_export(
                base, ds, init, data, name, transforms, a.rules, a.steps, a.learning_rate, a.schedule
            )
    print_means(rows, [name for name, _ in runs], a.rules)


if __name__ == "__main__":
    main()
