"""Structured pruning: coupled channel groups traced from the model, and physical removal."""

from methods.pruning.structured.channels import (
    ChannelPlan,
    ChannelRule,
    GroupPlan,
    apply_plan,
    channel_masks,
    list_channel_scores,
    plan_channels,
    register_channel_score,
    remove_channels,
)
from methods.pruning.structured.graph import ChannelGroup, Member, trace_groups
from methods.pruning.structured.rebuild import can_rebuild, rebuild, register_rebuilder

__all__ = [
    "ChannelGroup",
    "ChannelPlan",
    "ChannelRule",
    "GroupPlan",
    "Member",
    "apply_plan",
    "can_rebuild",
    "channel_masks",
    "list_channel_scores",
    "plan_channels",
    "rebuild",
    "register_channel_score",
    "register_rebuilder",
    "remove_channels",
    "trace_groups",
]
