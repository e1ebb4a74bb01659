"""research.constraints and research.train.masking on plain pytrees (no model, no training)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research import constraints as C
from research.report import constraint_rows
from research.train import masking


def _params(kernel_path=("dense", "kernel")):
    k = np.array([[0.0, 2.0], [3.0, 0.0]], np.float32)
    tree = {"head": {"bias": np.zeros(2, np.float32), "kernel": np.ones((2, 2), np.float32)}}
    node = tree
    for part in kernel_path[:-1]:
        node = node.setdefault(part, {})
    node[kernel_path[-1]] = k
    return tree


def test_masks_follow_a_wrapper_that_inserts_path_parts():
    masks = {"dense": {"kernel": np.array([[False, True], [True, False]])}, "head": {"kernel": None, "bias": None}}
    wrapped = _params(("dense", "layer", "kernel"))
    aligned, missing = C.align_masks(masks, wrapped)
    assert missing == [] and aligned["dense"]["layer"]["kernel"].tolist() == [[False, True], [True, False]]
    assert aligned["head"]["kernel"] is None
    assert C.match_path("a/kernel", (2,), {"x/a/kernel": (2,), "y/a/kernel": (2,)}) is None  # ambiguous
    assert C.match_path("a/kernel", (2,), {"a/kernel": (3,)}) is None  # shape differs


def test_check_stage_reports_kept_and_changed_and_warns():
    masks = {"dense": {"kernel": np.array([[False, True], [True, False]])}}
    before = C.declare_sparsity({}, masks, stage="1_prune", pattern="unstructured")
    assert C.declared(before)["sparsity"]["masked_zeros"] == 2
    kept, rows = C.check_stage("2_qat", before, dict(before), _params(("dense", "layer", "kernel")))
    assert rows == [{"constraint": "sparsity", "declared_by": "1_prune", "status": "kept", "detail": rows[0]["detail"]}]
    assert "layer" in kept["masks"]["dense"]  # re-keyed for later stages
    broken = _params()
    broken["dense"]["kernel"] = np.ones((2, 2), np.float32)
    with pytest.warns(C.ConstraintWarning, match="2 of the 2 weights pruned by 1_prune are nonzero"):
        after, rows = C.check_stage("2_qat", before, dict(before), broken)
    assert rows[0]["status"] == "changed" and "masks" not in after and "sparsity" not in C.declared(after)


def test_carried_keeps_masks_and_freezes_trainable_ranges_unless_released():
    params = {"q": {"step": np.array(0.5, np.float32)}, **_params()}
    extras = C.declare_sparsity({}, {"dense": {"kernel": np.array([[False, True], [True, False]])}}, stage="1_prune")
    extras = C.declare_quantized(extras, {"q/step": params["q"]["step"]}, ["q/step"], stage="2_qat")
    carry = C.carried(extras, params)
    assert carry.frozen == ("q/step",) and carry.masks["dense"]["kernel"] is not None
    tx = carry.wrap(optax.sgd(1.0))
    p = {k: {kk: jnp.asarray(vv) for kk, vv in v.items()} for k, v in params.items()}
    grads = {k: {kk: jnp.ones_like(vv) for kk, vv in v.items()} for k, v in p.items()}
    updates, _ = tx.update(grads, tx.init(p), p)
    new = optax.apply_updates(p, updates)
    assert float(new["q"]["step"]) == 0.5  # frozen
    assert np.asarray(new["dense"]["kernel"]).tolist() == [[0.0, 1.0], [2.0, 0.0]]  # masked stay 0
    released = C.carried(extras, params, keep=False)
    assert not released.active and "released the constraints" in released.notes[0]


def test_masks_combine_and_are_found_in_nested_states():
    a = {"w": jnp.array([True, False, True]), "b": None}
    b = {"w": jnp.array([True, True, False]), "b": None}
    params = {"w": jnp.ones(3), "b": jnp.ones(2)}
    tx = masking.keep_masks(masking.keep_masks(optax.sgd(0.1), b), a)
    state = tx.init(params)
    assert len(masking.find_all_masks(state)) == 2
    combined = masking.combine_masks(*masking.find_all_masks(state))
    assert combined["w"].tolist() == [True, False, False] and combined["b"] is None
    with pytest.raises(ValueError, match="does not fit"):
        masking.keep_masks(optax.sgd(0.1), {"w": jnp.ones(2, bool), "b": None}).init(params)


def test_report_constraint_rows():
    stages = [
        {"label": "0_train", "metrics": {"weight_sparsity_before": 0.0, "weight_sparsity_after": 0.0}},
        {
            "label": "1_qat",
            "metrics": {"weight_sparsity_before": 0.6, "weight_sparsity_after": 0.02},
            "declares": ["quantized"],
            "constraints": [{"constraint": "sparsity", "declared_by": "0_prune", "status": "changed", "detail": ""}],
        },
    ]
    rows = constraint_rows({"stages": stages})
    assert rows[1] == {
        "stage": "1_qat",
        "weight sparsity": "60.00% -> 2.00%",
        "declares": "quantized",
        "earlier constraints": "sparsity of 0_prune: CHANGED",
    }
