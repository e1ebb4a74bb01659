"""Search-space encoding, conditions and validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.automl import Categorical
from research.automl import Float
from research.automl import Int
from research.automl import Space
from research.automl._numerics import maybe_x64
from research.automl.space import active_unit
from research.automl.space import snap_unit
from research.automl.testfunctions import conditional_space


@pytest.mark.parametrize(
    "param, values",
    [
        (Float(-3.0, 5.0), [-3.0, 0.25, 5.0]),
        (Float(1e-5, 1.0, log=True), [1e-5, 3e-3, 1.0]),
        (Int(-2, 7), [-2, 0, 7]),
        (Int(1, 1024, log=True), [1, 2, 37, 1024]),
        (Categorical(["a", 3, None, True]), ["a", 3, None, True]),
    ],
)
def test_round_trip_every_type(param, values):
    space = Space({"p": param})
    for v in values:
        u, active = space.encode({"p": v})
        assert active.tolist() == [True]
        assert 0.0 <= u[0] <= 1.0
        back = space.decode(u)["p"]
        if isinstance(v, float):
            assert back == pytest.approx(v, rel=1e-9, abs=1e-12)
        else:
            assert back == v and type(back) is type(v)
        # Snapping an encoded value is a no-op.
        np.testing.assert_allclose(space.snap(u), u, atol=1e-12)


def test_nested_conditions_round_trip_and_activity():
    space = conditional_space()
    cases = [
        {"method": "prune", "sparsity": 0.5, "schedule": "gradual", "steps": 8},
        {"method": "prune", "sparsity": 0.9, "schedule": "oneshot"},
        {"method": "quantize", "bits": 4, "lr": 1e-3},
        {"method": "none", "knob": 0.1},
    ]
    for params in cases:
        u, active = space.encode(params)
        assert set(np.array(space.names)[active]) == set(params)
        back = space.decode(u)
        assert back.keys() == params.keys()
        for k, v in params.items():
            assert back[k] == pytest.approx(v)


def test_decode_of_any_point_is_valid_and_numpy_matches_jax():
    space = conditional_space()
    u = np.random.default_rng(0).random((200, space.dim))
    act_np = space.active_mask(u)
    act_jx = np.asarray(space.active_mask(jnp.asarray(u), jnp))
    np.testing.assert_array_equal(act_np, act_jx)
    np.testing.assert_allclose(space.snap(u), np.asarray(space.snap(jnp.asarray(u), jnp)), atol=1e-6)
    for row in u:
        space.validate(space.decode(row))


def _mixed_space(bounds_shift=0):
    k = bounds_shift
    return Space(
        {
            "lr": Float(1e-4 * 10**k, 1e-1 * 10**k, log=True),
            "w": Float(-3.0 - k, 7.0 + 2 * k),
            "n": Int(-10 + k, 10 + k),
            "k": Int(1 + k, 300 + 7 * k, log=True),
            "c": Categorical(["a", "b", "c"]),
            "depth": Int(1 + k, 3 + k),
            "p": Float(0.0, 1.0, when={"depth": [2 + k, 3 + k]}),
            "q": Int(0, 5 + k, when={"c": "b"}),
        }
    )


@pytest.mark.parametrize("shift", [0, 3])
def test_layout_functions_equal_snap_and_active_mask_exactly(shift):
    # The samplers' jitted code snaps with the layout as values; it must give the very
    # values of Space.snap / Space.active_mask (in numpy and in JAX, 64 and 32 bits).
    space = _mixed_space(shift)
    u = np.random.default_rng(shift).random((500, space.dim))
    u[:50] = np.round(u[:50] * 4) / 4  # cell edges and cube faces
    layout, structure = space.layout(), space.structure()
    np.testing.assert_array_equal(snap_unit(u, layout), space.snap(u))
    np.testing.assert_array_equal(active_unit(u, layout, structure), space.active_mask(u))
    # As the samplers run them: jitted, the layout an argument against the bounds as constants.
    new = jax.jit(lambda uj, lay: (snap_unit(uj, lay, jnp), active_unit(uj, lay, structure, jnp)))
    old = jax.jit(lambda uj: (space.snap(uj, jnp), space.active_mask(uj, jnp)))
    for x64, dtype in ((True, jnp.float64), (False, jnp.float32)):
        with maybe_x64(x64):
            uj = jnp.asarray(u, dtype)
            for a, b in zip(new(uj, layout.astype(jnp, dtype)), old(uj), strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_structure_ignores_names_and_bounds_only():
    assert _mixed_space(0).structure() == _mixed_space(3).structure()
    assert _mixed_space(0).layout().edge.tolist() != _mixed_space(3).layout().edge.tolist()
    a = Space({"x": Float(0.0, 1.0), "c": Categorical(["a", "b"]), "y": Float(0.0, 1.0, when={"c": "a"})})
    b = Space({"x": Float(0.0, 1.0), "c": Categorical(["a", "b"]), "y": Float(0.0, 1.0, when={"c": "b"})})
    c = Space({"x": Int(0, 1), "c": Categorical(["a", "b"]), "y": Float(0.0, 1.0, when={"c": "a"})})
    assert len({a.structure(), b.structure(), c.structure()}) == 3


def test_groups_follow_conditions():
    space = conditional_space()
    g = dict(zip(space.names, space.groups, strict=True))
    assert g["sparsity"] == g["schedule"] != g["method"]
    assert g["bits"] == g["lr"] != g["sparsity"]
    assert len({g["steps"], g["sparsity"], g["knob"], g["method"]}) == 4


def test_json_round_trip():
    space = conditional_space()
    assert Space.from_dict(space.to_dict()) == space


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Float(1.0, 1.0), "low must be < high"),
        (lambda: Float(0.0, 1.0, log=True), "log scale needs low > 0"),
        (lambda: Int(5, 2), "low must be < high"),
        (lambda: Int(0, 4, log=True), "log scale needs low >= 1"),
        (lambda: Categorical([]), "empty"),
        (lambda: Categorical(["a", "a"]), "duplicates"),
        (lambda: Space({"x": Float(0, 1, when={"nope": 1})}), "unknown parent 'nope'"),
        (lambda: Space({"a": Categorical(["x"]), "b": Float(0, 1, when={"a": "y"})}), "not one of"),
        (lambda: Space({"a": Float(0, 1), "b": Float(0, 1, when={"a": 0.5})}), "Float parent"),
        (
            lambda: Space({"a": Categorical([1, 2], when={"b": 1}), "b": Categorical([1, 2], when={"a": 1})}),
            "cycle",
        ),
        (lambda: Space({}), "empty"),
    ],
)
def test_validation_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_validate_rejects_inactive_missing_and_out_of_range():
    space = conditional_space()
    with pytest.raises(ValueError, match="inactive"):
        space.validate({"method": "none", "knob": 0.1, "bits": 3})
    with pytest.raises(ValueError, match="missing"):
        space.validate({"method": "quantize", "bits": 3})
    with pytest.raises(ValueError, match="outside"):
        space.validate({"method": "none", "knob": 2.0})


def test_encode_memo_returns_fresh_copies_and_skips_revalidation(monkeypatch):
    space = Space({"kind": Categorical(["a", "b"]), "x": Float(0.0, 1.0, when={"kind": "a"}), "n": Int(1, 8)})
    params = {"kind": "a", "x": 0.25, "n": 3}
    u1, a1 = space.encode(params)
    calls = []
    monkeypatch.setattr(space, "validate", lambda p: calls.append(p))
    u1[:] = -1.0  # the caller's arrays are its own: the memo must not see this
    a1[:] = False
    u2, a2 = space.encode(dict(params))
    assert calls == []  # served from the memo
    fresh = Space({"kind": Categorical(["a", "b"]), "x": Float(0.0, 1.0, when={"kind": "a"}), "n": Int(1, 8)})
    u3, a3 = fresh.encode(params)
    np.testing.assert_array_equal(u2, u3)
    np.testing.assert_array_equal(a2, a3)
    assert u2[space.names.index("x")] == pytest.approx(0.25) and a2.all()
    # A new configuration is validated, and an invalid one is never memoised.
    space.encode({"kind": "b", "n": 2})
    assert len(calls) == 1
    monkeypatch.undo()
    with pytest.raises(ValueError):
        space.encode({"kind": "b", "n": 99})
    with pytest.raises(ValueError):
        space.encode({"kind": "b", "n": 99})
