"""Pruning: pytree masks, scores, schedules, an optax mask wrapper, lottery tickets, N:M and
block patterns, dynamic sparse training (SET/RigL) and structured channel removal."""

from methods.pruning import stage as _stage  # noqa: F401  (registers the "prune" stage)
from methods.pruning.dst import (
    DynamicSparseState,
    cosine_drop_fraction,
    dynamic_sparse,
    list_grow_methods,
    register_grow,
    reset_where,
)
from methods.pruning.encoding import sparse_bytes
from methods.pruning.lottery import imp, random_reinit, rewind
from methods.pruning.masks import (
    DEFAULT_RULES,
    SparsityRule,
    apply_masks,
    combine_masks,
    leaf_targets,
    mask_from_scores,
    mask_sparsity,
)
from methods.pruning.patterns import NM, Block, Unstructured, block_masks, nm_masks, pattern_masks
from methods.pruning.schedules import (
    Constant,
    Iterative,
    OneShot,
    Polynomial,
    constant_schedule,
    iterative_schedule,
    one_shot_schedule,
    polynomial_schedule,
)
from methods.pruning.scores import (
    allocate,
    compute_masks,
    compute_scores,
    erk_densities,
    list_scorers,
    magnitude_masks,
    random_masks,
    register_scorer,
    saliency_masks,
    snip_masks,
)
from methods.pruning.stage import PruneStage
from methods.pruning.structured import (
    ChannelRule,
    channel_masks,
    plan_channels,
    remove_channels,
    trace_groups,
)
from methods.pruning.wrapper import MaskedState, find_masks, masked

__all__ = [
    "Block",
    "ChannelRule",
    "Constant",
    "DEFAULT_RULES",
    "DynamicSparseState",
    "Iterative",
    "MaskedState",
    "NM",
    "OneShot",
    "Polynomial",
    "PruneStage",
    "SparsityRule",
    "Unstructured",
    "allocate",
    "apply_masks",
    "block_masks",
    "channel_masks",
    "combine_masks",
    "compute_masks",
    "compute_scores",
    "constant_schedule",
    "cosine_drop_fraction",
    "dynamic_sparse",
    "erk_densities",
    "find_masks",
    "imp",
    "iterative_schedule",
    "leaf_targets",
    "list_grow_methods",
    "list_scorers",
    "magnitude_masks",
    "mask_from_scores",
    "mask_sparsity",
    "masked",
    "nm_masks",
    "one_shot_schedule",
    "pattern_masks",
    "plan_channels",
    "polynomial_schedule",
    "random_masks",
    "random_reinit",
    "register_grow",
    "register_scorer",
    "remove_channels",
    "reset_where",
    "rewind",
    "saliency_masks",
    "snip_masks",
    "sparse_bytes",
    "trace_groups",
]
