import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from research import data
from research import nn
from research import train
from research.train.loop import StepTimes
from research.train.loop import record_step_times


def _setup(model_name="mlp", seed=0, **opts):
    ds = data.load_dataset("digits", seed=0, limit=512)
    model = nn.build_model(model_name, input_shape=ds.input_shape, num_classes=10, rngs=nnx.Rngs(seed), **opts)
    tx = optax.adam(1e-2)
    defs, state = train.create_train_state(model, tx, seed=seed)
    sampler = data.BatchSampler(ds.x_train, ds.y_train, batch_size=64, seed=seed)
    return ds, defs, state, tx, sampler


def _leaves_equal(a, b):
    def to_np(t):
        return [
            np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in jax.tree.leaves(t)
        ]  # noqa: E731

    return all(np.array_equal(x, y) for x, y in zip(to_np(a), to_np(b), strict=True))


def test_train_step_learns_and_updates_batchnorm_stats():
    ds, defs, state, tx, sampler = _setup("vgg_small", widths=(8, 16))
    step = train.make_train_step(defs, tx)
    before = train.evaluate(defs, state.params, state.model_state, ds.x_val, ds.y_val)
    stats0 = jax.tree.map(np.asarray, state.model_state)
    state, _ = train.fit(state, step, sampler, num_steps=30, progress=False)
    after = train.evaluate(defs, state.params, state.model_state, ds.x_val, ds.y_val)
    assert after["accuracy"] > before["accuracy"] + 0.2
    assert not _leaves_equal(stats0, state.model_state)  # running statistics moved
    assert int(state.step) == 30


def test_loss_transform_plugs_into_step():
    ds, defs, state, tx, sampler = _setup()
    step = train.make_train_step(defs, tx, loss_transforms=[train.l2_regularizer(1.0)], jit=False)
    _, metrics = step(state, sampler.batch(0))
    params = state.params
    l2 = sum(float(jnp.sum(w["kernel"] ** 2)) for w in [*params["layers"].values(), params["head"]])
    assert metrics["l2"] == pytest.approx(l2, rel=1e-5)
    base = train.make_train_step(defs, tx, jit=False)(state, sampler.batch(0))[1]["loss"]
    assert metrics["loss"] == pytest.approx(float(base) + l2, rel=1e-5)


def test_compose_applies_in_order():
    calls = []

    def tag(name):
        def t(fn):
            def g(m, b, r):
                calls.append(name)
                return fn(m, b, r)

            return g

        return t

    fn = train.compose(tag("inner"), tag("outer"))(lambda m, b, r: (0.0, {}))
    fn(None, None, None)
    assert calls == ["outer", "inner"]


def test_train_step_compiles_once():
    ds, defs, state, tx, sampler = _setup()
    traces = []

    def counting_loss(model, batch, rng):
        traces.append(1)
        return train.cross_entropy_loss(model, batch, rng)

    step = train.make_train_step(defs, tx, loss_fn=counting_loss)
    for i in range(5):
        state, _ = step(state, sampler.batch(i))
    assert len(traces) == 1


