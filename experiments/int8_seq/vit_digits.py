"""Full-int8 agreement of the zoo ViT on digits: as trained, after a plain fine-tuning, and after
raising its LayerNorm epsilons to a floor on the int8 grid and fine-tuning; prints a table.

The export zoo test (``tests/research/export/test_export_zoo.py``) trains the ViT (init seed 0, 1500
Adam steps, lr 1e-2, batch 128, ``train_scan``) on digits and exports it to full int8; over
data-order seeds its TFLite file agreed with JAX on 0.978-0.995 of the inputs, below the 0.99
target. Per data-order seed this experiment trains that model once and exports, with each
``activation_calibration`` rule:

* ``as trained``: the 1500-step model itself (what the zoo test exports);
* ``control``: that model fine-tuned 300 Adam steps (lr 1e-3 constant, batch 128);
* ``eps S steps``: ``methods.quantization.int8_norm_epsilon(model, first 256 training inputs,
  steps=S)``, then the same fine-tuning (same batches).

Agreement is each file's top-1 agreement with the float model it was converted from, over the
digits test split + the sample + a batch of one (the export's comparison).

Run from the repository root, with one XLA thread as the tests use (``NPROC=1``: the trained
weights depend on the thread count):
  NPROC=1 python -m experiments.int8_seq.vit_digits --cache /tmp/vit8/models          # seeds 0-6
  NPROC=1 python -m experiments.int8_seq.vit_digits --seeds 0 1 --steps-floor 5 10 --rules percentile
"""

from __future__ import annotations

import argparse

from experiments.int8_seq.kurtosis import HEADER
from experiments.int8_seq.kurtosis import export_rows
from experiments.int8_seq.kurtosis import finetune_and_export
from experiments.int8_seq.kurtosis import print_means
from experiments.int8_seq.kurtosis import trained
from methods.quantization import int8_norm_epsilon
from research.data import load_dataset
from research.nn import TINY_OPTIONS


def main(argv=None) -> None:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=list(range(7)), help="data-order seeds (init seed 0)")
    p.add_argument("--rules", nargs="+", default=["minmax", "percentile"])
    p.add_argument("--steps-floor", nargs="+", type=float, default=[5.0], help="epsilon floors, in int8 grid steps")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--no-control", action="store_true", help="skip the as-trained and plain fine-tuned rows")
    p.add_argument("--cache", default=None, help="directory keeping the 1500-step models")
    a = p.parse_args(argv)
    ds = load_dataset("digits", seed=0)
    print(HEADER)
    print("|" + "---|" * 10)
    rows = []
    for data in a.seeds:
        base = trained(ds, 0, data, cache=a.cache, name="vit", **TINY_OPTIONS.get("vit", {}))
        if not a.no_control:
            rows += export_rows(base, ds, 0, data, "as trained", a.rules, 0.0)
        models = [] if a.no_control else [("control", base)]
        for s in a.steps_floor:
            model, changed = int8_norm_epsilon(base, ds.x_train[:256], steps=s)
            print(f"  (0,{data}) epsilon {s:g} steps:", {k: round(v[1], 3) for k, v in changed.items()}, flush=True)
            models.append((f"eps {s:g} steps", model))
        for label, model in models:
            rows += finetune_and_export(model, ds, 0, data, label, [], a.rules, a.steps, a.learning_rate, "constant")
    labels = ([] if a.no_control else ["as trained", "control"]) + [f"eps {s:g} steps" for s in a.steps_floor]
    print_means(rows, labels, a.rules)


if __name__ == "__main__":
    main()
