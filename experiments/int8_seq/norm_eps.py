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

import argparse

from experiments.int8_seq.kurtosis import HEADER
from experiments.int8_seq.kurtosis import VARIATIONS
from experiments.int8_seq.kurtosis import finetune_and_export
from experiments.int8_seq.kurtosis import print_means
from experiments.int8_seq.kurtosis import trained
from methods.quantization import int8_norm_epsilon
from research.data import load_dataset


def main(argv=None) -> None:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variations", nargs="+", default=[f"{i},{d}" for i, d in VARIATIONS], help="init,data pairs")
    p.add_argument("--rules", nargs="+", default=["minmax", "percentile"])
    p.add_argument("--steps-floor", nargs="+", type=float, default=[5.0], help="epsilon floors, in int8 grid steps")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--schedule", default="constant", choices=("constant", "cosine"))
    p.add_argument("--cache", default=None, help="directory keeping the 1500-step models")
    p.add_argument("--no-control", action="store_true", help="skip the fine-tuning without the floor")
    a = p.parse_args(argv)
    ds = load_dataset("mnist1d", seed=0)
    labels = ([] if a.no_control else ["control"]) + [f"eps {s:g} steps" for s in a.steps_floor]
    print(HEADER)
    print("|" + "---|" * 10)
    rows = []
    for init, data in (tuple(int(v) for v in s.split(",")) for s in a.variations):
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