def test_eval_with_padding_matches_full_batch():
    ds, defs, state, tx, sampler = _setup()
    a = train.evaluate(defs, state.params, state.model_state, ds.x_val, ds.y_val, batch_size=37)
    b = train.evaluate(defs, state.params, state.model_state, ds.x_val, ds.y_val, batch_size=len(ds.x_val))
    assert a["count"] == len(ds.x_val) == b["count"]
    assert a["accuracy"] == pytest.approx(b["accuracy"]) and a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_resume_after_kill_is_bit_identical(tmp_path):
    ds, defs, state0, tx, sampler = _setup("mlp", dropout=0.2)  # dropout exercises the RNG state
    step = train.make_train_step(defs, tx, donate=False)
    full, _ = train.fit(
        state0, step, sampler, num_steps=25, workdir=tmp_path / "a", checkpoint_every=10, log_every=5, progress=False
    )

    class Killed(Exception):
        pass

    def kill_at_17(s, _):
        if s == 17:
            raise Killed

    with pytest.raises(Killed):
        train.fit(
            state0,
            step,
            sampler,
            num_steps=25,
            workdir=tmp_path / "b",
            checkpoint_every=10,
            log_every=5,
            progress=False,
            on_step=kill_at_17,
        )
    assert train.Checkpointer(tmp_path / "b" / "checkpoints").latest_step() == 10
    resumed, _ = train.fit(
        state0, step, sampler, num_steps=25, workdir=tmp_path / "b", checkpoint_every=10, log_every=5, progress=False
    )
    assert int(resumed.step) == 25
    assert _leaves_equal(full.params, resumed.params)
    assert _leaves_equal(full.opt_state, resumed.opt_state)
    assert _leaves_equal(full.model_state, resumed.model_state)
    rows = train.read_metrics(tmp_path / "b")
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 26))  # no duplicates
    full_rows = train.read_metrics(tmp_path / "a")
    assert [r["loss"] for r in rows if r["split"] == "train"] == [r["loss"] for r in full_rows if r["split"] == "train"]


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path):
    ds, defs, state, tx, sampler = _setup()

    def nan_after_12(model, batch, rng):
        loss, aux = train.cross_entropy_loss(model, batch, rng)
        return loss, aux

    step_ok = train.make_train_step(defs, tx, donate=False)

    def step(s, b):
        new, m = step_ok(s, b)
        bad = int(s.step) >= 12
        return new, {**m, "loss": m["loss"] * (jnp.nan if bad else 1.0)}

    with pytest.raises(train.NonFiniteLossError, match=r"at step 13.*step 10") as info:
        train.fit(state, step, sampler, num_steps=30, workdir=tmp_path, checkpoint_every=5, log_every=4, progress=False)
    assert info.value.step == 13 and info.value.last_checkpoint == 10
    ckpt = train.Checkpointer(tmp_path / "checkpoints")
    assert ckpt.latest_step() == 10
    restored = ckpt.restore(state)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))


def test_checkpoint_roundtrip_with_typed_keys(tmp_path):
    tree = {"k": jax.random.key(3), "w": jnp.arange(3.0), "nested": {0: jnp.ones(2, jnp.int32)}}
    ck = train.Checkpointer(tmp_path)
    ck.save(1, tree)
    back = ck.restore(tree)
    assert jax.random.key_data(back["k"]).tolist() == jax.random.key_data(tree["k"]).tolist()
    np.testing.assert_array_equal(back["nested"][0], tree["nested"][0])
    with pytest.raises(FileNotFoundError):
        train.Checkpointer(tmp_path / "empty").restore(tree)


def test_state_to_model_roundtrip():
    ds, defs, state, tx, sampler = _setup("lenet5")
    model = train.state_to_model(defs, state)
    x = jnp.asarray(ds.x_val[:4])
    d2, p2, s2 = train.split_model(model)
    e = train.make_eval_step(d2)
    np.testing.assert_allclose(model(x), train.merge_model(d2.eval, p2, s2)(x), rtol=1e-6)
    assert e(p2, s2, {"x": x, "y": jnp.asarray(ds.y_val[:4])})["count"] == 4


def test_training_never_deletes_the_callers_arrays():
    ds, defs, state, tx, sampler = _setup()
    model = nn.build_model("mlp", input_shape=ds.input_shape, num_classes=10, rngs=nnx.Rngs(0))
    clone = nnx.clone(model)  # shares the immutable arrays with ``model``
    defs, state = train.create_train_state(clone, tx)
    step = train.make_train_step(defs, tx)  # donates its input state
    for i in range(2):
        state, _ = step(state, sampler.batch(i))
    x = jnp.asarray(ds.x_val[:2])
    assert model(x).shape == (2, 10) and clone(x).shape == (2, 10)  # still alive


def test_grad_norm_metric_on_request():
    ds, defs, state, tx, sampler = _setup()
    plain = train.make_train_step(defs, tx, donate=False, jit=False)(state, sampler.batch(0))[1]
    with_norm = train.make_train_step(defs, tx, donate=False, jit=False, log_grad_norm=True)(state, sampler.batch(0))[1]
    assert "grad_norm" not in plain and float(with_norm["grad_norm"]) > 0
    assert float(with_norm["loss"]) == pytest.approx(float(plain["loss"]))


