"""Tune quickstart: search learning rate, width, sparsity and bits of an MLP on scikit-learn's
shipped 8x8 digits for the best validation accuracy at the fewest bytes.

Run:
  slimjax tune configs/tune_quickstart.py --trials 12 --objective val_accuracy:max --objective bytes:min

Pipeline per trial: train (300 steps) -> prune (gradual magnitude pruning, fine-tuned) -> quantize
(post-training, per-channel, ``bits`` bits). The space (``get_space``) names ``--set`` keys:
learning rate (log scale), hidden widths, pruning sparsity and weight bits; ``stages.train.optimizer``
chooses adam or adamw, and ``stages.train.weight_decay`` exists only under adamw (a conditional key).

Expected: about 90 s of CPU for the 12 trials plus one baseline run of the unmodified config (the
hypervolume reference); the first trials mostly compile (``python -m experiments.benchmarks.tune_overhead``
splits a trial's time into compile and train). Validation accuracy about 0.97-0.99 at 1.4-2.5 KB on the Pareto front, and the smallest
trials (under 1 KB, 90%+ sparsity at 4 bits) lose most of it; ``tune.txt`` lists the Pareto trials and
``best/trial_<n>.py`` reruns one with ``slimjax run``. ``:smoke`` shrinks every stage for tests.
"""

from methods.pruning import PruneStage
from methods.quantization import QuantizeStage
from research.automl import Categorical
from research.automl import Float
from research.automl import Space
from research.config import Config
from research.config import DataConfig
from research.config import ModelConfig
from research.stages import TrainStage


def get_config(arg: str | None = None) -> Config:
    smoke = arg == "smoke"
    return Config(
        name="tune-quickstart" if not smoke else "tune-quickstart-smoke",
        seed=0,
        model=ModelConfig(name="mlp", options={"widths": (64,)}),
        data=DataConfig(name="digits", limit=600 if smoke else None),
        stages=(
            TrainStage(
                steps=12 if smoke else 300,
                learning_rate=3e-3,
                batch_size=64,
                checkpoint_every=6 if smoke else 100,
                eval_every=0,
                log_every=6 if smoke else 50,
            ),
            PruneStage(
                sparsity=0.5,
                schedule="polynomial",
                train=TrainStage(steps=6 if smoke else 150, learning_rate=1e-3, batch_size=64, eval_every=0),
            ),
            QuantizeStage(bits=8, per_channel=True, calibration_examples=64 if smoke else 256),
        ),
    )


def get_space(arg: str | None = None) -> Space:
    del arg
    return Space(
        {
            "stages.train.learning_rate": Float(3e-4, 3e-2, log=True),
            "stages.train.optimizer": Categorical(["adam", "adamw"]),
            "stages.train.weight_decay": Float(1e-5, 1e-2, log=True, when={"stages.train.optimizer": "adamw"}),
            "model.options.widths": Categorical(["[32]", "[64]", "[128]"]),
            "stages.prune.sparsity": Float(0.3, 0.95),
            "stages.quantize.bits": Categorical([4, 8]),
        }
    )
