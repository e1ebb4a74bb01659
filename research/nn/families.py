"""Searchable model families: zoo models whose architecture is a set of scalar choices.

A family is an ordinary zoo model (``build_model("mlp_family", ..., depth=2, width_0=64)``) plus a
declared choice space (:class:`Family`). Every choice is a scalar keyword option, so
``--set model.options.width_0=64`` picks a member from the command line, and
:meth:`Family.get_space` returns a :class:`research.automl.Space` whose names are exactly those
``--set`` keys (``model.options.<option>``), which a config's ``get_space()`` can return directly.

The largest member of a family is also its weight-sharing supernet: calling it as
``model(x, masks)`` with ``masks = model.arch_masks(options)`` runs the sub-network ``options``
inside it (channel prefixes, depth gates, centre crops of the kernels), with outputs equal to the
member built with those options and the supernet's weights sliced into it
(``methods.nas.extract``). Masks are arrays of fixed shapes, so the masks of many sub-networks
stack and ``jax.vmap`` evaluates them in one program. Without ``masks`` a family model is a plain
network of ``nnx.Linear``/``nnx.Conv``/``nnx.BatchNorm`` layers that pruning, quantization,
decomposition, distillation and export accept like any other zoo model.

Families: ``mlp_family`` (depth, per-layer width), ``conv1d_family`` (MNIST-1D: per-stage width,
depth and kernel 3/5, a global-max or flattened head), ``resnet_family`` (per-stage width and depth, BatchNorm) and
``mobilenet_family`` (MobileNetV2-style inverted residuals: per-stage width multiplier,
expansion ratio, kernel 3/5 and depth, BatchNorm).

References:
  Cai et al., "Once-for-All: Train One Network and Specialize it for Efficient Deployment",
  https://arxiv.org/abs/1908.09791
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.automl.space import Categorical
from research.automl.space import Space
from research.nn.registry import register_model
from research.registry import Registry

Masks = dict[str, jax.Array]

# ----------------------------------------------------------------------------- the Family spec


@dataclasses.dataclass(frozen=True, kw_only=True)
class Family:
    """The choice space of a searchable zoo model.

    Attributes:
      name: the zoo model name (``research.nn.build_model(name, ...)``).
      choices: option name -> the values it may take, in increasing size order.
      when: option name -> ``{parent option: values}``; the option matters only when the parent
        takes one of those values (e.g. ``width_2`` only when ``depth == 3``).
    """

    name: str
    choices: Mapping[str, tuple[Any, ...]]
    when: Mapping[str, Mapping[str, tuple[Any, ...]]] = dataclasses.field(default_factory=dict)

    def largest(self) -> dict[str, Any]:
        """The largest member (the supernet): every option at its largest choice."""
        return {k: v[-1] for k, v in self.choices.items()}

    def smallest(self) -> dict[str, Any]:
        """The smallest member: every option at its smallest choice (inactive ones canonical)."""
        return self.canonical({k: v[0] for k, v in self.choices.items()})

    def active(self, options: Mapping[str, Any], name: str) -> bool:
        """Whether option ``name`` matters for ``options``."""
        return all(options[p] in vals for p, vals in self.when.get(name, {}).items())

    def canonical(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` completed with the largest choices and with inactive options set to their
        largest choice, so that equal architectures compare equal.

        Raises:
          ValueError: an unknown option or a value outside its choices (names both and the choices).
        """
        unknown = sorted(set(options) - set(self.choices))
        if unknown:
            raise ValueError(f"family {self.name!r} has no option(s) {unknown}; options: {sorted(self.choices)}")
        out = {**self.largest(), **options}
        for k, v in out.items():
            if v not in self.choices[k]:
                raise ValueError(f"{self.name}: {k}={v!r} is not one of the choices {list(self.choices[k])}")
        for k in out:
            if not self.active(out, k):
                out[k] = self.choices[k][-1]
        return out

    def key(self, options: Mapping[str, Any]) -> tuple:
        """A hashable key of the canonical architecture."""
        c = self.canonical(options)
        return tuple(c[k] for k in self.choices)

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        """A uniformly random member (each option drawn independently)."""
        return self.canonical({k: v[int(rng.integers(len(v)))] for k, v in self.choices.items()})

    def size(self) -> int:
        """The number of distinct architectures in the family."""
        return len({self.key(dict(zip(self.choices, combo, strict=True))) for combo in self._product()})

    def _product(self):
        return itertools.product(*self.choices.values())

    def dimensions(self) -> tuple[str, ...]:
        """The elastic dimensions of the family in declaration order: each option's name up to its
        first ``_`` (``width_0`` -> ``width``, ``depth`` -> ``depth``)."""
        return tuple(dict.fromkeys(dimension(k) for k in self.choices))

    def restrict(self, elastic: Sequence[str]) -> Family:
        """The same family with only the dimensions in ``elastic`` free: every other option is
        fixed at its largest choice (progressive shrinking's phases, ``methods.nas.Phase``).

        Raises:
          ValueError: a name in ``elastic`` is not one of :meth:`dimensions`.
        """
        unknown = sorted(set(elastic) - set(self.dimensions()))
        if unknown:
            raise ValueError(
                f"family {self.name!r} has no dimension(s) {unknown}; dimensions: {list(self.dimensions())}"
            )
        choices = {k: (v if dimension(k) in elastic else (v[-1],)) for k, v in self.choices.items()}
        return dataclasses.replace(self, choices=choices)

    def get_space(self, prefix: str = "model.options.") -> Space:
        """The family as a :class:`research.automl.Space` of categorical choices.

        Args:
          prefix: prepended to every option name; the default gives the ``--set`` keys
            ``model.options.<option>`` that :func:`research.config.apply_overrides` accepts.
        """
        params = {}
        for k, vals in self.choices.items():
            when = {prefix + p: list(v) for p, v in self.when.get(k, {}).items()} or None
            params[prefix + k] = Categorical(list(vals), when=when)
        return Space(params)

    def from_params(self, params: Mapping[str, Any], prefix: str = "model.options.") -> dict[str, Any]:
        """The canonical options of a point of :meth:`get_space` (inactive options filled in)."""
        return self.canonical({k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)})

    def overrides(self, options: Mapping[str, Any]) -> list[str]:
        """``--set`` strings that select ``options`` in a config (``model.name=...`` included)."""
        return [f"model.name={self.name}"] + [f"model.options.{k}={v}" for k, v in self.canonical(options).items()]


