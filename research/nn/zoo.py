"""The model zoo, in Flax NNX.

Every model takes ``(input_shape, num_classes, *, rngs, **options)`` where ``input_shape``
excludes the batch dimension and comes from the data set: ``(H, W, C)`` for images,
``(L,)`` or ``(L, C)`` for 1-D signals, anything for the MLP (it flattens). Activations are
called as functions in ``__call__`` (never stored as attributes) so models pickle cleanly.
Models with BatchNorm or Dropout follow NNX's ``model.train()`` / ``model.eval()`` modes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from research.nn.registry import register_model


def _flat_size(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


def _max_pool(x: jax.Array, window: int = 2) -> jax.Array:
    if min(x.shape[1:-1]) < window:
        return x
    return nnx.max_pool(x, window_shape=(window,) * (x.ndim - 2), strides=(window,) * (x.ndim - 2))


def _global_avg_pool(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))


def _as_image(x: jax.Array, input_shape: Sequence[int]) -> jax.Array:
    if len(input_shape) == 2:  # (H, W) -> (H, W, 1)
        return x[..., None]
    if len(input_shape) == 1:  # 1-D signal treated as (L, 1) for 1-D convs
        return x[..., None]
    return x


class MLP(nnx.Module):
    """Multi-layer perceptron on flattened inputs: ``Linear -> relu [-> Dropout]`` per hidden width."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        widths: Sequence[int] = (256, 128),
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        dims = [_flat_size(input_shape), *widths]
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:], strict=False)])
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        self.head = nnx.Linear(dims[-1], num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
            if self.dropout is not None:
                x = self.dropout(x)
        return self.head(x)


@register_model("mlp")
def mlp(input_shape, num_classes, *, widths=(256, 128), dropout=0.0, rngs):
    """An MLP with the given hidden ``widths`` (any number, any sizes)."""
    return MLP(input_shape, num_classes, widths=tuple(widths), dropout=dropout, rngs=rngs)


@register_model("lenet300")
def lenet300(input_shape, num_classes, *, dropout=0.0, rngs):
    """LeNet-300-100 (LeCun et al. 1998): an MLP with hidden widths 300 and 100."""
    return MLP(input_shape, num_classes, widths=(300, 100), dropout=dropout, rngs=rngs)


class LeNet5(nnx.Module):
    """LeNet-5: conv(6,5x5) -> pool -> conv(16,5x5) -> pool -> 120 -> 84 -> classes (SAME padding)."""

    def __init__(self, input_shape, num_classes, *, rngs: nnx.Rngs):
        self.input_shape = tuple(input_shape)
        h, w, c = _image_hwc(input_shape)
        self.conv1 = nnx.Conv(c, 6, (5, 5), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(6, 16, (5, 5), padding="SAME", rngs=rngs)
        h, w = _pooled(h, 2), _pooled(w, 2)
        h, w = _pooled(h, 2), _pooled(w, 2)
        self.fc1 = nnx.Linear(h * w * 16, 120, rngs=rngs)
        self.fc2 = nnx.Linear(120, 84, rngs=rngs)
        self.head = nnx.Linear(84, num_classes, rngs=rngs)

    def __call__(self, x):
        x = _as_image(x, self.input_shape)
        x = _max_pool(jax.nn.relu(self.conv1(x)))
        x = _max_pool(jax.nn.relu(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(self.fc1(x))
        x = jax.nn.relu(self.fc2(x))
        return self.head(x)


def _image_hwc(input_shape) -> tuple[int, int, int]:
    if len(input_shape) == 3:
        return tuple(input_shape)
    if len(input_shape) == 2:
        return (*input_shape, 1)
    raise ValueError(f"image model needs input_shape (H, W) or (H, W, C), got {tuple(input_shape)}")


def _pooled(n: int, window: int) -> int:
    return n // window if n >= window else n


@register_model("lenet5")
def lenet5(input_shape, num_classes, *, rngs):
    """LeNet-5 for image inputs of any size (8x8 digits, 28x28 MNIST, 32x32 CIFAR)."""
    return LeNet5(input_shape, num_classes, rngs=rngs)


class CNN1D(nnx.Module):
    """The MNIST-1D convolutional baseline: three 1-D convs (k=5, stride 2) and a linear head.

    References:
      Greydanus & Kobak, "Scaling down deep learning with MNIST-1D", https://arxiv.org/abs/2011.14439
    """

    def __init__(self, input_shape, num_classes, *, channels=25, rngs: nnx.Rngs):
        self.input_shape = tuple(input_shape)
        length = input_shape[0]
        cin = input_shape[1] if len(input_shape) == 2 else 1
        self.convs = nnx.List(
            [
                nnx.Conv(cin, channels, (5,), strides=(2,), padding=((1, 1),), rngs=rngs),
                nnx.Conv(channels, channels, (3,), strides=(2,), padding=((1, 1),), rngs=rngs),
                nnx.Conv(channels, channels, (3,), strides=(2,), padding=((1, 1),), rngs=rngs),
            ]
        )
        for k, s, p in ((5, 2, 1), (3, 2, 1), (3, 2, 1)):
            length = (length + 2 * p - k) // s + 1
        self.head = nnx.Linear(length * channels, num_classes, rngs=rngs)

    def __call__(self, x):
        if x.ndim == 2:
            x = x[..., None]
        for conv in self.convs:
            x = jax.nn.relu(conv(x))
        return self.head(x.reshape(x.shape[0], -1))


@register_model("cnn1d")
def cnn1d(input_shape, num_classes, *, channels=25, rngs):
    """1-D CNN for MNIST-1D (input ``(40,)``)."""
    return CNN1D(input_shape, num_classes, channels=channels, rngs=rngs)


def _conv_bn(cin, cout, k, stride, rngs, groups=1):
    conv = nnx.Conv(
        cin,
        cout,
        (k, k),
        strides=(stride, stride),
        padding="SAME",
        use_bias=False,
        feature_group_count=groups,
        rngs=rngs,
    )
    return conv, nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)


class BasicBlock(nnx.Module):
    """ResNet basic block: conv-BN-relu-conv-BN plus shortcut (1x1 conv-BN when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3, stride, rngs)
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3, 1, rngs)
        if stride != 1 or cin != cout:
            self.proj_conv, self.proj_bn = _conv_bn(cin, cout, 1, stride, rngs)
        else:
            self.proj_conv, self.proj_bn = None, None

    def __call__(self, x):
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.proj_conv is None else self.proj_bn(self.proj_conv(x))
        return jax.nn.relu(y + shortcut)


class ResNetCIFAR(nnx.Module):
    """CIFAR-style ResNet (He et al. 2016): 3 stages of ``n`` basic blocks, widths 16/32/64.

    Depth is ``6n + 2``: ResNet-20 has n=3, ResNet-56 has n=9.

    References:
      He et al., "Deep Residual Learning for Image Recognition", https://arxiv.org/abs/1512.03385
    """

    def __init__(self, input_shape, num_classes, *, n: int, width: int = 16, rngs: nnx.Rngs):
        self.input_shape = tuple(input_shape)
        _, _, c = _image_hwc(input_shape)
        self.stem_conv, self.stem_bn = _conv_bn(c, width, 3, 1, rngs)
        blocks = []
        cin = width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(BasicBlock(cin, cout, stride, rngs=rngs))
                cin = cout
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(self, x):
        x = _as_image(x, self.input_shape)
        x = jax.nn.relu(self.stem_bn(self.stem_conv(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(_global_avg_pool(x))


@register_model("resnet20")
def resnet20(input_shape, num_classes, *, width=16, rngs):
    """ResNet-20 (CIFAR-style, 0.27M parameters at width 16 on 10 classes)."""
    return ResNetCIFAR(input_shape, num_classes, n=3, width=width, rngs=rngs)


@register_model("resnet56")
def resnet56(input_shape, num_classes, *, width=16, rngs):
    """ResNet-56 (CIFAR-style, 0.85M parameters at width 16 on 10 classes)."""
    return ResNetCIFAR(input_shape, num_classes, n=9, width=width, rngs=rngs)


class InvertedResidual(nnx.Module):
    """MobileNetV2 block: 1x1 expand -> 3x3 depthwise -> 1x1 linear projection (+ residual)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, *, rngs: nnx.Rngs):
        hidden = cin * expand
        if expand != 1:
            self.expand_conv, self.expand_bn = _conv_bn(cin, hidden, 1, 1, rngs)
        else:
            self.expand_conv, self.expand_bn = None, None
        self.dw_conv, self.dw_bn = _conv_bn(hidden, hidden, 3, stride, rngs, groups=hidden)
        self.project_conv, self.project_bn = _conv_bn(hidden, cout, 1, 1, rngs)
        self.use_residual = stride == 1 and cin == cout

    def __call__(self, x):
        y = x
        if self.expand_conv is not None:
            y = jax.nn.relu6(self.expand_bn(self.expand_conv(y)))
        y = jax.nn.relu6(self.dw_bn(self.dw_conv(y)))
        y = self.project_bn(self.project_conv(y))
        return x + y if self.use_residual else y


class MobileNetV2Small(nnx.Module):
    """A small MobileNetV2-style net for small images: depthwise separable inverted residuals.

    References:
      Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
      https://arxiv.org/abs/1801.04381
    """

    # (expansion t, output channels c, repeats n, first stride s)
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 1))

    def __init__(self, input_shape, num_classes, *, width_multiplier: float = 1.0, rngs: nnx.Rngs):
        self.input_shape = tuple(input_shape)
        _, _, c = _image_hwc(input_shape)

        def ch(v):
            return max(8, int(round(v * width_multiplier / 8)) * 8)

        cin = ch(16)
        self.stem_conv, self.stem_bn = _conv_bn(c, cin, 3, 1, rngs)
        blocks = []
        for t, cc, n, s in self.SETTINGS:
            for i in range(n):
                blocks.append(InvertedResidual(cin, ch(cc), s if i == 0 else 1, t, rngs=rngs))
                cin = ch(cc)
        self.blocks = nnx.List(blocks)
        self.last_conv, self.last_bn = _conv_bn(cin, ch(128), 1, 1, rngs)
        self.head = nnx.Linear(ch(128), num_classes, rngs=rngs)

    def __call__(self, x):
        x = _as_image(x, self.input_shape)
        x = jax.nn.relu6(self.stem_bn(self.stem_conv(x)))
        for block in self.blocks:
            x = block(x)
        x = jax.nn.relu6(self.last_bn(self.last_conv(x)))
        return self.head(_global_avg_pool(x))


