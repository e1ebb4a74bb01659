"""The activation-kurtosis regulariser (``methods.quantization.kurtosis``) and its stages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from methods.quantization import KurtosisStage
from methods.quantization import QATStage
from methods.quantization import activation_kurtosis
from methods.quantization import activations
from methods.quantization import kurtosis
from methods.quantization import kurtosis_penalty
from methods.quantization import kurtosis_regularizer
from research.config import ConfigError
from research.stages import TrainStage
from research.train import cross_entropy_loss


class Small(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(6, 8, rngs=rngs)
        self.b = nnx.Linear(8, 3, rngs=rngs)
        self.scale = nnx.Param(jnp.ones((8,)))

    def __call__(self, x):
        h = jax.nn.relu(self.a(x)) * (2.0 * self.scale[...])  # 2*scale: weights only, not an activation
        h = h.reshape(h.shape[0], 2, 4).reshape(h.shape[0], 8)  # moves values: skipped
        return self.b(jnp.tanh(h))


def test_activations_are_the_tensors_computed_from_the_input():
    model = Small(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 6)), jnp.float32)
    y, acts = activations(model, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(model(x)), rtol=1e-6)
    ops = [name.rsplit(":", 1)[1] for name, _ in acts]
    # a: dot + bias, relu (a custom-derivative call: one op), *2scale, tanh, b: dot + bias
    assert ops == ["dot_general", "add", "custom_jvp_call", "mul", "tanh", "dot_general", "add"], ops
    assert all(t.shape[0] == 5 for _, t in acts)  # none of them is a weights-only tensor
    with pytest.raises(ValueError, match="min_size=1"):
        activations(model, x, min_size=1)


def test_attention_and_gru_activations_are_covered():
    from research.nn import build_model

    options = {"dim": 8, "heads": 2, "mlp_dim": 8, "hidden": 8, "patch": 3}
    model = build_model("attn_gru", input_shape=(12,), num_classes=3, rngs=nnx.Rngs(0), **options)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 12)), jnp.float32)
    names = []

    def traced(x):  # jitted: the equation-by-equation evaluation runs once, at trace time
        y, acts = activations(model, x)
        names.extend(name for name, _ in acts)
        return y, model(x)

    y, reference = jax.jit(traced)(x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(reference), rtol=1e-5, atol=1e-6)
    ops = {name.rsplit(":", 1)[1] for name in names}
    # patch embedding, attention scores and softmax, LayerNorm's rsqrt, GRU gates and candidate
    assert {"conv_general_dilated", "dot_general", "exp", "rsqrt", "logistic", "tanh"} <= ops, ops
    assert not ops & {"reshape", "transpose", "broadcast_in_dim", "split", "slice"}
    assert sum(name.endswith(":logistic") for name in names) == 2 * model.tokens  # r and z per step


def test_kurtosis_of_known_distributions():
    rng = np.random.default_rng(0)
    assert abs(float(kurtosis(rng.normal(size=200_000))) - 3.0) < 0.05
    assert abs(float(kurtosis(rng.uniform(size=200_000))) - 1.8) < 0.02
    assert float(kurtosis(rng.standard_t(5, size=200_000))) > 6.0
    assert float(kurtosis(jnp.full((10,), 2.5))) == 0.0  # constant: 0, not NaN
    spiky = np.zeros(1000, np.float32)
    spiky[0] = 50.0
    model = Small(nnx.Rngs(0))
    x = jnp.asarray(rng.normal(size=(7, 6)), jnp.float32)
    per_tensor = activation_kurtosis(model, x)
    expected = np.mean([max(float(k) - 3.0, 0.0) for k in per_tensor.values()])
    assert float(kurtosis_penalty(model, x)) == pytest.approx(expected, rel=1e-5)
    assert float(kurtosis_penalty(model, x, target=1e9)) == 0.0
    assert float(kurtosis(spiky)) > 900


def _finetune(model, ds, transforms, steps=40):
    import tempfile

    from research.train import finetune

    trained, records = finetune(
        model,
        ds,
        workdir=tempfile.mkdtemp(),
        steps=steps,
        learning_rate=3e-3,
        batch_size=64,
        schedule="constant",
        progress=False,
        checkpoint_every=0,
        eval_every=0,
        log_every=10,
        loss_transforms=transforms,
    )
    trained.eval()
    return trained, records


def test_the_penalty_lowers_activation_kurtosis_and_zero_weight_changes_nothing(digits):
    from research.nn import build_model

    model = build_model("mlp", input_shape=digits.input_shape, num_classes=10, widths=(32,), rngs=nnx.Rngs(0))
    x = jnp.asarray(digits.x_train[:256])
    before = float(kurtosis_penalty(model, x))
    control, _ = _finetune(model, digits, [])
    penalised, records = _finetune(model, digits, [kurtosis_regularizer(1.0)])
    after, after_control = float(kurtosis_penalty(penalised, x)), float(kurtosis_penalty(control, x))
    assert before > 1.0 and after_control > 0.05, (before, after_control)
    assert after < 0.25 * after_control, (after, after_control)
    logged = [r["kurtosis_penalty"] for r in records if r.get("split") == "train"]
    assert len(logged) >= 2 and logged[-1] < logged[0]
    # weight 0: the loss function itself, so training is exactly the control's
    assert kurtosis_regularizer(0.0)(cross_entropy_loss) is cross_entropy_loss
    zero, _ = _finetune(model, digits, [kurtosis_regularizer(0.0)])
    for a, b in zip(jax.tree.leaves(nnx.state(zero)), jax.tree.leaves(nnx.state(control)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: kurtosis_regularizer(-0.1), "weight=-0.1 must be a finite number >= 0"),
        (lambda: kurtosis_regularizer(float("nan")), "weight=nan"),
        (lambda: kurtosis_regularizer(0.01, target=0.5), "target=0.5 .*3 is a Gaussian's"),
        (lambda: kurtosis_regularizer(0.01, min_size=1), "min_size=1"),
        (lambda: KurtosisStage(weight=0.0).validate(), "weight=0.0 must be > 0.*use a 'train' stage"),
        (lambda: KurtosisStage(target=0.0).validate(), "target=0.0 must be >= 1"),
        (lambda: QATStage(kurtosis_weight=-1.0).validate(), "kurtosis_weight=-1.0 must be >= 0"),
        (lambda: QATStage(method="magic", kurtosis_weight=0.1).validate(), "not registered"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(make, match):
    with pytest.raises((ValueError, ConfigError), match=match):
        make()


def test_kurtosis_stage_and_qat_with_the_penalty_run(tmp_path):
    from research.config import Config
    from research.config import DataConfig
    from research.config import ModelConfig
    from research.run import run

    def schedule(steps):
        return TrainStage(steps=steps, learning_rate=3e-3, batch_size=32, checkpoint_every=0, eval_every=0)

    config = Config(
        name="kurtosis-smoke",
        model=ModelConfig(name="mlp", options={"widths": (32,)}),
        data=DataConfig(name="digits", limit=400),
        stages=(
            schedule(30),
            KurtosisStage(weight=1.0, train=schedule(30)),
            QATStage(bits=8, calibration_examples=64, kurtosis_weight=0.5, train=schedule(5)),
        ),
    )
    report = run(config, str(tmp_path / "run"), progress=False, echo=False)
    kurt, qat = report["stages"][1]["metrics"], report["stages"][2]["metrics"]
    assert kurt["kurtosis_penalty_after"] < kurt["kurtosis_penalty_before"], kurt
    assert np.isfinite(kurt["final_kurtosis_penalty"]) and np.isfinite(qat["final_kurtosis_penalty"])
    assert any("activation-kurtosis penalty" in n for n in report["stages"][1]["notes"])
    bad = Config(
        name="kurtosis-after-qat",
        model=config.model,
        data=config.data,
        stages=(config.stages[2], KurtosisStage(train=schedule(2))),
    )
    with pytest.raises(ValueError, match="already fake-quantized.*QATStage\\(kurtosis_weight"):
        run(bad, str(tmp_path / "bad"), progress=False, echo=False)