def dimension(option: str) -> str:
    """The elastic dimension an option belongs to: its name up to the first ``_``."""
    return option.split("_", 1)[0]


FAMILIES: Registry[Family] = Registry(
    "searchable model family", hint="register one with register_family(Family(name=<a zoo model>, ...))"
)


def register_family(family: Family) -> Family:
    """Registers ``family`` under its zoo name.

    Raises:
      DuplicateNameError: another family is registered under the name (a ``ValueError``).
    """
    return FAMILIES.register(family.name, family)


def get_family(name: str) -> Family:
    """The family registered under ``name``.

    Raises:
      UnknownNameError: naming the unknown family, the closest and all registered ones (a ``KeyError``).
    """
    return FAMILIES.get(name)


def list_families() -> list[str]:
    """Names of all registered families, sorted."""
    return FAMILIES.names()


# ----------------------------------------------------------------------------- mask helpers


def prefix_mask(n: int, n_max: int) -> jax.Array:
    """``float32[n_max]``: ones on the first ``n`` entries."""
    return (jnp.arange(n_max) < n).astype(jnp.float32)


def centre_mask(k: int, k_max: int) -> jax.Array:
    """``float32[k_max]``: ones on the centre ``k`` taps of a ``k_max``-tap kernel."""
    lo = (k_max - k) // 2
    idx = jnp.arange(k_max)
    return ((idx >= lo) & (idx < lo + k)).astype(jnp.float32)


