import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import metrics
from research import nn


def test_counts_and_bytes():
    m = nnx.Linear(10, 4, rngs=nnx.Rngs(0))
    m.kernel.value = m.kernel.value.at[:5].set(0.0)
    assert metrics.count_params(m) == 44
    assert metrics.count_nonzeros(m) == 44 - 20 - 4  # 20 zeroed weights + zero-initialised bias
    assert metrics.model_bytes(m, 32) == 176 and metrics.model_bytes(m, 4) == 22
    assert metrics.count_params({"a": np.ones((2, 3)), "b": None}) == 6
    with pytest.raises(ValueError, match="bits"):
        metrics.model_bytes(m, 0)


def test_flops_of_dense_layer_from_xla():
    m = nn.build_model("mlp", input_shape=(64,), num_classes=10, widths=(100,), rngs=nnx.Rngs(0))
    f = metrics.flops(m, jnp.ones((1, 64)))
    matmul = 2 * (64 * 100 + 100 * 10)
    assert matmul <= f <= matmul * 1.1  # plus bias adds and relu
    f8 = metrics.flops(m, jnp.ones((8, 64)))
    assert f8 == pytest.approx(8 * f, rel=0.02)
    assert metrics.flops(lambda x: x @ x.T, jnp.ones((4, 5))) == pytest.approx(2 * 4 * 4 * 5, rel=0.1)


def test_model_flops_are_counted_on_the_cpu_whatever_the_default_backend(monkeypatch):
    from research.metrics import cost

    m = nn.build_model("lenet5", input_shape=(8, 8, 1), num_classes=10, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 8, 8, 1))
    on_cpu = metrics.flops(m, x)
    dense = 2 * (64 * 120 + 120 * 84 + 84 * 10)  # what the GPU's cost analysis counted (no cuDNN convolutions)
    assert on_cpu > 1.5 * dense
    assert cost._counting_sharding() is None  # pylint: disable=protected-access
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the code path of an accelerator process
    sharding = cost._counting_sharding()  # pylint: disable=protected-access
    assert sharding.device_set == {jax.devices("cpu")[0]}
    assert metrics.flops(m, x) == on_cpu
    # JAX_PLATFORMS without cpu: the default backend counts, and a warning names the fix (once)
    real_devices = jax.devices

    def devices(backend=None):
        if backend == "cpu":
            raise RuntimeError("Unknown backend cpu")
        return real_devices(backend)

    monkeypatch.setattr(jax, "devices", devices)
    cost._warn_no_cpu.cache_clear()  # pylint: disable=protected-access
    with pytest.warns(UserWarning, match="JAX_PLATFORMS=cuda,cpu"):
        assert cost._counting_sharding() is None  # pylint: disable=protected-access


def test_latency_reports_median_of_repeats():
    m = nn.build_model("lenet5", input_shape=(8, 8, 1), num_classes=10, rngs=nnx.Rngs(0))
    out = metrics.model_latency(m, jnp.ones((2, 8, 8, 1)), repeats=5)
    assert out["repeats"] == 5 and out["min"] <= out["median"] <= out["max"]
    with pytest.raises(ValueError, match="repeats"):
        metrics.latency(lambda: 1, repeats=0)