def test_train_scan_fits_in_one_program():
    ds = data.load_dataset("digits", seed=0)
    model = nn.build_model("lenet5", input_shape=ds.input_shape, num_classes=10, rngs=nnx.Rngs(0))
    defs, params, rest = train.split_model(nnx.clone(model))
    before = train.evaluate(defs, params, rest, ds.x_val, ds.y_val)["accuracy"]
    out = train.train_scan(model, ds.x_train, ds.y_train, steps=60, batch_size=64, learning_rate=3e-3)
    assert out is model
    defs, params, rest = train.split_model(nnx.clone(model))
    assert train.evaluate(defs, params, rest, ds.x_val, ds.y_val)["accuracy"] > before + 0.5
    with pytest.raises(ValueError, match="steps=0"):
        train.train_scan(model, ds.x_train, ds.y_train, steps=0)


def _close_leaves(a, b, **tol):
    return all(
        np.allclose(np.asarray(x), np.asarray(y), **tol)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_fit_in_scanned_blocks_trains_and_records_as_single_steps_do(tmp_path):
    """Blocks of up to 7 steps as one call (cut to 5 by the logging cadence; a GPU gets 50 by
    default): the same rows, validation rows, checkpoints and weights as one call per step, and a
    resume from a checkpoint lands on the same weights as the uninterrupted run."""
    ds, defs, state0, tx, sampler = _setup("mlp", dropout=0.2)
    step = train.make_train_step(defs, tx, donate=False)
    eval_step = train.make_eval_step(defs)

    def eval_fn(s):
        return train.evaluate(defs, s.params, s.model_state, ds.x_val, ds.y_val, eval_step=eval_step)

    cadence = dict(num_steps=20, checkpoint_every=10, log_every=5, eval_every=10, eval_fn=eval_fn, progress=False)
    one, _ = train.fit(state0, step, sampler, workdir=tmp_path / "one", **cadence)
    blocks, _ = train.fit(state0, step, sampler, workdir=tmp_path / "blocks", block_steps=7, **cadence)
    assert int(blocks.step) == 20
    assert _close_leaves(one.params, blocks.params, rtol=1e-5, atol=1e-6)
    assert _close_leaves(one.opt_state, blocks.opt_state, rtol=1e-5, atol=1e-6)
    rows_one, rows_blocks = (train.read_metrics(tmp_path / d) for d in ("one", "blocks"))
    assert [(r["step"], r["split"]) for r in rows_blocks] == [(r["step"], r["split"]) for r in rows_one]
    assert [r["step"] for r in rows_blocks if r["split"] == "val"] == [10, 20]
    for a, b in zip(rows_one, rows_blocks, strict=True):  # the same keys; numbers within float tolerance
        assert b.keys() == a.keys() and b["split"] == a["split"]
        numbers = [k for k in a if k != "split"]
        assert [b[k] for k in numbers] == pytest.approx([a[k] for k in numbers], rel=1e-4, abs=1e-5)
    kept = [train.Checkpointer(tmp_path / d / "checkpoints").all_steps() for d in ("one", "blocks")]
    assert kept[1] == kept[0] == [10, 20]  # the last two, as fit keeps them
    # stopped at 10 steps, then resumed to 20: the uninterrupted run's weights
    train.fit(state0, step, sampler, workdir=tmp_path / "resumed", block_steps=7, **{**cadence, "num_steps": 10})
    resumed, _ = train.fit(state0, step, sampler, workdir=tmp_path / "resumed", block_steps=7, **cadence)
    assert _leaves_equal(blocks.params, resumed.params) and _leaves_equal(blocks.opt_state, resumed.opt_state)
    assert [r["step"] for r in train.read_metrics(tmp_path / "resumed") if r["split"] == "train"] == list(range(1, 21))


def test_fit_blocks_stop_at_a_nan_as_single_steps_do_and_on_step_gets_every_step(tmp_path):
    ds, defs, state, tx, sampler = _setup()
    step_ok = train.make_train_step(defs, tx, donate=False)

    def step(s, b):  # a pure function of (state, batch): scannable
        new, m = step_ok(s, b)
        return new, {**m, "loss": jnp.where(s.step >= 12, jnp.nan, m["loss"])}

    with pytest.raises(train.NonFiniteLossError, match=r"at step 13.*step 10") as info:
        train.fit(
            state, step, sampler, num_steps=30, workdir=tmp_path, checkpoint_every=5, log_every=4, progress=False,
            block_steps=16,
        )  # fmt: skip
    assert info.value.step == 13 and train.Checkpointer(tmp_path / "checkpoints").latest_step() == 10
    seen = []
    train.fit(
        state,
        step_ok,
        sampler,
        num_steps=6,
        log_every=0,
        progress=False,
        block_steps=4,
        on_step=lambda d, s: seen.append(d),
    )
    assert seen == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="block_steps=0"):
        train.fit(state, step_ok, sampler, num_steps=2, progress=False, block_steps=0)