def _dimension_numbers(ndim: int) -> tuple[str, str, str]:
    spatial = "HWD"[: ndim - 2] if ndim > 3 else "W"
    return (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")


def masked_conv(conv: nnx.Conv, x: jax.Array, kmask: jax.Array | None) -> jax.Array:
    """``conv(x)`` with the kernel's taps multiplied by ``kmask`` (one 1-D mask for every spatial axis).

    A 5-tap kernel whose outer ring is masked and padded by 2 computes exactly what the centre
    3 taps padded by 1 compute, at every stride, which is how kernel 3 runs inside kernel 5.
    """
    if kmask is None:
        return conv(x)
    kernel = conv.kernel[...]
    nsp = kernel.ndim - 2
    m = kmask
    for _ in range(nsp - 1):
        m = m[:, None] * kmask[None, :] if m.ndim == 1 else m[..., None] * kmask
    kernel = kernel * m.reshape(m.shape + (1, 1))
    y = jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=conv.strides,
        padding=list(conv.padding),
        feature_group_count=conv.feature_group_count,
        dimension_numbers=_dimension_numbers(x.ndim),
    )
    if conv.bias is not None:
        y = y + conv.bias[...]
    return y


def _gate(new: jax.Array, old: jax.Array, g: jax.Array | None) -> jax.Array:
    """``new`` where the block is on (``g == 1``), ``old`` where it is skipped (``g == 0``)."""
    if g is None:
        return new
    return g * new + (1.0 - g) * old


def _mul(x: jax.Array, m: jax.Array | None) -> jax.Array:
    return x if m is None else x * m


def _get(masks: Masks | None, key: str) -> jax.Array | None:
    return None if masks is None else masks[key]


def _flat_size(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


def _bn(c: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(c, momentum=0.9, rngs=rngs)


def _conv(cin, cout, k, stride, nd, rngs, groups=1, bias=False) -> nnx.Conv:
    return nnx.Conv(
        cin,
        cout,
        (k,) * nd,
        strides=(stride,) * nd,
        padding=((k // 2, k // 2),) * nd,
        use_bias=bias,
        feature_group_count=groups,
        rngs=rngs,
    )


def _image(x: jax.Array, input_shape: Sequence[int]) -> jax.Array:
    return x[..., None] if len(input_shape) == 2 else x


def _image_channels(input_shape: Sequence[int]) -> int:
    if len(input_shape) == 3:
        return int(input_shape[2])
    if len(input_shape) == 2:
        return 1
    raise ValueError(f"image family needs input_shape (H, W) or (H, W, C), got {tuple(input_shape)}")


# ----------------------------------------------------------------------------- MLP family

MLP_WIDTHS = (16, 32, 64, 128)
MLP_DEPTHS = (1, 2, 3)


class MLPFamily(nnx.Module):
    """An MLP of ``depth`` hidden layers with widths ``width_0..width_{depth-1}`` (flattened inputs)."""

    family_name = "mlp_family"

    def __init__(self, input_shape, num_classes, *, depth: int, widths: Sequence[int], rngs: nnx.Rngs):
        if depth < 1 or len(widths) < depth:
            raise ValueError(f"mlp_family: depth={depth} needs at least {depth} widths, got {tuple(widths)}")
        dims = [_flat_size(input_shape), *widths[:depth]]
        self.widths = tuple(int(w) for w in widths[:depth])
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:], strict=True)])
        self.head = nnx.Linear(dims[-1], num_classes, rngs=rngs)

    def arch_masks(self, options: Mapping[str, Any]) -> Masks:
        """Masks selecting the sub-network ``options`` (this model must be the family's largest)."""
        o = MLP_FAMILY.canonical(options)
        w_max = max(self.widths)
        if len(set(self.widths)) != 1:
            raise ValueError(f"arch_masks needs the supernet (equal widths), this MLP has widths {self.widths}")
        n = len(self.widths)
        width = jnp.stack([prefix_mask(o[f"width_{i}"], w_max) for i in range(n)])
        depth = prefix_mask(o["depth"], n)
        return {"width": width, "depth": depth}

    def __call__(self, x: jax.Array, masks: Masks | None = None) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for i, layer in enumerate(self.layers):
            h = _mul(jax.nn.relu(layer(x)), None if masks is None else masks["width"][i])
            x = h if i == 0 else _gate(h, x, None if masks is None else masks["depth"][i])
        return self.head(x)


