"""Constraints carried across stages: what a stage fixed that later stages must keep.

A stage that constrains the model declares it in ``bundle.extras["constraints"]`` (stored with
the finished stage, as data):

* ``"sparsity"``: pruning masks (``bundle.extras["masks"]``, a pytree shaped like the params with
  bool leaves and ``None`` for unpruned leaves) and their pattern (``unstructured``, ``nm`` with
  ``n``/``m``, ``block``). Every later fine-tuning stage keeps the masked weights at exactly zero
  (:func:`research.train.masking.keep_masks`, the fixed-mask form of ``methods.pruning.masked``).
* ``"factorized"``: the factor parameters of a factorized model (paths and shapes). Kept by the
  model's structure; a later stage that replaces them is reported.
* ``"quantized"``: the fake-quant ranges (paths, shapes and values). Ranges that are trainable
  parameters (LSQ step sizes, PACT clips) are frozen by later fine-tuning stages; observed ranges
  (min/max of a kernel or an activation) follow their observers, as in the stage that made them.

A fine-tuning stage releases them with ``TrainStage(keep_constraints=False)`` (``--set
stages.<kind>.train.keep_constraints=false``). After every stage the runner
(:func:`check_stage`) compares the model with the constraints it started under: kept ones are
re-keyed to the new model's parameter paths (a fake-quant wrapper adds ``/layer/`` to a kernel's
path), changed or released ones are reported in the stage's record and with a
:class:`ConstraintWarning`.

Parameters of the old and new model are matched by path: the same path, or a path that contains
the old path's parts in order (wrappers insert parts) with the same last part and shape.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

CONSTRAINTS = "constraints"
MASKS = "masks"
SPARSITY = "sparsity"
FACTORIZED = "factorized"
QUANTIZED = "quantized"


class ConstraintWarning(UserWarning):
    """A stage changed or released a constraint an earlier stage declared."""


# ----------------------------------------------------------------------------- declarations


def declared(extras: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The constraints declared in ``extras`` by kind (a run stored before constraints were
    declared still has its pruning masks: they count as a sparsity constraint)."""
    out = {k: dict(v) for k, v in dict(extras.get(CONSTRAINTS) or {}).items()}
    if extras.get(MASKS) is not None and SPARSITY not in out:
        out[SPARSITY] = {"kind": SPARSITY, "stage": "an earlier stage", "pattern": "unstructured"}
    return out


def declare(extras: Mapping[str, Any], kind: str, *, stage: str, **record: Any) -> dict[str, Any]:
    """A copy of ``extras`` with the constraint ``kind`` declared by ``stage`` (replacing an earlier one)."""
    cons = dict(extras.get(CONSTRAINTS) or {})
    cons[kind] = {"kind": kind, "stage": stage, **record}
    return {**extras, CONSTRAINTS: cons}


def drop(extras: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """A copy of ``extras`` without the constraint ``kind`` (and without the masks for ``sparsity``)."""
    cons = {k: v for k, v in dict(extras.get(CONSTRAINTS) or {}).items() if k != kind}
    out = {k: v for k, v in extras.items() if k != CONSTRAINTS and not (kind == SPARSITY and k == MASKS)}
    if cons:
        out[CONSTRAINTS] = cons
    return out


def declare_sparsity(extras: Mapping[str, Any], masks: Any, *, stage: str, **pattern: Any) -> dict[str, Any]:
    """Declares pruning ``masks`` (stored as ``extras["masks"]``) with their ``pattern`` facts."""
    flat = _flat(masks)
    kept = int(sum(int(np.sum(m)) for m in flat.values()))
    size = int(sum(m.size for m in flat.values()))
    out = declare(
        extras, SPARSITY, stage=stage, leaves=len(flat), masked_zeros=size - kept, masked_size=size, **pattern
    )
    out[MASKS] = masks
    return out


def declare_factorized(extras: Mapping[str, Any], params: Any, paths: list[str], *, stage: str) -> dict[str, Any]:
    """Declares the factor parameters under the module ``paths`` of a factorized model."""
    flat = _flat(params)
    leaves = {p: list(np.shape(x)) for p, x in flat.items() if any(p.startswith(m + "/") for m in paths)}
    return declare(extras, FACTORIZED, stage=stage, layers=list(paths), params=leaves)


def declare_quantized(extras: Mapping[str, Any], ranges: Mapping[str, Any], trainable: list[str], *, stage: str):
    """Declares the fake-quant ranges (``{path: array}`` of every range leaf; ``trainable``: those that are params)."""
    values = {p: np.asarray(v) for p, v in ranges.items()}
    return declare(extras, QUANTIZED, stage=stage, ranges=values, trainable=list(trainable))


# ----------------------------------------------------------------------------- matching paths


def _flat(tree: Any) -> dict[str, np.ndarray]:
    """``{path: array}`` of a nested-dict pytree's non-None leaves."""
    out: dict[str, np.ndarray] = {}

    def walk(node, prefix):
        if node is None:
            return
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{prefix}/{i}" if prefix else str(i))
        else:
            out[prefix] = np.asarray(node)

    walk(tree, "")
    return out


def _subsequence(small: list[str], big: list[str]) -> bool:
    it = iter(big)
    return all(part in it for part in small)


def match_path(path: str, shape: tuple[int, ...], candidates: Mapping[str, tuple[int, ...]]) -> str | None:
    """The path in ``candidates`` (``{path: shape}``) that continues ``path`` in a new model, or None.

    The same path with the same shape; else the one path whose parts contain ``path``'s parts in
    order, ends with the same part and has the same shape (fewest extra parts wins a tie).
    """
    if candidates.get(path) == tuple(shape):
        return path
    parts = path.split("/")
    hits = [
        c
        for c, s in candidates.items()
        if s == tuple(shape) and c.split("/")[-1] == parts[-1] and _subsequence(parts, c.split("/"))
    ]
    if not hits:
        return None
    hits.sort(key=lambda c: len(c.split("/")))
    if len(hits) > 1 and len(hits[0].split("/")) == len(hits[1].split("/")):
        return None  # ambiguous
    return hits[0]


def _shapes(params: Any) -> dict[str, tuple[int, ...]]:
    return {p: tuple(np.shape(x)) for p, x in _flat(params).items()}


def _tree_like(params: Any, values: Mapping[str, Any]) -> Any:
    """A nested dict shaped like ``params`` with ``values[path]`` at the given paths, else ``None``."""

    def walk(node, prefix):
        if isinstance(node, Mapping):
            return {k: walk(v, f"{prefix}/{k}" if prefix else str(k)) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v, f"{prefix}/{i}" if prefix else str(i)) for i, v in enumerate(node))
        return values.get(prefix)

    return walk(params, "")


