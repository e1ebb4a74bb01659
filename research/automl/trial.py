"""Trials: one configuration of a study and what became of it."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

__all__ = ["Trial", "TrialState"]


class TrialState(enum.StrEnum):
    """Life cycle of a trial.

    ``RUNNING``: asked, not told yet (visible as pending after a crash).
    ``PAUSED``: told at a budget below the maximum; a scheduler may promote it.
    ``COMPLETE``: told at its final budget with finite values.
    ``PRUNED``: stopped by a scheduler at a budget below the maximum.
    ``FAILED``: the objective raised or returned NaN/inf; never fed to a model.
    """

    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    COMPLETE = "COMPLETE"
    PRUNED = "PRUNED"
    FAILED = "FAILED"

    @property
    def finished(self) -> bool:
        return self in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAILED)


@dataclasses.dataclass(frozen=True)
class Trial:
    """An immutable snapshot of a trial.

    Attributes:
      id: Storage-wide unique id.
      number: 0-based index of the trial inside its study.
      params: The active parameters.
      state: See :class:`TrialState`.
      values: Objective values once ``COMPLETE`` (a tuple, one per objective).
      budget: Budget of the current or last evaluation (multi-fidelity), else ``None``.
      intermediate: ``{budget: value}`` of evaluations at lower budgets (multi-fidelity).
      attrs: Scheduler and user attributes (``bracket``, ``rung``, ``error``...).
    """

    id: int
    number: int
    params: Mapping[str, Any]
    state: TrialState = TrialState.RUNNING
    values: tuple[float, ...] | None = None
    budget: float | None = None
    intermediate: Mapping[float, float] = dataclasses.field(default_factory=dict)
    attrs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def value(self) -> float | None:
        """The single objective value (``None`` unless complete)."""
        if self.values is None:
            return None
        if len(self.values) != 1:
            raise ValueError(f"trial {self.number} has {len(self.values)} objectives; use .values")
        return self.values[0]