MLP_FAMILY = register_family(
    Family(
        name="mlp_family",
        choices={
            "depth": MLP_DEPTHS,
            "width_0": MLP_WIDTHS,
            "width_1": MLP_WIDTHS,
            "width_2": MLP_WIDTHS,
        },
        when={"width_1": {"depth": (2, 3)}, "width_2": {"depth": (3,)}},
    )
)


@register_model("mlp_family")
def mlp_family(input_shape, num_classes, *, depth=3, width_0=128, width_1=128, width_2=128, rngs):
    """Searchable MLP: ``depth`` in 1..3 hidden layers, each 16/32/64/128 wide (see ``MLP_FAMILY``)."""
    return MLPFamily(input_shape, num_classes, depth=depth, widths=(width_0, width_1, width_2), rngs=rngs)


# ----------------------------------------------------------------------------- 1-D conv family (MNIST-1D)

CONV1D_WIDTHS = (8, 16, 24, 32)
CONV1D_DEPTHS = (1, 2, 3)
KERNELS = (3, 5)
#: The 1-D family's heads, smaller first: a linear layer on the global max over positions of each
#: channel (shift-invariant, ``C`` inputs) or on every position's features (``C * L`` inputs).
CONV1D_HEADS = ("max", "flatten")


class Conv1DStage(nnx.Module):
    """A stride-2 conv (cin -> width) then ``depth - 1`` residual convs, all ``kernel`` wide, relu."""

    def __init__(self, cin: int, width: int, depth: int, kernel: int, *, rngs: nnx.Rngs):
        self.down = _conv(cin, width, kernel, 2, 1, rngs, bias=True)
        self.blocks = nnx.List([_conv(width, width, kernel, 1, 1, rngs, bias=True) for _ in range(depth - 1)])

    def __call__(self, x, c=None, g=None, k=None):
        x = _mul(jax.nn.relu(masked_conv(self.down, x, k)), c)
        for i, conv in enumerate(self.blocks):
            x = _gate(x + _mul(jax.nn.relu(masked_conv(conv, x, k)), c), x, None if g is None else g[i + 1])
        return x


