"""One-shot NAS on MNIST-1D: train the conv1d_family supernet, search it, fine-tune the chosen member.

Run:
  slimjax nas configs/nas_mnist1d.py                 # (or: slimjax run configs/nas_mnist1d.py)
  slimjax nas configs/nas_mnist1d.py:smoke --workdir /tmp/nas   # seconds-to-a-minute variant for tests
  slimjax nas configs/nas_mnist1d.py --set stages.nas.max_flops=100000

The nas stage writes every candidate (options, supernet validation accuracy, FLOPs, bytes, Pareto
flag) to ``stages/0_nas/nas.json``, picks the front's most accurate member within ``max_flops``,
extracts it as an ordinary conv1d_family model and fine-tunes it; the int8 quantize stage then
works on that member like on any zoo model. ``get_space()`` is the family's search space, named by
the ``--set`` keys (``model.options.width_0`` ...).
"""

from methods.nas import NASStage
from methods.quantization import QuantizeStage
from research.automl import Space
from research.config import Config
from research.config import DataConfig
from research.config import ModelConfig
from research.nn import get_family
from research.stages import TrainStage

FAMILY = "conv1d_family"


def get_space() -> Space:
    """The family's choices as ``model.options.<name>`` keys (what ``slimjax tune`` searches)."""
    return get_family(FAMILY).get_space()


def get_config(arg: str | None = None) -> Config:
    smoke = arg == "smoke"
    return Config(
        name="nas-mnist1d" if not smoke else "nas-mnist1d-smoke",
        seed=0,
        model=ModelConfig(name=FAMILY),
        data=DataConfig(name="mnist1d"),
        stages=(
            NASStage(
                supernet_steps=8 if smoke else 1500,
                trials=4 if smoke else 48,
                batch=2 if smoke else 16,
                batch_size=32 if smoke else 128,
                max_flops=0.0 if smoke else 200_000.0,
                train=TrainStage(
                    steps=4 if smoke else 300,
                    learning_rate=1e-3,
                    checkpoint_every=2 if smoke else 100,
                    eval_every=0,
                ),
            ),
            *(() if smoke else (QuantizeStage(bits=8, calibration_examples=256),)),
        ),
    )
