"""Issue 15's probe: does a ``qat`` stage after ``prune`` keep the pruned weights at zero?

MNIST-1D's cnn1d: train (3,000 steps) -> prune 70% (300 steps) -> qat int8 (300 steps); prints the
non-zeros and test accuracy after each stage and what the report says about the constraint.

  python -m experiments.kd_recovery.composition_probe              # constraints kept (the default)
  python -m experiments.kd_recovery.composition_probe --release    # qat with train.keep_constraints=False

Measured (2-core CPU, jax 0.10.2): 1,623 non-zeros after prune; after qat 1,623 (kept), 5,090 with
``--release``, which is also what the checkout before issue 15 gives (run this file with
``PYTHONPATH=<old checkout>``: without ``--release`` it sets no field the old code lacks).
"""

import argparse

from methods.pruning import PruneStage
from methods.quantization import QATStage
from research.config import Config
from research.config import DataConfig
from research.config import ModelConfig
from research.run import run
from research.stages import TrainStage


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--release", action="store_true", help="qat with train.keep_constraints=False")
    p.add_argument("--workdir", default="runs/composition_probe")
    args = p.parse_args(argv)

    def schedule(steps, **kw):
        return TrainStage(steps=steps, batch_size=128, checkpoint_every=0, eval_every=0, log_every=10, **kw)

    release = {"keep_constraints": False} if args.release else {}
    config = Config(
        name="composition_probe",
        seed=0,
        model=ModelConfig(name="cnn1d"),
        data=DataConfig(name="mnist1d"),
        stages=(
            schedule(3000, learning_rate=3e-3),
            PruneStage(sparsity=0.7, train=schedule(300)),
            QATStage(bits=8, train=schedule(300, **release)),
        ),
    )
    report = run(config, args.workdir, progress=False, echo=False, overwrite=True)
    for st in report["stages"]:
        m = st["metrics"]
        said = "; ".join(f"{r['constraint']} of {r['declared_by']}: {r['status']}" for r in st.get("constraints", []))
        print(f"{st['label']:8s} non-zeros {m['nonzeros']:6,d}  test acc {m['test_accuracy']:.4f}  {said}")
    return report


if __name__ == "__main__":
    main()