def test_finetune_scans_blocks_of_steps_by_default_on_an_accelerator(monkeypatch, tmp_path):
    import importlib

    from research.train import loop

    finetune_lib = importlib.import_module("research.train.finetune")  # the module (the package exports the function)

    assert train.default_block_steps() == 1  # this CPU: one call per step, as before
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert train.default_block_steps() == loop.BLOCK_STEPS_ACCELERATOR
    monkeypatch.undo()
    ds = data.load_dataset("digits", seed=0, limit=512)
    model = nn.build_model("mlp", input_shape=ds.input_shape, num_classes=10, rngs=nnx.Rngs(0))
    options = dict(steps=12, learning_rate=1e-2, log_every=4, progress=False)
    plain, rows = train.finetune(model, ds, workdir=str(tmp_path / "a"), **options)
    monkeypatch.setattr(finetune_lib, "default_block_steps", lambda: 8)
    scanned_before = loop.scanned.cache_info().currsize
    blocked, rows_blocked = train.finetune(model, ds, workdir=str(tmp_path / "b"), **options)
    assert loop.scanned.cache_info().currsize > scanned_before
    assert [r["step"] for r in rows_blocked] == [r["step"] for r in rows]
    assert _close_leaves(nnx.state(plain, nnx.Param), nnx.state(blocked, nnx.Param), rtol=1e-5, atol=1e-6)


def test_fit_blocks_send_at_most_block_bytes_of_batches(monkeypatch):
    from research.train import loop

    ds, defs, state, tx, sampler = _setup()
    step = train.make_train_step(defs, tx, donate=False)
    one_batch = sum(np.asarray(b).nbytes for b in jax.tree.leaves(sampler.batch(0)))
    monkeypatch.setattr(loop, "BLOCK_BYTES", 3 * one_batch)
    sizes = []
    scanned = loop.scanned

    def recording(fn):
        run = scanned(fn)
        return lambda s, batches: (sizes.append(len(batches["x"])), run(s, batches))[1]

    monkeypatch.setattr(loop, "scanned", recording)
    blocked, _ = train.fit(state, step, sampler, num_steps=10, log_every=0, progress=False, block_steps=8)
    assert sizes == [3, 3, 3]  # and the 10th step alone
    plain, _ = train.fit(state, step, sampler, num_steps=10, log_every=0, progress=False)
    assert _close_leaves(plain.params, blocked.params, rtol=1e-5, atol=1e-6)


def _conv_step(w, x):
    """One gradient step of a 1-D convolution (channels last) and its loss."""

    def loss(w):
        y = jax.lax.conv_general_dilated(x, w, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))
        return (y**2).mean()

    value, grad = jax.value_and_grad(loss)(w)
    return w - 0.1 * grad, value


def test_has_convolution_finds_a_convolution_in_nested_programs():
    x, w = jnp.ones((2, 9, 3)), jnp.ones((3, 3, 3))
    assert train.has_convolution(_conv_step, w, x)
    nested = jax.vmap(jax.jit(lambda w, x: _conv_step(w, x)[1]), in_axes=(0, None))
    assert train.has_convolution(nested, jnp.stack([w, w]), x)
    assert train.has_convolution(lambda w: jax.lax.scan(lambda c, _: (_conv_step(c, x)[0], None), w, None, 2)[0], w)
    assert not train.has_convolution(lambda a, b: jnp.tanh(a @ b), jnp.ones((3, 3)), jnp.ones((3, 3)))


