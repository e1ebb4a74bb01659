"""Learned projections for FitNets hints, held as ordinary parameters next to the student.

FitNets trains a regressor ``r`` that maps the student's guided-layer output to the shape of the
teacher's hint layer. ``r`` must be trained with the student, so it has to live in the
parameters that the train step differentiates. :class:`HintedStudent` is a small NNX wrapper
that holds ``student`` and ``projections`` side by side: its parameters are
``{"student": <the student's own tree>, "projections": {0: ..., 1: ...}}``, it forwards
``__call__`` to the student, and the KD transforms address student layers by the student's own
paths (they add the ``student/`` prefix themselves). After training, :func:`unwrap_student`
returns the student with its original paths; the projections are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from methods.distillation.capture import intermediates


class HintedStudent(nnx.Module):
    """A student plus one learned projection per FitNets hint pair.

    Attributes:
      student: the wrapped student model (any NNX model).
      projections: ``nnx.List`` of modules, projection ``i`` for hint pair ``i``.
    """

    PREFIX = "student"

    def __init__(self, student: nnx.Module, projections: Sequence[nnx.Module]):
        self.student = student
        self.projections = nnx.List(list(projections))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.student(x)

    def project(self, i: int, feature: jax.Array) -> jax.Array:
        """Applies projection ``i`` to a student feature."""
        return self.projections[i](feature)


def with_hints(
    student: nnx.Module,
    teacher: nnx.Module,
    hints: Sequence[tuple[str, str]],
    sample_x: jax.Array | np.ndarray,
    *,
    rngs: nnx.Rngs,
) -> HintedStudent:
    """Wraps ``student`` with a projection for each ``(student_path, teacher_path)`` hint pair.

    Each projection is an ``nnx.Linear`` over the last (channel) axis: a fully connected
    regressor for ``(B, D)`` features and a 1x1 convolution for ``(B, H, W, C)`` maps (student
    and teacher maps must then share their spatial size).

    Args:
      student: the student model (kept as is, not copied).
      teacher: the teacher model (only run once on ``sample_x`` to read feature shapes).
      hints: pairs of module paths, student first.
      sample_x: a few inputs, to infer the feature shapes.
      rngs: initialises the projections.

    Returns:
      A :class:`HintedStudent`.

    Raises:
      ValueError: a pair whose non-channel shapes differ.
    """
    hints = tuple(tuple(h) for h in hints)
    s_paths = [s for s, _ in hints]
    t_paths = [t for _, t in hints]
    sample_x = np.asarray(sample_x)[:2]
    student_copy, teacher_copy = nnx.clone(student), nnx.clone(teacher)
    student_copy.eval()
    teacher_copy.eval()
    _, s_feats = intermediates(student_copy, sample_x, s_paths)
    _, t_feats = intermediates(teacher_copy, sample_x, t_paths)
    projections = []
    for s_path, t_path in hints:
        s_shape, t_shape = s_feats[s_path].shape, t_feats[t_path].shape
        if len(s_shape) != len(t_shape) or s_shape[1:-1] != t_shape[1:-1]:
            raise ValueError(
                f"hint pair ({s_path!r}, {t_path!r}): student feature {s_shape} and teacher feature "
                f"{t_shape} differ in more than the channel (last) axis; pick layers with the same "
                "spatial size"
            )
        projections.append(nnx.Linear(s_shape[-1], t_shape[-1], rngs=rngs))
    return HintedStudent(student, projections)


def unwrap_student(model: nnx.Module) -> nnx.Module:
    """The student inside a :class:`HintedStudent`, or ``model`` itself."""
    return model.student if isinstance(model, HintedStudent) else model


def student_prefix(model: nnx.Module) -> str:
    """The path prefix of the student's modules inside ``model`` (``""`` or ``"student/"``)."""
    return HintedStudent.PREFIX + "/" if isinstance(model, HintedStudent) else ""
