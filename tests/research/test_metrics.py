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


def test_latency_reports_median_of_repeats():
    m = nn.build_model("lenet5", input_shape=(8, 8, 1), num_classes=10, rngs=nnx.Rngs(0))
    out = metrics.model_latency(m, jnp.ones((2, 8, 8, 1)), repeats=5)
    assert out["repeats"] == 5 and out["min"] <= out["median"] <= out["max"]
    with pytest.raises(ValueError, match="repeats"):
        metrics.latency(lambda: 1, repeats=0)
