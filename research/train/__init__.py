"""Training core: state, pluggable jitted steps, evaluation, the loop, checkpoints."""

from research.train.checkpoint import Checkpointer
from research.train.checkpoint import CheckpointReadError
from research.train.checkpoint import CheckpointWarning
from research.train.finetune import finetune
from research.train.finetune import make_optimizer
from research.train.loop import MetricsFileError
from research.train.loop import NonFiniteLossError
from research.train.loop import default_block_steps
from research.train.loop import fit
from research.train.loop import read_metrics
from research.train.losses import BatchLoss
from research.train.losses import LossFn
from research.train.losses import LossTransform
from research.train.losses import apply_transforms
from research.train.losses import compose
from research.train.losses import cross_entropy_loss
from research.train.losses import l2_regularizer
from research.train.scan import has_convolution
from research.train.scan import loops_slow_down_convolutions
from research.train.scan import scan_steps
from research.train.scan import train_scan
from research.train.state import ModelDefs
from research.train.state import TrainState
from research.train.state import create_train_state
from research.train.state import merge_model
from research.train.state import split_model
from research.train.state import state_to_model
from research.train.step import evaluate
from research.train.step import make_eval_step
from research.train.step import make_train_step

__all__ = [
    "BatchLoss",
    "CheckpointReadError",
    "CheckpointWarning",
    "Checkpointer",
    "LossFn",
    "LossTransform",
    "MetricsFileError",
    "ModelDefs",
    "NonFiniteLossError",
    "TrainState",
    "apply_transforms",
    "compose",
    "create_train_state",
    "cross_entropy_loss",
    "default_block_steps",
    "evaluate",
    "finetune",
    "fit",
    "has_convolution",
    "l2_regularizer",
    "loops_slow_down_convolutions",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "merge_model",
    "read_metrics",
    "scan_steps",
    "split_model",
    "state_to_model",
    "train_scan",
]
