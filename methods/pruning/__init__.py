"""Pruning: pytree masks, scores, schedules, an optax mask wrapper, lottery tickets, N:M and
block patterns, dynamic sparse training (SET/RigL) and structured channel removal."""

from methods.pruning import stage as _stage  # noqa: F401  (registers the "prune" stage)
from methods.pruning.dst import GROW
from methods.pruning.dst import DynamicSparseState
from methods.pruning.dst import cosine_drop_fraction
from methods.pruning.dst import dynamic_sparse
from methods.pruning.dst import list_grow_methods
from methods.pruning.dst import register_grow
from methods.pruning.dst import reset_where
from methods.pruning.encoding import sparse_bytes
from methods.pruning.lottery import imp
from methods.pruning.lottery import random_reinit
from methods.pruning.lottery import rewind
from methods.pruning.masks import DEFAULT_RULES
from methods.pruning.masks import SparsityRule
from methods.pruning.masks import apply_masks
from methods.pruning.masks import combine_masks
from methods.pruning.masks import leaf_targets
from methods.pruning.masks import mask_from_scores
from methods.pruning.masks import mask_sparsity
from methods.pruning.patterns import NM
from methods.pruning.patterns import Block
from methods.pruning.patterns import Unstructured
from methods.pruning.patterns import block_masks
from methods.pruning.patterns import nm_masks
from methods.pruning.patterns import pattern_masks
from methods.pruning.schedules import Constant
from methods.pruning.schedules import Iterative
from methods.pruning.schedules import OneShot
from methods.pruning.schedules import Polynomial
from methods.pruning.schedules import constant_schedule
from methods.pruning.schedules import iterative_schedule
from methods.pruning.schedules import one_shot_schedule
from methods.pruning.schedules import polynomial_schedule
from methods.pruning.scores import SCORERS
from methods.pruning.scores import allocate
from methods.pruning.scores import compute_masks
from methods.pruning.scores import compute_scores
from methods.pruning.scores import erk_densities
from methods.pruning.scores import list_scorers
from methods.pruning.scores import magnitude_masks
from methods.pruning.scores import random_masks
from methods.pruning.scores import register_scorer
from methods.pruning.scores import saliency_masks
from methods.pruning.scores import snip_masks
from methods.pruning.stage import PruneStage
from methods.pruning.structured import ChannelRule
from methods.pruning.structured import channel_masks
from methods.pruning.structured import plan_channels
from methods.pruning.structured import remove_channels
from methods.pruning.structured import trace_groups
from methods.pruning.structured.channels import CHANNEL_SCORES
from methods.pruning.wrapper import MaskedState
from methods.pruning.wrapper import find_masks
from methods.pruning.wrapper import masked

__all__ = [
    "GROW",
    "CHANNEL_SCORES",
    "SCORERS",
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
