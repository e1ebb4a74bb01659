"""Small NNX models used by the export tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class SmallMLP(nnx.Module):
    """64 -> hidden -> 10 classifier for flattened 8x8 digits."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(64, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        return self.fc2(nnx.relu(self.fc1(x)))


class SmallConvNet(nnx.Module):
    """Conv + BatchNorm + ReLU + Dense on 8x8x1 inputs."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8 * 8 * 8, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn(self.conv(x)))
        return self.head(x.reshape(x.shape[0], -1))


class SortFeatures(nnx.Module):
    """Sorts features: ``sort`` has no TFLite builtin."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.sort(x, axis=-1)


class Unsupported(nnx.Module):
    """A model with an operation the TFLite converter rejects, in layer ``block``."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.fc = nnx.Linear(64, 16, rngs=rngs)
        self.block = SortFeatures()

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.block(self.fc(x.reshape(x.shape[0], -1)))


class BatchMixer(nnx.Module):
    """Splits each row into two 4-feature tokens, applies one linear layer to every token and
    joins them again. Its reshapes have leading size ``2 * batch``, which a graph traced at one
    batch size does not generalise."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.fc = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b = x.shape[0]
        return self.fc(x.reshape(2 * b, 4)).reshape(b, 6)


class Clamps(nnx.Module):
    """Clamps to [0, 1] and [-1, 1]: TFLite fuses them into RELU_0_TO_1 / RELU_N1_TO_1."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.fc = nnx.Linear(8, 6, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.fc(x)
        return jnp.concatenate([jnp.clip(h[:, :3], 0.0, 1.0), jnp.clip(h[:, 3:], -1.0, 1.0)], axis=-1)
