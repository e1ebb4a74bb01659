"""Structured pruning: coupled channel groups traced from the model, and physical removal."""

from methods.pruning.structured.channels import ChannelPlan
from methods.pruning.structured.channels import ChannelRule
from methods.pruning.structured.channels import GroupPlan
from methods.pruning.structured.channels import StructuredPruningWarning
from methods.pruning.structured.channels import apply_plan
from methods.pruning.structured.channels import channel_masks
from methods.pruning.structured.channels import list_channel_scores
from methods.pruning.structured.channels import plan_channels
from methods.pruning.structured.channels import register_channel_score
from methods.pruning.structured.channels import remove_channels
from methods.pruning.structured.graph import ChannelGroup
from methods.pruning.structured.graph import Member
from methods.pruning.structured.graph import trace_groups
from methods.pruning.structured.rebuild import can_rebuild
from methods.pruning.structured.rebuild import fix_containers
from methods.pruning.structured.rebuild import rebuild
from methods.pruning.structured.rebuild import register_fixup
from methods.pruning.structured.rebuild import register_rebuilder

__all__ = [
    "ChannelGroup",
    "ChannelPlan",
    "ChannelRule",
    "GroupPlan",
    "Member",
    "StructuredPruningWarning",
    "apply_plan",
    "can_rebuild",
    "channel_masks",
    "fix_containers",
    "list_channel_scores",
    "plan_channels",
    "rebuild",
    "register_channel_score",
    "register_fixup",
    "register_rebuilder",
    "remove_channels",
    "trace_groups",
]