class Conv1DFamily(nnx.Module):
    """Three 1-D conv stages (stride 2 each) and a linear head.

    Inputs ``(L,)`` are one-channel signals; ``(L, C, ...)`` are length-``L`` signals with ``C * ...``
    channels (an 8x8 image is 8 steps of 8 channels).

    ``head="flatten"`` reads the channel-major flattened features (``(B, C, L) -> (B, C*L)``), so a
    narrower stage's features are a prefix of the wider one's and the head's kernel slices like
    every other layer's. ``head="max"`` reads each channel's maximum over positions (``C`` inputs,
    invariant to where in the signal a pattern sits); inside the supernet (a ``flatten`` model) the
    pooled features take the first ``C`` inputs of the flattened head, so a ``max`` member's head
    is again a prefix of the supernet's.

    References:
      Greydanus & Kobak, "Scaling down deep learning with MNIST-1D", https://arxiv.org/abs/2011.14439
    """

    family_name = "conv1d_family"

    def __init__(self, input_shape, num_classes, *, widths, depths, kernels, head="flatten", rngs: nnx.Rngs):
        if head not in CONV1D_HEADS:
            raise ValueError(f"head={head!r} is not one of {list(CONV1D_HEADS)}")
        self.input_shape = tuple(input_shape)
        length = int(input_shape[0])
        cin = _flat_size(input_shape[1:])  # (L,) -> 1 channel; (L, C, ...) -> prod(C, ...) channels
        self.widths, self.depths, self.kernels = tuple(widths), tuple(depths), tuple(kernels)
        self.head_kind = head
        stages = []
        for w, d, k in zip(widths, depths, kernels, strict=True):
            stages.append(Conv1DStage(cin, w, d, k, rngs=rngs))
            cin = w
            length = (length - 1) // 2 + 1
        self.stages = nnx.List(stages)
        self.length = length
        self.head = nnx.Linear(cin * (length if head == "flatten" else 1), num_classes, rngs=rngs)

    def arch_masks(self, options: Mapping[str, Any]) -> Masks:
        """Masks selecting the sub-network ``options`` (this model must be the family's largest)."""
        o = CONV1D_FAMILY.canonical(options)
        out = {}
        for s, (w, d, k) in enumerate(zip(self.widths, self.depths, self.kernels, strict=True)):
            out[f"c{s}"] = prefix_mask(o[f"width_{s}"], w)
            out[f"g{s}"] = prefix_mask(o[f"depth_{s}"], d)
            out[f"k{s}"] = centre_mask(o[f"kernel_{s}"], k)
        out["pool"] = jnp.asarray([o["head"] == "max"], jnp.float32)
        return out

    def __call__(self, x: jax.Array, masks: Masks | None = None) -> jax.Array:
        x = x.reshape(x.shape[0], self.input_shape[0], -1)
        for s, stage in enumerate(self.stages):
            x = stage(x, _get(masks, f"c{s}"), _get(masks, f"g{s}"), _get(masks, f"k{s}"))
        if self.head_kind == "max":
            return self.head(jnp.max(x, axis=1))
        flat = jnp.swapaxes(x, 1, 2).reshape(x.shape[0], -1)
        pool = _get(masks, "pool")
        if pool is not None:  # a max-head member inside the supernet: pooled features on the first C inputs
            pooled = jnp.max(x, axis=1)
            pooled = jnp.pad(pooled, ((0, 0), (0, flat.shape[1] - pooled.shape[1])))
            flat = _gate(pooled, flat, pool[0])
        return self.head(flat)


CONV1D_FAMILY = register_family(
    Family(
        name="conv1d_family",
        choices={
            **{f"width_{s}": CONV1D_WIDTHS for s in range(3)},
            **{f"depth_{s}": CONV1D_DEPTHS for s in range(3)},
            **{f"kernel_{s}": KERNELS for s in range(3)},
            "head": CONV1D_HEADS,
        },
    )
)


@register_model("conv1d_family")
def conv1d_family(
    input_shape,
    num_classes,
    *,
    width_0=32,
    width_1=32,
    width_2=32,
    depth_0=3,
    depth_1=3,
    depth_2=3,
    kernel_0=5,
    kernel_1=5,
    kernel_2=5,
    head="flatten",
    rngs,
):
    """Searchable 1-D CNN for MNIST-1D: per stage width 8..32, depth 1..3, kernel 3/5; a global-max or
    flattened head (see ``CONV1D_FAMILY``)."""
    return Conv1DFamily(
        input_shape,
        num_classes,
        widths=(width_0, width_1, width_2),
        depths=(depth_0, depth_1, depth_2),
        kernels=(kernel_0, kernel_1, kernel_2),
        head=head,
        rngs=rngs,
    )


# ----------------------------------------------------------------------------- ResNet family

RESNET_WIDTHS = ((8, 12, 16), (16, 24, 32), (32, 48, 64))
RESNET_DEPTHS = (1, 2, 3)