def _prune_none(tree: Any) -> Any:
    """``tree`` without the dict entries whose subtrees hold only ``None`` (``None`` if nothing is left)."""
    if isinstance(tree, Mapping):
        kept = {k: _prune_none(v) for k, v in tree.items()}
        kept = {k: v for k, v in kept.items() if v is not None}
        return kept or None
    return tree


def align_masks(masks: Any, params: Any) -> tuple[Any, list[str]]:
    """``(masks re-keyed to params' paths, old paths with no counterpart in params)``.

    The masks have the structure of ``params`` (``None`` for leaves without a mask).
    """
    shapes = _shapes(params)
    found, missing = {}, []
    for path, m in _flat(masks).items():
        new = match_path(path, m.shape, shapes)
        if new is None:
            missing.append(path)
        else:
            found[new] = np.asarray(m, bool)
    return _tree_like(params, found), missing


# ----------------------------------------------------------------------------- keeping them in training


@dataclasses.dataclass
class Carried:
    """What a fine-tuning run keeps: masks over its params, params frozen, and report notes."""

    masks: Any = None
    frozen: tuple[str, ...] = ()
    notes: list[str] = dataclasses.field(default_factory=list)

    def wrap(self, tx):
        """``tx`` wrapped to keep the masks (:func:`research.train.masking.keep_masks`) and the frozen leaves."""
        from research.train import masking  # pylint: disable=import-outside-toplevel

        if self.frozen:
            tx = masking.freeze(tx, self.frozen)
        if self.masks is not None:
            tx = masking.keep_masks(tx, self.masks)
        return tx

    @property
    def active(self) -> bool:
        return self.masks is not None or bool(self.frozen)

    @property
    def step_key(self) -> tuple:
        """What :meth:`wrap` bakes into a compiled train step: the frozen paths and whether masks are
        kept (the masks themselves are optimizer-state values)."""
        return ("carried", self.frozen, self.masks is not None)


def carried(extras: Mapping[str, Any], params: Any, *, keep: bool = True) -> Carried:
    """The constraints of ``extras`` as a fine-tuning run over ``params`` keeps them.

    Args:
      extras: the extras of the model being fine-tuned (its declared constraints).
      params: the params pytree (nested dicts) of the model as trained.
      keep: ``False`` releases them (``TrainStage.keep_constraints``): nothing is kept, a note says so.
    """
    cons = declared(extras)
    out = Carried()
    if not cons:
        return out
    if not keep:
        out.notes.append(
            "released the constraints of earlier stages (keep_constraints=False): "
            + ", ".join(f"{k} of {v.get('stage')}" for k, v in cons.items())
        )
        return out
    if SPARSITY in cons and extras.get(MASKS) is not None:
        masks, missing = align_masks(extras[MASKS], params)
        if any(m is not None for m in _flat(masks).values()):
            out.masks = masks
            n = len(_flat(masks))
            out.notes.append(f"kept the sparsity masks of {cons[SPARSITY].get('stage')} on {n} leaves")
        if missing:
            out.notes.append(f"sparsity masks of {len(missing)} leaves have no counterpart in this model: {missing}")
    if QUANTIZED in cons:
        shapes = _shapes(params)
        ranges = cons[QUANTIZED].get("ranges", {})
        frozen = []
        for p in cons[QUANTIZED].get("trainable", []):
            new = match_path(p, np.shape(ranges[p]) if p in ranges else (), shapes)
            if new is not None:
                frozen.append(new)
        if frozen:
            out.frozen = tuple(frozen)
            out.notes.append(f"froze {len(frozen)} trainable quantizer ranges of {cons[QUANTIZED].get('stage')}")
    return out


