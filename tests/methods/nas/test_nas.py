"""Supernet: masks vs extraction, vmapped vs one-by-one evaluation, BN recalibration, sandwich training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from methods import nas
from research import nn


def _data(n=40):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 8, 8)).astype(np.float32), rng.integers(0, 10, size=n)


def _net(name, shape, seed=0):
    return nas.split_supernet(nas.build_supernet(name, shape, 10, seed=seed), name, shape, 10)


@pytest.mark.parametrize(("name", "shape"), [("conv1d_family", (40,)), ("mobilenet_family", (8, 8))])
def test_supernet_under_a_mask_equals_the_extracted_subnetwork(name, shape):
    net = _net(name, shape)
    fam = net.family
    options = fam.canonical({**fam.smallest(), **{k: v[-1] for k, v in fam.choices.items() if k.startswith("kernel")}})
    options = {**options, "width_1": fam.choices["width_1"][1], "depth_2": 2}
    x = jax.random.normal(jax.random.key(1), (4, *shape))
    masked, _ = jax.jit(lambda p, s, x, m: nas.apply(net, p, s, x, m))(
        net.params, net.stats, x, nas.masks_for(net, options)
    )
    sub = nas.extract(net, options)
    assert nn.param_count(sub) < nn.param_count(nas.merge(net)) / 4  # physically smaller
    np.testing.assert_allclose(np.asarray(masked), np.asarray(sub(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", ["max", "flatten"])
def test_conv1d_heads_inside_the_supernet_equal_the_extracted_member(head):
    net = _net("conv1d_family", (40,))
    options = {"width_2": 16, "depth_1": 2, "kernel_0": 3, "head": head}
    x = jax.random.normal(jax.random.key(2), (6, 40))
    masked, _ = nas.apply(net, net.params, net.stats, x, nas.masks_for(net, options))
    sub = nas.extract(net, options)
    assert sub.head.in_features == 16 * (5 if head == "flatten" else 1)  # 40 -> 20 -> 10 -> 5 positions
    np.testing.assert_allclose(np.asarray(masked), np.asarray(sub(x)), rtol=1e-5, atol=1e-5)
    other = nas.extract(net, {**options, "head": "flatten" if head == "max" else "max"})
    assert not np.allclose(np.asarray(other(x)), np.asarray(sub(x)), atol=1e-3)  # the choice changes the function


def test_vmapped_evaluation_equals_separate_evaluations():
    net = _net("mlp_family", (8, 8))
    fam = net.family
    rng = np.random.default_rng(0)
    options = [fam.largest(), fam.smallest(), fam.sample(rng)]
    x = rng.normal(size=(50, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=50)
    acc, _ = nas.evaluate_subnets(net, nas.stack_masks(net, options), x, y, batch_size=16)
    one = nas.make_evaluator(net, calibrate=False)
    for o, a in zip(options, acc, strict=True):
        single, _ = nas.evaluate_subnets(net, nas.stack_masks(net, [o]), x, y, batch_size=16, evaluator=one)
        logits = nas.extract(net, o)(x)
        assert float(single[0]) == pytest.approx(float(a), abs=1e-6)
        assert float(a) == pytest.approx(float(np.mean(np.argmax(logits, -1) == y)), abs=1e-6)


def test_bn_recalibration_changes_only_bn_statistics_and_is_per_subnetwork():
    net = _net("resnet_family", (8, 8))
    fam = net.family
    x, y = _data()
    calib = nas.calibration_batches(x, 2, 16)
    options = [fam.largest(), fam.smallest()]
    masks = nas.stack_masks(net, options)
    acc, stats = nas.evaluate_subnets(net, masks, x, y, calib_x=calib, batch_size=20)
    params_after = net.params
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params_after, net.params)
    small = jax.tree.map(lambda a: a[1], stats)
    big = jax.tree.map(lambda a: a[0], stats)
    mean0 = net.stats["stem_bn"]["mean"]
    assert not np.allclose(big["stem_bn"]["mean"], mean0)  # recalibrated away from the initial zeros
    assert not np.allclose(big["stages"][2][0]["bn1"]["mean"][:32], small["stages"][2][0]["bn1"]["mean"][:32])
    # the statistics are the mean of each batch's statistics: the stem's equal a direct computation
    conv = nas.merge(net).stem_conv
    per_batch = [np.asarray(conv(jnp.asarray(b)[..., None])).mean(axis=(0, 1, 2)) for b in calib]
    np.testing.assert_allclose(big["stem_bn"]["mean"], np.mean(per_batch, 0), rtol=1e-4, atol=1e-5)
    # the extracted model with its recalibrated stats gives the accuracy the vmapped program measured
    sub = nas.extract(net, options[1], stats=small)
    assert float(np.mean(np.argmax(sub(x), -1) == y)) == pytest.approx(float(acc[1]), abs=1e-6)


def test_sandwich_step_decreases_loss_for_largest_and_smallest():
    net = _net("mlp_family", (8, 8))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 8, 8)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, size=64))
    tx = optax.adam(3e-3)
    step = nas.make_sandwich_step(net, tx)
    params, stats, opt_state = net.params, net.stats, tx.init(net.params)
    first = None
    for _ in range(25):
        masks = nas.sandwich_masks(net, rng, n_random=1)
        params, stats, opt_state, ce = step(params, stats, opt_state, masks, x, y)
        first = np.asarray(ce) if first is None else first
    ce = np.asarray(ce)
    assert ce[0] < 0.7 * first[0] and ce[1] < 0.9 * first[1], (first, ce)


def test_evolution_searches_a_family_over_accuracy_flops_and_bytes():
    net = _net("mlp_family", (8, 8))
    x, y = _data()
    found = nas.search(net, x, y, trials=14, batch=4, sampler="evolution", seed=0)
    fam = net.family
    keys = [fam.key(c.options) for c in found]
    assert len(keys) == len(set(keys))  # each architecture evaluated once
    assert keys[:2] == [fam.key(fam.largest()), fam.key(fam.smallest())]
    assert all(0.0 <= c.accuracy <= 1.0 and c.flops > 0 for c in found)
    front = nas.pareto_front(found)
    assert front and all(0 <= i < len(found) for i in front)


def test_progressive_phases_free_the_dimensions_in_order():
    fam = nn.get_family("conv1d_family")
    phases = nas.progressive_phases(fam, 15, first=0.2)
    assert [p.elastic for p in phases] == [
        (),
        ("head",),
        ("head", "kernel"),
        ("head", "kernel", "depth"),
        ("head", "kernel", "depth", "width"),
    ]
    assert [p.steps for p in phases] == [3, 3, 3, 3, 3]
    net = _net("conv1d_family", (40,))
    masks = nas.phase_masks(net, phases, np.random.default_rng(0), n_random=3)
    full = nas.masks_for(net, fam.largest())
    dim = {"c": "width", "g": "depth", "k": "kernel", "p": "head"}  # mask key c<s>/g<s>/k<s>/pool -> dimension
    for step, m in enumerate(masks):
        for key, value in m.items():  # a dimension not yet freed stays at its largest choice
            if dim[key[0]] not in phases[step // 3].elastic:
                np.testing.assert_array_equal(np.asarray(value), np.broadcast_to(full[key], value.shape))
    for p, step in zip(phases, (0, 3, 6, 9, 12), strict=True):  # the phase's smallest member (row 1)
        small = jax.tree.map(lambda a: a[1], masks[step])
        shrunk = {dim[k[0]] for k in small if not np.array_equal(np.asarray(small[k]), np.asarray(full[k]))}
        assert shrunk == set(p.elastic)
    with pytest.raises(ValueError, match="expand"):
        nas.progressive_phases(fam, 12, order=("expand",))
    with pytest.raises(ValueError, match="add up to"):
        nas.train_supernet(net, np.zeros((4, 40), np.float32), np.zeros(4, int), steps=5, phases=phases)


def test_a_sandwich_step_decreases_the_loss_in_every_progressive_phase():
    net = _net("mlp_family", (8, 8))  # phases: largest alone, then depth, then depth and width
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(32, 8, 8)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, size=32))
    tx = optax.adam(1e-3)
    step = nas.make_sandwich_step(net, tx)
    loss = jax.jit(lambda p, s, m: nas.sandwich_loss(net, p, s, m, x, y)[0])
    params, stats, opt_state = net.params, net.stats, tx.init(net.params)
    phases = nas.progressive_phases(net.family, 6, first=0.34)
    assert [p.elastic for p in phases] == [(), ("depth",), ("depth", "width")]
    for phase in phases:
        masks = nas.sandwich_masks(net, rng, n_random=2, family=net.family.restrict(phase.elastic))
        before = float(loss(params, stats, masks))
        params, stats, opt_state, _ = step(params, stats, opt_state, masks, x, y)
        assert float(loss(params, stats, masks)) < before, phase


def test_search_under_a_flops_limit_with_a_measured_latency_objective():
    net = _net("mlp_family", (8, 8))
    fam = net.family
    x, y = _data()
    cost = nas.CostModel(net, latency_runtime="jax", latency_repeats=3)
    limit = cost({"depth": 2, "width_0": 64, "width_1": 64})[0]  # about half the family is within
    found = nas.search(net, x, y, trials=4, batch=2, sampler="random", seed=0, max_flops=limit, cost=cost)
    assert found and all(c.flops <= limit for c in found)
    assert fam.key(fam.largest()) not in {fam.key(c.options) for c in found}  # over the limit: not evaluated
    assert fam.key(found[0].options) == fam.key(fam.smallest())
    assert all(c.latency is not None and c.latency > 0 for c in found)
    assert nas.pareto_front(found, ("accuracy", "flops", "latency"))
    with pytest.raises(ValueError, match="latency_runtime"):
        nas.CostModel(net, latency_runtime="abacus")