class ResBlock(nnx.Module):
    """Basic residual block (conv-BN-relu-conv-BN + shortcut, relu); a 1x1 conv-BN shortcut when ``proj``."""

    def __init__(self, cin: int, cout: int, stride: int, proj: bool, *, rngs: nnx.Rngs):
        self.conv1, self.bn1 = _conv(cin, cout, 3, stride, 2, rngs), _bn(cout, rngs)
        self.conv2, self.bn2 = _conv(cout, cout, 3, 1, 2, rngs), _bn(cout, rngs)
        if proj:
            self.proj_conv, self.proj_bn = _conv(cin, cout, 1, stride, 2, rngs), _bn(cout, rngs)
        else:
            self.proj_conv, self.proj_bn = None, None

    def __call__(self, x, c=None):
        y = _mul(jax.nn.relu(self.bn1(self.conv1(x))), c)
        y = self.bn2(self.conv2(y))
        shortcut = x if self.proj_conv is None else self.proj_bn(self.proj_conv(x))
        return _mul(jax.nn.relu(y + shortcut), c)


class ResNetFamily(nnx.Module):
    """CIFAR-style ResNet with three stages of basic blocks; per-stage width and depth.

    The stem has stage 0's width; the first block of stages 1 and 2 has stride 2 and a projection
    shortcut; blocks after the first of a stage are the ones depth removes.

    References:
      He et al., "Deep Residual Learning for Image Recognition", https://arxiv.org/abs/1512.03385
    """

    family_name = "resnet_family"

    def __init__(self, input_shape, num_classes, *, widths, depths, rngs: nnx.Rngs):
        self.input_shape = tuple(input_shape)
        self.widths, self.depths = tuple(widths), tuple(depths)
        cin = _image_channels(input_shape)
        self.stem_conv, self.stem_bn = _conv(cin, widths[0], 3, 1, 2, rngs), _bn(widths[0], rngs)
        cin = widths[0]
        stages = []
        for s, (w, d) in enumerate(zip(widths, depths, strict=True)):
            blocks = [ResBlock(cin, w, 2 if s > 0 else 1, s > 0, rngs=rngs)]
            blocks += [ResBlock(w, w, 1, False, rngs=rngs) for i in range(1, d)]
            stages.append(nnx.List(blocks))
            cin = w
        self.stages = nnx.List(stages)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    def arch_masks(self, options: Mapping[str, Any]) -> Masks:
        """Masks selecting the sub-network ``options`` (this model must be the family's largest)."""
        o = RESNET_FAMILY.canonical(options)
        out = {}
        for s, (w, d) in enumerate(zip(self.widths, self.depths, strict=True)):
            out[f"c{s}"] = prefix_mask(o[f"width_{s}"], w)
            out[f"g{s}"] = prefix_mask(o[f"depth_{s}"], d)
        return out

    def __call__(self, x: jax.Array, masks: Masks | None = None) -> jax.Array:
        x = _image(x, self.input_shape)
        x = _mul(jax.nn.relu(self.stem_bn(self.stem_conv(x))), _get(masks, "c0"))
        for s, blocks in enumerate(self.stages):
            c, g = _get(masks, f"c{s}"), _get(masks, f"g{s}")
            for i, block in enumerate(blocks):
                x = block(x, c) if i == 0 else _gate(block(x, c), x, None if g is None else g[i])
        return self.head(jnp.mean(x, axis=(1, 2)))


RESNET_FAMILY = register_family(
    Family(
        name="resnet_family",
        choices={
            **{f"width_{s}": RESNET_WIDTHS[s] for s in range(3)},
            **{f"depth_{s}": RESNET_DEPTHS for s in range(3)},
        },
    )
)


