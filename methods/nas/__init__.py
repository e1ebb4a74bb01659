"""One-shot architecture search over the zoo's searchable families (``research.nn.families``).

A weight-sharing supernet (the family's largest member) is trained once with the sandwich rule;
sub-networks are masks over its weights, evaluated K at a time as one vmapped program with
per-sub-network BatchNorm recalibration; a multi-objective search (accuracy, FLOPs, bytes) over the
family's ``get_space()`` finds a Pareto front whose members are extracted as ordinary, physically
smaller zoo models and fine-tuned.
"""

from methods.nas.evaluate import bn_momentum
from methods.nas.evaluate import calibration_batches
from methods.nas.evaluate import evaluate_subnets
from methods.nas.evaluate import make_evaluator
from methods.nas.evaluate import recalibrate
from methods.nas.sandwich import make_sandwich_step
from methods.nas.sandwich import sandwich_loss
from methods.nas.sandwich import sandwich_masks
from methods.nas.sandwich import train_supernet
from methods.nas.search import Candidate
from methods.nas.search import CostModel
from methods.nas.search import pareto_front
from methods.nas.search import search
from methods.nas.stage import NASStage
from methods.nas.stage import run_nas
from methods.nas.supernet import Supernet
from methods.nas.supernet import apply
from methods.nas.supernet import build_supernet
from methods.nas.supernet import extract
from methods.nas.supernet import masks_for
from methods.nas.supernet import merge
from methods.nas.supernet import split_supernet
from methods.nas.supernet import stack_masks

__all__ = [
    "Candidate",
    "CostModel",
    "NASStage",
    "pareto_front",
    "run_nas",
    "search",
    "Supernet",
    "apply",
    "bn_momentum",
    "build_supernet",
    "calibration_batches",
    "evaluate_subnets",
    "extract",
    "make_evaluator",
    "make_sandwich_step",
    "masks_for",
    "merge",
    "recalibrate",
    "sandwich_loss",
    "sandwich_masks",
    "split_supernet",
    "stack_masks",
    "train_supernet",
]
