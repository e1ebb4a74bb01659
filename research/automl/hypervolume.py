"""Exact hypervolume, hypervolume contributions and the box decomposition behind EHVI.

Everything is in loss space: every objective is minimised, and the reference point bounds
the dominated region from above. Pure numpy (the box decomposition feeds the jitted EHVI
of :mod:`research.automl.mo`).
"""

from __future__ import annotations

import numpy as np

from research.automl.samplers import nondominated_rank

__all__ = ["hypervolume", "hypervolume_contributions", "nondominated_boxes", "pareto_mask"]


def _check(losses: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref = np.asarray(reference, float).reshape(-1)
    pts = np.asarray(losses, float).reshape(-1, ref.shape[0]) if np.size(losses) else np.zeros((0, ref.shape[0]))
    if not np.all(np.isfinite(ref)):
        raise ValueError(f"reference={ref.tolist()} must be finite; pass a point worse than every objective value")
    return pts, ref


def pareto_mask(losses: np.ndarray) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``losses`` ``(n, m)`` (minimisation)."""
    losses = np.asarray(losses, float)
    if not len(losses):
        return np.zeros(0, bool)
    return nondominated_rank(losses) == 0


def hypervolume(losses: np.ndarray, reference: np.ndarray) -> float:
    """The volume dominated by ``losses`` ``(n, m)`` (all minimised) and bounded by ``reference``.

    Points not strictly better than the reference in every objective add nothing. Exact:
    a sweep for two objectives, slicing over the last objective otherwise (fine for a few
    objectives and the few hundred points of a study).

    Args:
      losses: Objective values, every objective minimised.
      reference: The reference point ``(m,)``.

    Returns:
      The hypervolume (0.0 when no point is better than the reference).

    Raises:
      ValueError: If the reference point is not finite.

    Example:
      >>> hypervolume(np.array([[1.0, 2.0], [2.0, 1.0]]), np.array([3.0, 3.0]))
      3.0
    """
    pts, ref = _check(losses, reference)
    pts = pts[np.all(pts < ref, axis=1)]
    if not len(pts):
        return 0.0
    if pts.shape[1] == 1:
        return float(ref[0] - pts[:, 0].min())
    if pts.shape[1] == 2:
        pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]
        volume, best_y = 0.0, ref[1]
        for x, y in pts:
            if y < best_y:
                volume += (ref[0] - x) * (best_y - y)
                best_y = y
        return float(volume)
    pts = pts[pareto_mask(pts)]
    order = np.argsort(pts[:, -1], kind="stable")
    volume = 0.0
    for i, idx in enumerate(order):
        z_next = pts[order[i + 1], -1] if i + 1 < len(order) else ref[-1]
        if z_next > pts[idx, -1]:
            volume += (z_next - pts[idx, -1]) * hypervolume(pts[order[: i + 1], :-1], ref[:-1])
    return float(volume)


def hypervolume_contributions(losses: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Exclusive hypervolume contribution of each row: ``HV(all) - HV(all without it)``.

    Dominated rows and rows not better than the reference contribute 0.

    Example:
      >>> hypervolume_contributions(np.array([[1.0, 2.0], [2.0, 1.0]]), np.array([3.0, 3.0]))
      array([1., 1.])
    """
    pts, ref = _check(losses, reference)
    out = np.zeros(len(pts))
    if pts.shape[1] == 2:
        ok = np.flatnonzero(np.all(pts < ref, axis=1))
        # Sweep when the points are mutually non-dominated and distinct (otherwise removing a
        # point can uncover one it dominated, and duplicates share their volume).
        if len(ok) == len(pts) and np.all(pareto_mask(pts)) and len(np.unique(pts, axis=0)) == len(pts):
            ok = ok[np.argsort(pts[ok, 0])]
            xs, ys = pts[ok, 0], pts[ok, 1]
            x_next = np.append(xs[1:], ref[0])
            y_prev = np.insert(ys[:-1], 0, ref[1])
            out[ok] = (x_next - xs) * (y_prev - ys)
            return out
    total = hypervolume(pts, ref)
    for i in range(len(pts)):
        out[i] = total - hypervolume(np.delete(pts, i, axis=0), ref)
    return np.maximum(out, 0.0)


def nondominated_boxes(losses: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint boxes covering the region below ``reference`` that ``losses`` do not dominate.

    The hypervolume improvement of a new point ``y`` is then exactly
    ``sum_b prod_j max(0, hi[b, j] - max(y_j, lo[b, j]))``. One box per cell of the grid that
    the front's coordinates span in the first ``m - 1`` objectives (lower bound ``-inf`` on
    the first cell of each axis): within such a column, a point is dominated exactly when
    its last objective reaches the lowest last objective of the front points that weakly
    dominate the column's lower corner, so the column's non-dominated part is one box from
    ``-inf`` up to that value (the reference where no point does). ``O(k^(m-1))`` boxes for
    ``k`` front points: ``k + 1`` for two objectives.

    Args:
      losses: Objective values ``(n, m)``, minimised.
      reference: The reference point ``(m,)``.

    Returns:
      ``(lo, hi)``, each ``(n_boxes, m)``.

    Example:
      >>> lo, hi = nondominated_boxes(np.array([[1.0, 2.0], [2.0, 1.0]]), np.array([3.0, 3.0]))
      >>> hi.tolist()
      [[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]]
    """
    pts, ref = _check(losses, reference)
    m = ref.shape[0]
    pts = pts[np.all(pts < ref, axis=1)]
    if len(pts):
        pts = pts[pareto_mask(pts)]
    axes = [np.concatenate([[-np.inf], np.unique(pts[:, j]), [ref[j]]]) for j in range(m - 1)]
    lo = hi = np.zeros((1, 0))  # one objective: a single column
    if m > 1:
        cell = np.stack(np.meshgrid(*[np.arange(len(a) - 1) for a in axes], indexing="ij"), -1).reshape(-1, m - 1)
        lo = np.stack([axes[j][cell[:, j]] for j in range(m - 1)], -1)
        hi = np.stack([axes[j][cell[:, j] + 1] for j in range(m - 1)], -1)
    # Top of each column: the lowest last objective among the points below its lower corner.
    below = np.all(pts[None, :, : m - 1] <= lo[:, None, :], axis=-1)  # (cells, k)
    top = np.min(np.where(below, pts[None, :, m - 1], ref[m - 1]), axis=1, initial=ref[m - 1])
    lo = np.concatenate([lo, np.full((len(lo), 1), -np.inf)], axis=1)
    hi = np.concatenate([hi, top[:, None]], axis=1)
    return lo, hi