@pytest.mark.parametrize("conv", [True, False])
def test_scan_steps_runs_convolutions_step_by_step_on_a_cpu_with_scans_results(conv):
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.normal(size=(5, 2, 9, 3)), jnp.float32)  # 5 steps of a (2, 9, 3) batch
    w = jnp.asarray(rng.normal(size=(3, 3, 3)) * 0.3, jnp.float32)
    if conv:
        body = _conv_step
    else:
        body = lambda w, x: (w - 0.1 * jnp.tanh(x.mean() * w), (w**2).sum())  # noqa: E731
    loop = train.scan_steps(body)
    assert loop.mode is None
    w_out, losses = loop(w, xs)
    expected = "loop" if conv and train.loops_slow_down_convolutions() else "scan"
    assert loop.mode == expected
    assert train.loops_slow_down_convolutions("cpu") and not train.loops_slow_down_convolutions("gpu")
    ref_w, ref_losses = jax.jit(lambda w, xs: jax.lax.scan(body, w, xs))(w, xs)
    assert losses.shape == (5,)
    np.testing.assert_allclose(np.asarray(losses), np.asarray(ref_losses), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(w_out), np.asarray(ref_w), rtol=1e-5, atol=1e-6)
    # One step (XLA keeps a one-trip loop, so it is decided the same way) and a host-array xs.
    w1, l1 = loop(w, np.asarray(xs[:1]))
    assert loop.mode == expected and l1.shape == (1,)
    np.testing.assert_allclose(np.asarray(l1), np.asarray(ref_losses[:1]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least one array"):
        loop(w, ())
    # Either mode can be chosen; the results stay those of lax.scan.
    other = "scan" if expected == "loop" else "loop"
    forced = train.scan_steps(body, mode=other)
    w2, l2 = forced(w, xs)
    assert forced.mode == other
    np.testing.assert_allclose(np.asarray(l2), np.asarray(ref_losses), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(w2), np.asarray(ref_w), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"mode='unrolled': use 'auto'"):
        train.scan_steps(body, mode="unrolled")


def _timed_fit(workdir, **kw):
    _, defs, state, tx, sampler = _setup()
    return train.fit(
        state, train.make_train_step(defs, tx), sampler, num_steps=50, workdir=workdir, progress=False, **kw
    )


def test_fit_records_its_stretches_of_steps_for_its_workdir_only(tmp_path):
    with record_step_times(tmp_path / "a", every=15) as times:
        _timed_fit(str(tmp_path / "b"), log_every=0)  # another directory: not recorded
        assert times.stretches == []
        _timed_fit(str(tmp_path / "a"), log_every=10)
        first = list(times.stretches)
        _timed_fit(str(tmp_path / "a"), log_every=0)  # a second call: not recorded
    # fetched every 10 steps, each stretch ends there (before the 15 steps ``every`` allows)
    assert [n for n, _ in first] == [10] * 5 and times.stretches == first
    assert all(s > 0 for _, s in first)
    with record_step_times(tmp_path / "c", every=15) as times:
        _timed_fit(str(tmp_path / "c"), log_every=0)
    assert [n for n, _ in times.stretches] == [15, 15, 15, 5]
    _timed_fit(str(tmp_path / "d"), log_every=0)  # outside a block: nothing records, nothing fails
    with pytest.raises(ValueError, match="every=0"):
        with record_step_times(tmp_path, every=0):
            pass


def test_step_times_pace_is_the_fastest_group_after_the_first_stretch():
    times = StepTimes("/x", stretches=[(20, 1.0), (10, 0.1), (10, 0.1), (20, 0.3), (5, 0.001)])
    pace, compile_seconds = times.step_seconds(20)
    assert pace == pytest.approx(0.01)  # (0.1 + 0.1) / 20; 0.3 / 20 slower; 5 steps too few alone
    assert compile_seconds == pytest.approx(1.0 - 20 * 0.01)
    assert StepTimes("/x", stretches=[(20, 1.0), (10, 0.1)]).step_seconds(20) is None
    assert StepTimes("/x", stretches=[(60, 1.0)]).step_seconds(20) is None
