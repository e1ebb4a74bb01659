"""Norm epsilon floors for full-integer export (``methods.quantization.norm_epsilon``)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from methods.quantization import int8_norm_epsilon
from methods.quantization import norm_statistics


class Normed(nnx.Module):
    """Linear -> LayerNorm -> RMSNorm; the LayerNorm is called twice (its larger variance counts)."""

    def __init__(self, rngs):
        self.a = nnx.Linear(16, 16, rngs=rngs)
        self.ln = nnx.LayerNorm(16, rngs=rngs)
        self.rms = nnx.RMSNorm(16, rngs=rngs)

    def __call__(self, x):
        h = self.a(x)
        return self.rms(self.ln(h) + self.ln(3.0 * h))


def _tokens(n=256, seed=0):
    """Rows ("tokens") whose scales span 0.02 ... 5, as a residual stream's quiet and loud tokens."""
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.uniform(np.log(0.02), np.log(5.0), size=(n, 1)))
    return (rng.normal(size=(n, 16)) * scale).astype(np.float32)


def test_statistics_are_the_largest_per_token_variance_and_mean_square():
    model = Normed(nnx.Rngs(0))
    x = _tokens()
    h = np.asarray(model.a(jnp.asarray(x)))
    stats = norm_statistics(model, x)
    assert set(stats) == {"ln", "rms"}
    np.testing.assert_allclose(stats["ln"], (3.0 * h).var(-1).max(), rtol=1e-5)
    r = np.asarray(model.ln(jnp.asarray(h)) + model.ln(jnp.asarray(3.0 * h)))
    np.testing.assert_allclose(stats["rms"], (r * r).mean(-1).max(), rtol=1e-5)


def test_epsilon_becomes_steps_of_the_int8_grid_and_the_model_is_copied():
    model = Normed(nnx.Rngs(0))
    x = _tokens()
    stats = norm_statistics(model, x)
    new, changed = int8_norm_epsilon(model, x, steps=5)
    for path in ("ln", "rms"):
        old, eps = changed[path]
        assert old == 1e-6 and eps == pytest.approx(5 * stats[path] / 255, rel=1e-6)
        assert getattr(new, path).epsilon == eps and getattr(model, path).epsilon == 1e-6
    # a floor below the current epsilon leaves it
    model.ln.epsilon = 1e3
    _, changed = int8_norm_epsilon(model, x, steps=5)
    assert changed["ln"] == (1e3, 1e3)


def test_bad_settings_and_a_model_without_norms_are_refused():
    x = _tokens(8)
    for kwargs, match in (({"steps": 0}, "steps=0"), ({"steps": float("inf")}, "steps=inf"), ({"bits": 1}, "bits=1")):
        with pytest.raises(ValueError, match=match):
            int8_norm_epsilon(Normed(nnx.Rngs(0)), x, **kwargs)
    with pytest.raises(ValueError, match="no nnx.LayerNorm or nnx.RMSNorm"):
        int8_norm_epsilon(nnx.Linear(16, 3, rngs=nnx.Rngs(0)), x)


class LN(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(16, 16, rngs=rngs)
        self.ln = nnx.LayerNorm(16, rngs=rngs)

    def __call__(self, x):
        return self.ln(self.a(x))


@pytest.mark.slow
def test_int8_file_of_quiet_tokens_is_more_accurate_with_the_floor(tmp_path):
    from research.export import export
    from research.export import tflite

    model = LN(nnx.Rngs(0))
    x = _tokens(512)
    floored, _ = int8_norm_epsilon(model, x[:256], steps=5)
    errors = []
    for name, m in (("plain", model), ("floored", floored)):
        rep = export(
            m,
            x[:8],
            formats=("tflite",),
            out_dir=tmp_path / name,
            quantize="int8",
            calibration=x[:256],
            latency_repeats=1,
        )
        y = tflite.TFLiteRunner(rep["tflite_int8"].path)(x[256:])
        errors.append(np.abs(y - np.asarray(m(jnp.asarray(x[256:])))).max())
    # plain: the quiet tokens' variance is a fraction of one grid step of var + epsilon
    assert errors[1] < 0.5 * errors[0], errors


@pytest.mark.slow
def test_norm_epsilon_stage_raises_the_epsilons_and_fine_tunes(tmp_path):
    from methods.quantization import NormEpsilonStage
    from research.config import Config
    from research.config import DataConfig
    from research.config import ModelConfig
    from research.run import run
    from research.stages import TrainStage

    def schedule(steps):
        return TrainStage(steps=steps, learning_rate=3e-3, batch_size=32, checkpoint_every=0, eval_every=0)

    # A one-block ViT: LayerNorms like attn_gru's, without a GRU scan to compile.
    options = {"dim": 8, "depth": 1, "heads": 2, "mlp_dim": 8}
    config = Config(
        name="norm-epsilon-smoke",
        model=ModelConfig(name="vit", options=options),
        data=DataConfig(name="digits", limit=300),
        stages=(NormEpsilonStage(steps=5, calibration_examples=64, train=schedule(2)),),
    )
    report = run(config, str(tmp_path / "run"), progress=False, echo=False)  # the recipe rebuilds the epsilons
    metrics = report["stages"][0]["metrics"]
    eps = {k: v for k, v in metrics.items() if k.startswith("epsilon/")}
    assert set(eps) == {"epsilon/blocks/0/norm1", "epsilon/blocks/0/norm2", "epsilon/norm"}, metrics
    assert all(v > 1e-6 for v in eps.values()), eps
    assert any("norm epsilons raised to 5 steps" in n for n in report["stages"][0]["notes"])
    bad = Config(
        name="norm-epsilon-mlp",
        model=ModelConfig(name="mlp", options={"widths": (8,)}),
        data=DataConfig(name="digits", limit=100),
        stages=(NormEpsilonStage(train=schedule(2)),),
    )
    with pytest.raises(ValueError, match="no nnx.LayerNorm or nnx.RMSNorm"):
        run(bad, str(tmp_path / "bad"), progress=False, echo=False)