@register_model("resnet_family")
def resnet_family(
    input_shape, num_classes, *, width_0=16, width_1=32, width_2=64, depth_0=3, depth_1=3, depth_2=3, rngs
):
    """Searchable ResNet (BatchNorm): per-stage widths 8-16/16-32/32-64, depth 1..3 (see ``RESNET_FAMILY``)."""
    return ResNetFamily(
        input_shape, num_classes, widths=(width_0, width_1, width_2), depths=(depth_0, depth_1, depth_2), rngs=rngs
    )


# ----------------------------------------------------------------------------- MobileNetV2 family

#: (base output channels, maximum depth, first stride) per stage.
MOBILENET_STAGES = ((16, 2, 1), (24, 3, 2), (32, 3, 2))
MOBILENET_WIDTH_MULTS = (0.5, 0.75, 1.0)
MOBILENET_EXPANDS = (3, 4, 6)
MOBILENET_STEM = 16
MOBILENET_LAST = 64


def mobilenet_channels(base: int, mult: float) -> int:
    """Stage width: ``base * mult`` rounded to a multiple of 4 (at least 4)."""
    return max(4, int(round(base * mult / 4)) * 4)


class InvertedBlock(nnx.Module):
    """Inverted residual: 1x1 expand-BN-relu6, depthwise kxk-BN-relu6, 1x1 project-BN (+ input if ``residual``)."""

    def __init__(self, cin, cout, stride, expand, kernel, residual: bool, *, rngs: nnx.Rngs):
        hidden = cin * expand
        self.expand_conv, self.expand_bn = _conv(cin, hidden, 1, 1, 2, rngs), _bn(hidden, rngs)
        self.dw_conv, self.dw_bn = _conv(hidden, hidden, kernel, stride, 2, rngs, groups=hidden), _bn(hidden, rngs)
        self.project_conv, self.project_bn = _conv(hidden, cout, 1, 1, 2, rngs), _bn(cout, rngs)
        self.residual = residual

    def __call__(self, x, h=None, k=None, c=None):
        y = _mul(jax.nn.relu6(self.expand_bn(self.expand_conv(x))), h)
        y = _mul(jax.nn.relu6(self.dw_bn(masked_conv(self.dw_conv, y, k))), h)
        y = _mul(self.project_bn(self.project_conv(y)), c)
        return x + y if self.residual else y


