"""One-shot architecture search over the zoo's searchable families (``research.nn.families``).

A weight-sharing supernet (the family's largest member) is trained once with the sandwich rule (optionally with
progressive shrinking: largest first, then kernel, depth and width choices freed in turn);
sub-networks are masks over its weights, evaluated K at a time as one vmapped program with
per-sub-network BatchNorm recalibration; a multi-objective search (accuracy, FLOPs, bytes) over the
family's ``get_space()`` finds a Pareto front whose members are extracted as ordinary, physically
smaller zoo models and fine-tuned.
"""

from research.lazy import lazy_exports

# Public name -> defining module, imported on first use (PEP 562): the config classes' modules are
# light (no JAX), the rest import JAX and Flax.
_EXPORTS = {
    "bn_momentum": "methods.nas.evaluate",
    "calibration_batches": "methods.nas.evaluate",
    "evaluate_subnets": "methods.nas.evaluate",
    "make_evaluator": "methods.nas.evaluate",
    "recalibrate": "methods.nas.evaluate",
    "Phase": "methods.nas.sandwich",
    "SHRINK_ORDER": "methods.nas.sandwich",
    "make_sandwich_step": "methods.nas.sandwich",
    "phase_masks": "methods.nas.sandwich",
    "progressive_phases": "methods.nas.sandwich",
    "sandwich_loss": "methods.nas.sandwich",
    "sandwich_masks": "methods.nas.sandwich",
    "train_supernet": "methods.nas.sandwich",
    "Candidate": "methods.nas.search",
    "CostModel": "methods.nas.search",
    "pareto_front": "methods.nas.search",
    "search": "methods.nas.search",
    "NASStage": "methods.nas.config",
    "run_nas": "methods.nas.stage",
    "Supernet": "methods.nas.supernet",
    "apply": "methods.nas.supernet",
    "build_supernet": "methods.nas.supernet",
    "extract": "methods.nas.supernet",
    "masks_for": "methods.nas.supernet",
    "merge": "methods.nas.supernet",
    "split_supernet": "methods.nas.supernet",
    "stack_masks": "methods.nas.supernet",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

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
    "Phase",
    "phase_masks",
    "progressive_phases",
    "SHRINK_ORDER",
    "masks_for",
    "merge",
    "recalibrate",
    "sandwich_loss",
    "sandwich_masks",
    "split_supernet",
    "stack_masks",
    "train_supernet",
]