@register_model("mobilenetv2")
def mobilenetv2(input_shape, num_classes, *, width_multiplier=1.0, rngs):
    """Small MobileNetV2-style net (about 0.1M parameters at width 1.0 on 10 classes)."""
    return MobileNetV2Small(input_shape, num_classes, width_multiplier=width_multiplier, rngs=rngs)


class VGGSmall(nnx.Module):
    """VGG-style net: pairs of 3x3 conv-BN-relu followed by 2x2 max-pooling, then a linear head."""

    def __init__(self, input_shape, num_classes, *, widths=(32, 64, 128), rngs: nnx.Rngs):
        self.input_shape = tuple(input_shape)
        _, _, cin = _image_hwc(input_shape)
        convs, bns = [], []
        for w in widths:
            for _ in range(2):
                conv, bn = _conv_bn(cin, w, 3, 1, rngs)
                convs.append(conv)
                bns.append(bn)
                cin = w
        self.convs = nnx.List(convs)
        self.bns = nnx.List(bns)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(self, x):
        x = _as_image(x, self.input_shape)
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=False)):
            x = jax.nn.relu(bn(conv(x)))
            if i % 2 == 1:
                x = _max_pool(x)
        return self.head(_global_avg_pool(x))


@register_model("vgg_small")
def vgg_small(input_shape, num_classes, *, widths=(32, 64, 128), rngs):
    """VGG-small: 3 stages of two conv-BN-relu layers each, widths ``widths``."""
    return VGGSmall(input_shape, num_classes, widths=tuple(widths), rngs=rngs)