# ----------------------------------------------------------------------------- checking after a stage


def weight_sparsity(params: Any) -> tuple[int, int]:
    """``(zeros, size)`` over the weight matrices and kernels (leaves with ``ndim >= 2``)."""
    zeros = size = 0
    for x in _flat(params).values():
        if x.ndim >= 2 and np.issubdtype(x.dtype, np.floating):
            zeros += int(x.size - np.count_nonzero(x))
            size += int(x.size)
    return zeros, size


def check_stage(
    label: str,
    extras_before: Mapping[str, Any],
    extras_after: Mapping[str, Any],
    state_after: Any,
    *,
    released: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Compares a stage's output with the constraints it started under.

    Args:
      label: the stage's label (``"2_qat"``).
      extras_before: the extras the stage started from (its model's declared constraints).
      extras_after: the extras the stage returned (it may declare new constraints).
      state_after: the output model's state as nested dicts (params and other variables).
      released: the stage was told to release them (``train.keep_constraints=False``): a change
        is reported as ``released`` instead of ``changed`` (and still warned).

    Returns:
      ``(extras, rows)``: the extras to store (kept masks re-keyed to the new paths; changed
      constraints dropped unless the stage declared them anew) and one row per earlier
      constraint: ``{"constraint", "declared_by", "status" (kept/changed/released), "detail"}``.
      Every row that is not ``kept`` is also warned (:class:`ConstraintWarning`).
    """
    before = declared(extras_before)
    after = dict(extras_after)
    own = {k for k, v in declared(extras_after).items() if v.get("stage") == label}
    rows = []
    shapes = _shapes(state_after)
    flat_after = _flat(state_after)
    for kind, rec in before.items():
        if kind in own:
            continue  # the stage declared this kind anew (a second prune): its record replaces the old one
        status, detail = "kept", ""
        if kind == SPARSITY:
            masks = extras_before.get(MASKS)
            aligned, missing = align_masks(masks, state_after) if masks is not None else (None, [])
            broken = 0
            for p, m in _flat(aligned).items():
                broken += int(np.count_nonzero(flat_after[p][~m]))
            kept_zeros = sum(int(np.sum(~m)) for m in _flat(aligned).values())
            if broken or missing:
                status = "changed"
                parts = []
                if broken:
                    parts.append(f"{broken:,} of the {kept_zeros:,} weights pruned by {rec.get('stage')} are nonzero")
                if missing:
                    parts.append(f"{len(missing)} masked leaves no longer exist ({', '.join(missing[:4])})")
                detail = "; ".join(parts)
                if broken:
                    after = drop(after, SPARSITY)
                else:  # the leaves that remain keep their masks
                    after[MASKS] = _prune_none(aligned)
            else:
                detail = f"{kept_zeros:,} pruned weights still exactly zero"
                after[MASKS] = _prune_none(aligned)
        elif kind == FACTORIZED:
            missing = [p for p, s in rec.get("params", {}).items() if match_path(p, tuple(s), shapes) is None]
            if missing:
                status, detail = (
                    "changed",
                    f"{len(missing)} factor parameters no longer exist ({', '.join(missing[:4])})",
                )
                after = drop(after, FACTORIZED)
            else:
                detail = f"{len(rec.get('layers', []))} factorized layers unchanged"
        elif kind == QUANTIZED:
            ranges = rec.get("ranges", {})
            trainable = set(rec.get("trainable", []))
            moved, observed, gone = [], [], []
            for p, v in ranges.items():
                new = match_path(p, np.shape(v), shapes)
                if new is None:
                    gone.append(p)
                elif not np.array_equal(np.asarray(flat_after[new]), np.asarray(v)):
                    (moved if p in trainable else observed).append(p)
            if gone or moved:
                status = "changed"
                parts = [f"{len(moved)} trained quantizer ranges changed"] if moved else []
                parts += [f"{len(gone)} quantizers no longer exist ({', '.join(gone[:4])})"] if gone else []
                detail = "; ".join(parts)
                after = drop(after, QUANTIZED)
            else:
                detail = f"{len(ranges)} quantizers kept" + (
                    f" ({len(observed)} observed ranges re-estimated by their observers while training)"
                    if observed
                    else ""
                )
        if status == "changed" and released:
            status = "released"
        rows.append({"constraint": kind, "declared_by": rec.get("stage"), "status": status, "detail": detail})
        if status == "released":
            warnings.warn(
                f"stage {label} released the {kind} constraint of {rec.get('stage')} as asked "
                f"(train.keep_constraints=False): {detail}",
                ConstraintWarning,
                stacklevel=2,
            )
        elif status == "changed":
            warnings.warn(
                f"stage {label} changed the {kind} constraint of {rec.get('stage')}: {detail}. A fine-tuning stage keeps "
                "earlier constraints unless told otherwise (train.keep_constraints=False releases them); a stage "
                "that changes the structure (a fresh student, channel removal, factorization) replaces them",
                ConstraintWarning,
                stacklevel=2,
            )
    return after, rows
