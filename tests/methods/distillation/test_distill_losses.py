"""Each KD loss against its written formula, in float64, plus a conformance test over every term."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import methods.distillation as md


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _logits(seed, b=6, c=5, scale=3.0):
    r = np.random.default_rng(seed)
    return scale * r.normal(size=(b, c)), scale * r.normal(size=(b, c))


@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
def test_kd_loss_matches_formula(x64, temperature):
    s, t = _logits(0)
    p_t, p_s = _softmax(t / temperature), _softmax(s / temperature)
    expected = temperature**2 * np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), -1))
    got = md.kd_loss(jnp.asarray(s), jnp.asarray(t), temperature)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize("temperature", [2.0, 20.0])
def test_kd_gradient_has_t_squared_scale(x64, temperature):
    s, t = _logits(1)
    b = s.shape[0]
    grad = jax.grad(md.kd_loss)(jnp.asarray(s), jnp.asarray(t), temperature)
    # d/ds of T^2 * KL = T^2 * (1/T) (q - p) / B
    expected = temperature * (_softmax(s / temperature) - _softmax(t / temperature)) / b
    np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-15)


def test_kd_gradient_is_temperature_independent_at_high_temperature(x64):
    """Hinton et al. Sec. 2.1: with zero-mean logits and large T the T^2-scaled gradient -> (s - t)/(C B)."""
    s, t = _logits(2)
    s, t = s - s.mean(-1, keepdims=True), t - t.mean(-1, keepdims=True)
    b, c = s.shape
    limit = (s - t) / (c * b)
    for temperature in (1e4, 1e5):
        grad = jax.grad(md.kd_loss)(jnp.asarray(s), jnp.asarray(t), temperature)
        np.testing.assert_allclose(grad, limit, rtol=5e-3, atol=1e-9)
    # Without the T^2 factor the gradient would shrink like 1/T^2.
    unscaled = jax.grad(lambda z: md.kd_loss(z, jnp.asarray(t), 1e3) / 1e6)(jnp.asarray(s))
    assert float(jnp.max(jnp.abs(unscaled))) < 1e-5 * float(np.max(np.abs(limit)))


def _dkd_reference(s, t, y, temperature):
    tckd, nckd = [], []
    for zs, zt, k in zip(s, t, y, strict=True):
        ps, pt = _softmax(zs / temperature), _softmax(zt / temperature)
        bs, bt = np.array([ps[k], 1 - ps[k]]), np.array([pt[k], 1 - pt[k]])
        tckd.append(np.sum(bt * np.log(bt / bs)))
        keep = np.arange(len(zs)) != k
        qs, qt = _softmax(zs[keep] / temperature), _softmax(zt[keep] / temperature)
        nckd.append(np.sum(qt * np.log(qt / qs)))
    return np.array(tckd), np.array(nckd)


@pytest.mark.parametrize("alpha,beta,temperature", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_matches_formula(x64, alpha, beta, temperature):
    s, t = _logits(3)
    y = np.random.default_rng(3).integers(0, s.shape[1], s.shape[0])
    tckd, nckd = _dkd_reference(s, t, y, temperature)
    got_t, got_n = md.dkd_parts(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), temperature)
    np.testing.assert_allclose(got_t, tckd, rtol=1e-10)
    np.testing.assert_allclose(got_n, nckd, rtol=1e-10)
    loss = md.dkd_loss(
        jnp.asarray(s),
        jnp.asarray(t),
        jnp.asarray(y),
        alpha=alpha,
        beta=beta,
        temperature=temperature,
    )
    np.testing.assert_allclose(loss, temperature**2 * np.mean(alpha * tckd + beta * nckd), rtol=1e-10)


def test_dkd_decomposes_classical_kd(x64):
    """Zhao et al. Eq. 4: KD = TCKD + (1 - p_target_teacher) NCKD, per example."""
    s, t = _logits(4)
    y = np.random.default_rng(4).integers(0, s.shape[1], s.shape[0])
    temperature = 2.0
    tckd, nckd = md.dkd_parts(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), temperature)
    pt = _softmax(t / temperature)
    ps = _softmax(s / temperature)
    kl = np.sum(pt * np.log(pt / ps), -1)
    np.testing.assert_allclose(tckd + (1 - pt[np.arange(len(y)), y]) * nckd, kl, rtol=1e-10)


def test_hint_loss_matches_formula(x64):
    r = np.random.default_rng(5)
    u, v = r.normal(size=(4, 3, 3, 2)), r.normal(size=(4, 3, 3, 2))
    expected = np.mean([0.5 * np.sum((v[i] - u[i]) ** 2) for i in range(4)])
    np.testing.assert_allclose(md.hint_loss(jnp.asarray(v), jnp.asarray(u)), expected, rtol=1e-12)


@pytest.mark.parametrize("shape_s,shape_t", [((3, 4, 4, 5), (3, 4, 4, 7)), ((3, 6), (3, 6))])
def test_attention_loss_matches_formula(x64, shape_s, shape_t):
    r = np.random.default_rng(6)
    a_s, a_t = r.normal(size=shape_s), r.normal(size=shape_t)

    def at(a):
        m = np.abs(a) ** 2
        m = m.mean(-1) if a.ndim > 2 else m
        m = m.reshape(len(a), -1)
        return m / np.linalg.norm(m, axis=1, keepdims=True)

    np.testing.assert_allclose(md.attention_map(jnp.asarray(a_s)), at(a_s), rtol=1e-12)
    expected = np.mean((at(a_s) - at(a_t)) ** 2)
    np.testing.assert_allclose(md.attention_loss(jnp.asarray(a_s), jnp.asarray(a_t)), expected, rtol=1e-12)


def _huber(x):
    return np.where(np.abs(x) < 1, 0.5 * x**2, np.abs(x) - 0.5)


def test_rkd_distance_matches_formula(x64):
    r = np.random.default_rng(7)
    s, t = r.normal(size=(5, 3)), r.normal(size=(5, 8))

    def psi(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return d / (d.sum() / (len(x) * (len(x) - 1)))

    expected = np.mean(_huber(psi(s) - psi(t)))
    np.testing.assert_allclose(md.rkd_distance_loss(jnp.asarray(s), jnp.asarray(t)), expected, rtol=1e-10)
    np.testing.assert_allclose(
        md.pairwise_distances(jnp.asarray(s)),
        np.linalg.norm(s[:, None] - s[None], axis=-1),
        atol=1e-6,
    )


def test_rkd_angle_matches_formula(x64):
    r = np.random.default_rng(8)
    s, t = r.normal(size=(4, 3)), r.normal(size=(4, 6))

    def psi(x):
        n = len(x)
        out = np.zeros((n, n, n))
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    e1, e2 = x[j] - x[i], x[k] - x[i]
                    n1, n2 = np.linalg.norm(e1), np.linalg.norm(e2)
                    out[i, j, k] = 0.0 if n1 == 0 or n2 == 0 else e1 @ e2 / (n1 * n2)
        return out

    expected = np.mean(_huber(psi(s) - psi(t)))
    np.testing.assert_allclose(md.rkd_angle_loss(jnp.asarray(s), jnp.asarray(t)), expected, rtol=1e-10)


def test_shape_and_temperature_errors():
    with pytest.raises(ValueError, match="temperature=0"):
        md.kd_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), 0.0)
    with pytest.raises(ValueError, match="differs from teacher shape"):
        md.kd_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)), 1.0)


# ------------------------------------------------------------------ conformance over every KD term

B, C = 6, 5
TERM_OPTIONS = {
    "hinton": {"temperature": 3.0},
    "dkd": {"alpha": 1.0, "beta": 4.0, "temperature": 3.0},
    "fitnets": {"hints": [("feat", "feat")]},
    "attention": {"pairs": [("feat", "feat")]},
    "rkd_distance": {"student_path": "emb", "teacher_path": "emb"},
    "rkd_angle": {},
    "attention_map": {"pairs": [("attn", "attn")]},
    "hidden_state": {"pairs": [("feat", "feat")]},
}


class _Identity(nnx.Module):
    def __call__(self, x):
        return x


def _outputs(seed):
    r = np.random.default_rng(seed)
    return {
        "logits": jnp.asarray(r.normal(size=(B, C)), jnp.float32),
        "features": {
            "feat": jnp.asarray(r.normal(size=(B, 4, 4, 3)), jnp.float32),
            "emb": jnp.asarray(r.normal(size=(B, 7)), jnp.float32),
            # an attention layer's query/key projections: (batch, length, heads, head_dim)
            "attn/query": jnp.asarray(r.normal(size=(B, 3, 2, 4)), jnp.float32),
            "attn/key": jnp.asarray(r.normal(size=(B, 3, 2, 4)), jnp.float32),
        },
    }


@pytest.fixture(params=md.list_kd_terms())
def term(request):
    # A term registered later is built with its default options (features "feat" and "emb" exist).
    return md.make_kd_term(request.param, **TERM_OPTIONS.get(request.param, {}))


def test_every_term_conforms(term):
    check_kd_term(term)


def check_kd_term(term):
    """The shared checks for a built KD term (also used by tests/test_extension_points.py)."""
    batch = {"y": jnp.arange(B) % C}
    model = md.HintedStudent(_Identity(), [_Identity()])
    student, teacher = _outputs(0), _outputs(1)

    def value(s, t):
        return term.fn(s, t, batch, model)

    @jax.jit
    def check(student, teacher):
        stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), student, teacher)
        return {
            "v": value(student, teacher),
            "same": value(teacher, teacher),
            "grad_same": jax.grad(value)(teacher, teacher),
            "grads": jax.grad(value, argnums=(0, 1))(student, teacher),
            "pop": jax.vmap(value, in_axes=(0, None))(stacked, teacher),
        }

    out = check(student, teacher)
    v = out["v"]
    chex.assert_shape(v, ())
    assert np.isfinite(v) and float(v) > 0.0, (term.name, v)
    # zero loss and zero gradient when the student equals the teacher
    assert abs(float(out["same"])) < 1e-6, (term.name, out["same"])
    zeros = jax.tree.map(jnp.zeros_like, out["grad_same"])
    chex.assert_trees_all_close(out["grad_same"], zeros, atol=1e-6)
    # gradients reach the student and never the teacher
    g_s, g_t = out["grads"]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(g_s))
    assert sum(float(jnp.sum(jnp.abs(x))) for x in jax.tree.leaves(g_s)) > 0
    chex.assert_trees_all_close(g_t, jax.tree.map(jnp.zeros_like, g_t))
    # vmap over a population of student outputs matches the single calls
    np.testing.assert_allclose(out["pop"], [v, out["same"]], rtol=1e-5, atol=1e-5)


def test_registry_refuses_duplicates():
    assert md.register_kd_term("hinton")(md.hinton_term) is md.hinton_term  # the same factory again: a no-op
    with pytest.raises(ValueError, match="already registered"):
        md.register_kd_term("hinton")(lambda temperature=4.0: md.hinton_term(temperature))
    with pytest.raises(KeyError, match="registered"):
        md.make_kd_term("nope")