#: Keyword options giving each zoo model its smallest widths (models without width options are
#: already small), for quick tests and ``--quick`` benchmark runs:
#: ``build_model(name, ..., **TINY_OPTIONS.get(name, {}))``.
TINY_OPTIONS: dict[str, dict] = {
    "mlp": {"widths": (32,)},
    "cnn1d": {"channels": 8},
    "resnet20": {"width": 4},
    "resnet56": {"width": 4},
    "mobilenetv2": {"width_multiplier": 0.25},
    "vgg_small": {"widths": (8, 16)},
    "attn_gru": {"dim": 16, "heads": 2, "mlp_dim": 16, "hidden": 16},
    # vit keeps its defaults (18k parameters): at dim 16, depth 1 its int8 TFLite file agreed 0.989
    # with JAX on digits, under the 0.99 of the export zoo test
    # the searchable families' smallest members (research/nn/families.py)
    "mlp_family": {"depth": 1, "width_0": 16},
    "conv1d_family": {"width_0": 8, "width_1": 8, "width_2": 8, "depth_0": 1, "depth_1": 1, "depth_2": 1},
    "resnet_family": {"width_0": 8, "width_1": 16, "width_2": 32, "depth_0": 1, "depth_1": 1, "depth_2": 1},
    "mobilenet_family": {
        "width_0": 0.5,
        "width_1": 0.5,
        "width_2": 0.5,
        "expand_0": 3,
        "expand_1": 3,
        "expand_2": 3,
        "depth_0": 1,
        "depth_1": 1,
        "depth_2": 1,
    },
}
