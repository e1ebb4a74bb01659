"""Full-int8 agreement of the attention + GRU zoo model after raising its LayerNorm epsilons to a
floor on the int8 grid (``methods.quantization.int8_norm_epsilon``) and fine-tuning; prints a table.

Same protocol as ``kurtosis.py`` (whose helpers it uses): per (init seed, data-order seed)
variation, the 1500-step model is fine-tuned twice from the same weights on the same batches
(300 Adam steps, lr 1e-3 constant): ``control`` as it is, ``eps S`` after
``int8_norm_epsilon(model, first 256 training inputs, steps=S)``. Each result is exported to TFLite
and ONNX ``int8`` with each range rule and compared with its own float model on 1009 inputs.

Run from the repository root:
  python -m experiments.int8_seq.norm_eps --cache /tmp/q8/models                  # five variations
  python -m experiments.int8_seq.norm_eps --variations 0,0 --steps-floor 5 10 --no-control
"""

from __future__ import annotations

from experiments.int8_seq.kurtosis import experiment_parser
from experiments.int8_seq.kurtosis import finetune_and_export
from experiments.int8_seq.kurtosis import print_means
from experiments.int8_seq.kurtosis import trained
from experiments.int8_seq.kurtosis import variations_of
from methods.quantization import int8_norm_epsilon
from research.data import load_dataset


def main(argv=None) -> None:
    """Command line: see the module docstring."""
    p = experiment_parser(__doc__)
    p.add_argument("--steps-floor", nargs="+", type=float, default=[5.0], help="epsilon floors, in int8 grid steps")
    p.add_argument("--no-control", action="store_true", help="skip the fine-tuning without the floor")
    a = p.parse_args(argv)
    ds = load_dataset("mnist1d", seed=0)
    labels = ([] if a.no_control else ["control"]) + [f"eps {s:g} steps" for s in a.steps_floor]
    rows = []
    for init, data in variations_of(a):
        base = trained(ds, init, data, cache=a.cache)
        models = [] if a.no_control else [("control", base)]
        for s in a.steps_floor:
            model, changed = int8_norm_epsilon(base, ds.x_train[:256], steps=s)
            print(
                f"  ({init},{data}) epsilon {s:g} steps:", {k: round(v[1], 3) for k, v in changed.items()}, flush=True
            )
            models.append((f"eps {s:g} steps", model))
        for label, model in models:
            rows += finetune_and_export(model, ds, init, data, label, [], a.rules, a.steps, a.learning_rate, a.schedule)
    print_means(rows, labels, a.rules)


if __name__ == "__main__":
    main()