class MobileNetFamily(nnx.Module):
    """MobileNetV2-style net: stem, three stages of inverted residuals, 1x1 conv to 64, pooled linear head.

    Per stage: width multiplier (0.5/0.75/1.0 of 16/24/32 channels), expansion ratio (3/4/6),
    depthwise kernel (3/5) and depth (1..2 or 1..3). The first block of a stage has no residual.

    References:
      Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", https://arxiv.org/abs/1801.04381
    """

    family_name = "mobilenet_family"

    def __init__(self, input_shape, num_classes, *, mults, expands, kernels, depths, rngs: nnx.Rngs):
        self.input_shape = tuple(input_shape)
        self.mults, self.expands = tuple(mults), tuple(expands)
        self.kernels, self.depths = tuple(kernels), tuple(depths)
        cin = _image_channels(input_shape)
        self.stem_conv, self.stem_bn = _conv(cin, MOBILENET_STEM, 3, 1, 2, rngs), _bn(MOBILENET_STEM, rngs)
        cin = MOBILENET_STEM
        stages = []
        for (base, _, stride), m, e, k, d in zip(MOBILENET_STAGES, mults, expands, kernels, depths, strict=True):
            w = mobilenet_channels(base, m)
            blocks = []
            for i in range(d):
                blocks.append(InvertedBlock(cin, w, stride if i == 0 else 1, e, k, i > 0, rngs=rngs))
                cin = w
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.last_conv, self.last_bn = _conv(cin, MOBILENET_LAST, 1, 1, 2, rngs), _bn(MOBILENET_LAST, rngs)
        self.head = nnx.Linear(MOBILENET_LAST, num_classes, rngs=rngs)

    def arch_masks(self, options: Mapping[str, Any]) -> Masks:
        """Masks selecting the sub-network ``options`` (this model must be the family's largest)."""
        o = MOBILENET_FAMILY.canonical(options)
        out = {}
        cin, cin_max = MOBILENET_STEM, MOBILENET_STEM
        for s, ((base, _, _), m, e, k, d) in enumerate(
            zip(MOBILENET_STAGES, self.mults, self.expands, self.kernels, self.depths, strict=True)
        ):
            w, w_max = mobilenet_channels(base, o[f"width_{s}"]), mobilenet_channels(base, m)
            out[f"c{s}"] = prefix_mask(w, w_max)
            out[f"g{s}"] = prefix_mask(o[f"depth_{s}"], d)
            out[f"k{s}"] = centre_mask(o[f"kernel_{s}"], k)
            # hidden channels of the first block (its input comes from the previous stage) and of the others
            out[f"h{s}_first"] = prefix_mask(cin * o[f"expand_{s}"], cin_max * e)
            out[f"h{s}_rest"] = prefix_mask(w * o[f"expand_{s}"], w_max * e)
            cin, cin_max = w, w_max
        return out

    def __call__(self, x: jax.Array, masks: Masks | None = None) -> jax.Array:
        x = _image(x, self.input_shape)
        x = jax.nn.relu6(self.stem_bn(self.stem_conv(x)))
        for s, blocks in enumerate(self.stages):
            c, g, k = _get(masks, f"c{s}"), _get(masks, f"g{s}"), _get(masks, f"k{s}")
            for i, block in enumerate(blocks):
                y = block(x, _get(masks, f"h{s}_first" if i == 0 else f"h{s}_rest"), k, c)
                x = y if i == 0 else _gate(y, x, None if g is None else g[i])
        x = jax.nn.relu6(self.last_bn(self.last_conv(x)))
        return self.head(jnp.mean(x, axis=(1, 2)))


MOBILENET_FAMILY = register_family(
    Family(
        name="mobilenet_family",
        choices={
            **{f"width_{s}": MOBILENET_WIDTH_MULTS for s in range(3)},
            **{f"expand_{s}": MOBILENET_EXPANDS for s in range(3)},
            **{f"kernel_{s}": KERNELS for s in range(3)},
            **{f"depth_{s}": tuple(range(1, MOBILENET_STAGES[s][1] + 1)) for s in range(3)},
        },
    )
)


@register_model("mobilenet_family")
def mobilenet_family(
    input_shape,
    num_classes,
    *,
    width_0=1.0,
    width_1=1.0,
    width_2=1.0,
    expand_0=6,
    expand_1=6,
    expand_2=6,
    kernel_0=5,
    kernel_1=5,
    kernel_2=5,
    depth_0=2,
    depth_1=3,
    depth_2=3,
    rngs,
):
    """Searchable MobileNetV2-style net (BatchNorm, depthwise): see ``MOBILENET_FAMILY`` for the choices."""
    return MobileNetFamily(
        input_shape,
        num_classes,
        mults=(width_0, width_1, width_2),
        expands=(expand_0, expand_1, expand_2),
        kernels=(kernel_0, kernel_1, kernel_2),
        depths=(depth_0, depth_1, depth_2),
        rngs=rngs,
    )


#: Family masks from a supernet, for code that holds only the model: ``family_masks(model, options)``.
def family_masks(model: nnx.Module, options: Mapping[str, Any]) -> Masks:
    """``model.arch_masks(options)``, with an error naming the fix for a model that is not a family's."""
    fn: Callable[[Mapping[str, Any]], Masks] | None = getattr(model, "arch_masks", None)
    if fn is None or getattr(model, "family_name", None) not in FAMILIES:
        raise TypeError(
            f"{type(model).__name__} is not a searchable family model; build one of {list_families()} "
            "at its largest options (Family.largest()) to use it as a supernet"
        )
    return fn(options)
