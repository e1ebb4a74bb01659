"""Factorized NNX layers: low-rank linear, CP convolution, Tucker-2 convolution.

Each layer is a small chain of ordinary ``nnx.Linear`` / ``nnx.Conv`` sub-modules, so every
other slimjax method (pruning, quantization, distillation) sees plain layers inside it, and
each can be built from a trained dense layer (``from_dense``) with the kernel decompositions
of :mod:`methods.decomposition.decompose`. Strides, padding, dilation, bias and dtypes of the
dense layer are preserved: at full rank the factorized layer computes the same function.

Kernels follow NNX's layout: ``Linear`` kernels are ``(in, out)``; ``Conv`` kernels are
``(*spatial, in, out)`` (HWIO for 2-D).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from methods.decomposition.decompose import cp_factors
from methods.decomposition.decompose import cp_max_rank
from methods.decomposition.decompose import svd_factors
from methods.decomposition.decompose import tucker2_factors


def conv_padding_per_axis(padding: Any, ndim: int) -> list[Any]:
    """Splits an ``nnx.Conv`` padding spec into one entry per spatial axis.

    Strings (``"SAME"``, ``"VALID"``, ``"CIRCULAR"``, ``"REFLECT"``) apply per axis unchanged;
    an int ``p`` becomes ``(p, p)``; a sequence gives one int or pair per axis.

    Raises:
      ValueError: ``"CAUSAL"`` padding or a sequence whose length is not ``ndim``.
    """
    if isinstance(padding, str):
        if padding.upper() == "CAUSAL":
            raise ValueError("padding='CAUSAL' (1-D only) cannot be split across factor convolutions")
        return [padding.upper()] * ndim
    if isinstance(padding, int):
        return [(padding, padding)] * ndim
    padding = list(padding)
    if len(padding) != ndim:
        raise ValueError(f"padding={padding} has {len(padding)} entries for {ndim} spatial axes")
    return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def _per_axis(value: Any, ndim: int) -> tuple[int, ...]:
    if value is None:
        return (1,) * ndim
    if isinstance(value, int):
        return (value,) * ndim
    value = tuple(value)
    if len(value) == 1:
        return value * ndim
    return value


def _axis_padding(pads: list[Any], axis: int) -> Any:
    """Padding for a factor conv whose kernel is 1 everywhere except ``axis``."""
    if isinstance(pads[axis], str):
        return pads[axis]  # a 1-wide kernel gets no padding from SAME/CIRCULAR/REFLECT rules
    return tuple(pads[a] if a == axis else (0, 0) for a in range(len(pads)))


def _assign(var: nnx.Variable, value: Any, shape: Sequence[int], dtype: Any) -> None:
    """Sets a parameter of an abstract (``nnx.eval_shape``) module to a concrete array."""
    # Converted on the host and put on the device: no compiled conversion program per shape.
    host = np.reshape(np.asarray(value), tuple(shape)).astype(jax.dtypes.canonicalize_dtype(dtype))
    var.value = jax.device_put(host)


def _np(var: nnx.Variable) -> np.ndarray:
    return np.asarray(var.value, np.float64)


def _conv_like(dense: nnx.Conv) -> dict[str, Any]:
    return {"dtype": dense.dtype, "param_dtype": dense.param_dtype, "precision": dense.precision}


def _conv_shell(cls, dense: nnx.Conv, rank) -> nnx.Module:
    """A factorized conv of ``cls`` with ``dense``'s geometry, built from shapes only."""
    return nnx.eval_shape(  # structure only; the caller sets every parameter
        lambda: cls(
            dense.in_features,
            dense.out_features,
            dense.kernel_size,
            rank,
            strides=dense.strides,
            padding=dense.padding,
            kernel_dilation=dense.kernel_dilation,
            use_bias=dense.use_bias,
            **_conv_like(dense),
            rngs=nnx.Rngs(0),
        )
    )


class LowRankLinear(nnx.Module):
    """``y = (x @ U) @ V + b`` with ``U: (in, rank)`` and ``V: (rank, out)``.

    Built from a trained ``nnx.Linear`` with a truncated SVD ``W ~ (U sqrt(S)) (sqrt(S) V^T)``
    (Xue et al. 2013); at ``rank = min(in, out)`` it equals the dense layer.

    Attributes:
      first: ``nnx.Linear(in, rank, use_bias=False)``.
      second: ``nnx.Linear(rank, out)`` carrying the dense layer's bias.

    Example:
      >>> from flax import nnx
      >>> dense = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
      >>> low = LowRankLinear.from_dense(dense, rank=8)
      >>> x = jnp.ones((2, 16))
      >>> bool(jnp.allclose(low(x), dense(x), atol=1e-4))
      True

    References:
      Xue, Li, Gong, "Restructuring of deep neural network acoustic models with singular value
      decomposition", Interspeech 2013.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        rngs: nnx.Rngs,
    ):
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"rank={rank} is outside 1..{min(in_features, out_features)} for a "
                f"{in_features}x{out_features} linear layer; pass a rank in that range"
            )
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kw = {"dtype": dtype, "param_dtype": param_dtype, "precision": precision, "rngs": rngs}
        self.first = nnx.Linear(in_features, rank, use_bias=False, **kw)
        self.second = nnx.Linear(rank, out_features, use_bias=use_bias, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.second(self.first(x))

    def dense_kernel(self) -> np.ndarray:
        """The ``(in, out)`` kernel this layer represents (numpy, float64)."""
        return _np(self.first.kernel) @ _np(self.second.kernel)

    @classmethod
    def from_dense(cls, dense: nnx.Linear, rank: int, *, factors=None) -> LowRankLinear:
        """Builds the rank-``rank`` layer closest (Frobenius) to ``dense``.

        Args:
          dense: a trained ``nnx.Linear``.
          rank: the inner width, ``1..min(in, out)``.
          factors: precomputed ``(U, V)`` from :func:`~methods.decomposition.decompose.svd_factors`.

        Raises:
          ValueError: ``rank`` is outside ``1..min(in, out)``.
        """
        layer = nnx.eval_shape(  # structure only; every parameter is set below
            lambda: cls(
                dense.in_features,
                dense.out_features,
                rank,
                use_bias=dense.use_bias,
                dtype=dense.dtype,
                param_dtype=dense.param_dtype,
                precision=dense.precision,
                rngs=nnx.Rngs(0),
            )
        )
        u, v = factors if factors is not None else svd_factors(np.asarray(dense.kernel[...]), rank)
        dt = dense.param_dtype
        _assign(layer.first.kernel, u, (dense.in_features, rank), dt)
        _assign(layer.second.kernel, v, (rank, dense.out_features), dt)
        if dense.use_bias:
            _assign(layer.second.bias, dense.bias[...], (dense.out_features,), dt)
        return layer


class LowRankLinearGeneral(nnx.Module):
    """Low-rank form of an ``nnx.LinearGeneral`` (attention projections): two LinearGeneral layers.

    The kernel ``(*in_features, *out_features)`` is read as the matrix ``(prod(in), prod(out))``
    and split by a truncated SVD: ``first`` contracts the input axes to ``rank`` features,
    ``second`` expands them to ``out_features`` (``(heads, head_dim)`` for a query/key/value
    projection) and carries the bias. At full rank it equals the dense layer.

    Attributes:
      first: ``nnx.LinearGeneral(in_features, (rank,), axis=axis, use_bias=False)``.
      second: ``nnx.LinearGeneral((rank,), out_features)``.

    Example:
      >>> from flax import nnx
      >>> dense = nnx.LinearGeneral(8, (2, 4), rngs=nnx.Rngs(0))
      >>> low = LowRankLinearGeneral.from_dense(dense, rank=8)
      >>> x = jnp.ones((2, 3, 8))
      >>> bool(jnp.allclose(low(x), dense(x), atol=1e-4))
      True
    """

    def __init__(
        self,
        in_features: Sequence[int],
        out_features: Sequence[int],
        rank: int,
        *,
        axis: Sequence[int] = (-1,),
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        rngs: nnx.Rngs,
    ):
        n_in, n_out = math.prod(in_features), math.prod(out_features)
        if not 1 <= rank <= min(n_in, n_out):
            raise ValueError(
                f"rank={rank} is outside 1..{min(n_in, n_out)} for a LinearGeneral {tuple(in_features)} -> "
                f"{tuple(out_features)}; pass a rank in that range"
            )
        self.in_features, self.out_features, self.rank = tuple(in_features), tuple(out_features), rank
        kw = {"dtype": dtype, "param_dtype": param_dtype, "precision": precision, "rngs": rngs}
        self.first = nnx.LinearGeneral(self.in_features, (rank,), axis=tuple(axis), use_bias=False, **kw)
        self.second = nnx.LinearGeneral((rank,), self.out_features, use_bias=use_bias, **kw)

    def __call__(self, x: jax.Array, out_sharding: Any = None) -> jax.Array:
        return self.second(self.first(x), out_sharding=out_sharding)

    def dense_kernel(self) -> np.ndarray:
        """The ``(prod(in), prod(out))`` matrix this layer represents (numpy, float64)."""
        u = _np(self.first.kernel).reshape(-1, self.rank)
        return u @ _np(self.second.kernel).reshape(self.rank, -1)

    @classmethod
    def from_dense(cls, dense: nnx.LinearGeneral, rank: int, *, factors=None) -> LowRankLinearGeneral:
        """Builds the rank-``rank`` layer closest (Frobenius) to ``dense``.

        Args:
          dense: a trained ``nnx.LinearGeneral`` without ``batch_axis``.
          rank: the inner width, ``1..min(prod(in), prod(out))``.
          factors: precomputed ``(U, V)`` of the kernel read as a matrix.

        Raises:
          ValueError: ``dense`` has batch axes, or ``rank`` is out of range.
        """
        if dense.batch_axis:
            raise ValueError(
                f"LinearGeneral with batch_axis={dict(dense.batch_axis)} holds one kernel per batch entry; "
                "it has no single low-rank form: skip it with DecompositionRule(pattern=..., skip=True)"
            )
        layer = nnx.eval_shape(
            lambda: cls(
                dense.in_features,
                dense.out_features,
                rank,
                axis=dense.axis,
                use_bias=dense.use_bias,
                dtype=dense.dtype,
                param_dtype=dense.param_dtype,
                precision=dense.precision,
                rngs=nnx.Rngs(0),
            )
        )
        n_in = math.prod(dense.in_features)
        matrix = np.asarray(dense.kernel[...]).reshape(n_in, -1)
        u, v = factors if factors is not None else svd_factors(matrix, rank)
        dt = dense.param_dtype
        _assign(layer.first.kernel, np.reshape(u, (*dense.in_features, rank)), (*dense.in_features, rank), dt)
        _assign(layer.second.kernel, np.reshape(v, (rank, *dense.out_features)), (rank, *dense.out_features), dt)
        if dense.use_bias:
            _assign(layer.second.bias, dense.bias[...], tuple(dense.out_features), dt)
        return layer


class Tucker2Conv(nnx.Module):
    """Tucker-2 convolution: 1x1 reduce ``cin -> r_in``, k x k core ``r_in -> r_out``, 1x1 expand.

    A ``(*k, cin, cout)`` kernel ``K = G x_cin U_in x_cout U_out`` (partial Tucker over the two
    channel modes) becomes three convolutions; the core keeps the dense layer's stride, padding
    and dilation and the expansion carries its bias. At ``ranks = (cin, cout)`` it is exact.

    Attributes:
      reduce: 1x1 ``nnx.Conv(cin, r_in, use_bias=False)`` with kernel ``U_in``.
      core: ``nnx.Conv(r_in, r_out, kernel_size, strides, padding, kernel_dilation)`` with kernel ``G``.
      expand: 1x1 ``nnx.Conv(r_out, cout)`` with kernel ``U_out^T`` and the dense bias.

    References:
      Kim et al., "Compression of Deep Convolutional Neural Networks for Fast and Low Power
      Mobile Applications", https://arxiv.org/abs/1511.06530
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: Sequence[int],
        ranks: tuple[int, int],
        *,
        strides: Any = 1,
        padding: Any = "SAME",
        kernel_dilation: Any = 1,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        rngs: nnx.Rngs,
    ):
        r_in, r_out = (int(r) for r in ranks)
        if not (1 <= r_in <= in_features and 1 <= r_out <= out_features):
            raise ValueError(
                f"ranks={tuple(ranks)} are outside 1..{in_features} (input) and 1..{out_features} "
                "(output) for this convolution; pass ranks within the channel counts"
            )
        kernel_size = tuple(kernel_size)
        nd = len(kernel_size)
        self.in_features, self.out_features, self.kernel_size = (
            in_features,
            out_features,
            kernel_size,
        )
        self.ranks = (r_in, r_out)
        kw = {"dtype": dtype, "param_dtype": param_dtype, "precision": precision, "rngs": rngs}
        self.reduce = nnx.Conv(in_features, r_in, (1,) * nd, padding="VALID", use_bias=False, **kw)
        self.core = nnx.Conv(
            r_in,
            r_out,
            kernel_size,
            strides=strides,
            padding=padding,
            kernel_dilation=kernel_dilation,
            use_bias=False,
            **kw,
        )
        self.expand = nnx.Conv(r_out, out_features, (1,) * nd, padding="VALID", use_bias=use_bias, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.expand(self.core(self.reduce(x)))

    def dense_kernel(self) -> np.ndarray:
        """The ``(*k, cin, cout)`` kernel this layer represents (numpy, float64)."""
        u_in = _np(self.reduce.kernel).reshape(self.in_features, self.ranks[0])
        u_out_t = _np(self.expand.kernel).reshape(self.ranks[1], self.out_features)
        return np.einsum("...ab,sa,bt->...st", _np(self.core.kernel), u_in, u_out_t)

    @classmethod
    def from_dense(cls, dense: nnx.Conv, ranks: tuple[int, int], *, factors=None, **decompose_kwargs) -> Tucker2Conv:
        """Builds the Tucker-2 layer from a trained ``nnx.Conv`` (tensorly ``partial_tucker``).

        Args:
          dense: a trained convolution with ``feature_group_count == 1``.
          ranks: ``(r_in, r_out)``.
          factors: precomputed ``(core, u_in, u_out)`` from
            :func:`~methods.decomposition.decompose.tucker2_factors`.
          **decompose_kwargs: passed to ``tucker2_factors`` (``n_iter_max``, ``tol``).

        Raises:
          ValueError: grouped/depthwise or input-dilated convolutions, ranks out of range.
        """
        check_factorizable_conv(dense)
        nd = len(dense.kernel_size)
        layer = _conv_shell(cls, dense, ranks)  # every parameter is set below
        if factors is None:
            factors = tucker2_factors(np.asarray(dense.kernel[...]), ranks, **decompose_kwargs)
        core, u_in, u_out = factors
        dt = dense.param_dtype
        _assign(layer.reduce.kernel, u_in, (1,) * nd + u_in.shape, dt)
        _assign(layer.core.kernel, core, core.shape, dt)
        _assign(layer.expand.kernel, u_out.T, (1,) * nd + u_out.T.shape, dt)
        if dense.use_bias:
            _assign(layer.expand.bias, dense.bias[...], (dense.out_features,), dt)
        return layer


class CPConv(nnx.Module):
    """CP convolution: 1x1 ``cin -> R``, one depthwise conv per spatial axis, 1x1 ``R -> cout``.

    A rank-``R`` CP kernel ``K[i, j, s, t] = sum_r Kx[i, r] Ky[j, r] Ks[s, r] Kt[t, r]`` is applied
    as a 1x1 projection, depthwise ``kh x 1`` and ``1 x kw`` convolutions (stride, padding and
    dilation split per axis) and a 1x1 expansion carrying the bias (Lebedev et al. 2015).

    Attributes:
      reduce: 1x1 ``nnx.Conv(cin, R, use_bias=False)``.
      spatial: one depthwise ``nnx.Conv(R, R, feature_group_count=R)`` per spatial axis.
      expand: 1x1 ``nnx.Conv(R, cout)``.

    References:
      Lebedev et al., "Speeding-up Convolutional Neural Networks Using Fine-tuned
      CP-Decomposition", https://arxiv.org/abs/1412.6553
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: Sequence[int],
        rank: int,
        *,
        strides: Any = 1,
        padding: Any = "SAME",
        kernel_dilation: Any = 1,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        rngs: nnx.Rngs,
    ):
        kernel_size = tuple(kernel_size)
        bound = cp_max_rank((*kernel_size, in_features, out_features))
        if not 1 <= rank <= bound:
            raise ValueError(
                f"rank={rank} is outside 1..{bound} for a CP convolution of kernel "
                f"{(*kernel_size, in_features, out_features)} (the bound is the product of all "
                "kernel dimensions but the largest); pass a smaller rank"
            )
        nd = len(kernel_size)
        self.in_features, self.out_features, self.kernel_size, self.rank = (
            in_features,
            out_features,
            kernel_size,
            rank,
        )
        strides, dilation = _per_axis(strides, nd), _per_axis(kernel_dilation, nd)
        pads = conv_padding_per_axis(padding, nd)
        kw = {"dtype": dtype, "param_dtype": param_dtype, "precision": precision, "rngs": rngs}
        self.reduce = nnx.Conv(in_features, rank, (1,) * nd, padding="VALID", use_bias=False, **kw)
        spatial = []
        for a in range(nd):
            one_hot = lambda v, a=a: tuple(v if b == a else 1 for b in range(nd))  # noqa: E731
            spatial.append(
                nnx.Conv(
                    rank,
                    rank,
                    one_hot(kernel_size[a]),
                    strides=one_hot(strides[a]),
                    padding=_axis_padding(pads, a),
                    kernel_dilation=one_hot(dilation[a]),
                    feature_group_count=rank,
                    use_bias=False,
                    **kw,
                )
            )
        self.spatial = nnx.List(spatial)
        self.expand = nnx.Conv(rank, out_features, (1,) * nd, padding="VALID", use_bias=use_bias, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.reduce(x)
        for conv in self.spatial:
            x = conv(x)
        return self.expand(x)

    def factors(self) -> list[np.ndarray]:
        """The CP factors ``[K_axis0 (k0, R), ..., K_in (cin, R), K_out (cout, R)]`` (numpy)."""
        out = [_np(conv.kernel).reshape(self.kernel_size[a], self.rank) for a, conv in enumerate(self.spatial)]
        out.append(_np(self.reduce.kernel).reshape(self.in_features, self.rank))
        out.append(_np(self.expand.kernel).reshape(self.rank, self.out_features).T)
        return out

    def dense_kernel(self) -> np.ndarray:
        """The ``(*k, cin, cout)`` kernel this layer represents (numpy, float64)."""
        fs = self.factors()
        letters = "abcdefgh"[: len(fs)]
        return np.einsum(",".join(f"{c}r" for c in letters) + "->" + letters, *fs)

    @classmethod
    def from_dense(cls, dense: nnx.Conv, rank: int, *, factors=None, **decompose_kwargs) -> CPConv:
        """Builds the CP layer from a trained ``nnx.Conv`` (tensorly ``parafac``).

        Args:
          dense: a trained convolution with ``feature_group_count == 1``.
          rank: the CP rank ``R``.
          factors: precomputed factors from :func:`~methods.decomposition.decompose.cp_factors`.
          **decompose_kwargs: passed to ``cp_factors`` (``n_iter_max``, ``init``, ``random_state``,
            ``balance``: equal factor column norms per component, the default).

        Raises:
          ValueError: grouped/depthwise or input-dilated convolutions, rank out of range.
        """
        check_factorizable_conv(dense)
        nd = len(dense.kernel_size)
        layer = _conv_shell(cls, dense, rank)  # every parameter is set below
        if factors is None:
            factors = cp_factors(np.asarray(dense.kernel[...]), rank, **decompose_kwargs)
        dt = dense.param_dtype
        for a, conv in enumerate(layer.spatial):
            _assign(conv.kernel, factors[a], conv.kernel.value.shape, dt)
        _assign(layer.reduce.kernel, factors[nd], (1,) * nd + factors[nd].shape, dt)
        k_out_t = np.asarray(factors[nd + 1]).T
        _assign(layer.expand.kernel, k_out_t, (1,) * nd + k_out_t.shape, dt)
        if dense.use_bias:
            _assign(layer.expand.bias, dense.bias[...], (dense.out_features,), dt)
        return layer


def check_factorizable_conv(conv: nnx.Conv) -> None:
    """Raises ``ValueError`` when ``conv`` cannot be Tucker-2/CP factorized as a whole.

    Grouped and depthwise convolutions have a block-diagonal channel structure that a single
    channel factorization does not represent; input dilation and masks are not carried over.
    """
    if conv.feature_group_count != 1:
        raise ValueError(
            f"feature_group_count={conv.feature_group_count}: grouped/depthwise convolutions have "
            "no full channel-by-channel kernel to factorize; leave this layer dense (rule skip=True)"
        )
    if any(d != 1 for d in _per_axis(conv.input_dilation, len(conv.kernel_size))):
        raise ValueError(f"input_dilation={conv.input_dilation} is not supported; leave this layer dense")
    if conv.mask is not None:
        raise ValueError("masked convolutions (mask=...) are not supported; leave this layer dense")
    if isinstance(conv.padding, str) and conv.padding.upper() == "CAUSAL":
        raise ValueError("padding='CAUSAL' is not supported; leave this layer dense")


# ----------------------------------------------------------------------------- resizing (populations)
# Trials whose factorized layers differ only in rank train as one population program, each padded
# with zero components to the largest rank (research.population.padding: zero components of a
# product of factors have zero gradients, so they stay zero). Each sub-layer is rebuilt with new
# feature counts and every other option of the old one.


def _plain(layer: nnx.Module, cls: type) -> None:
    """Only plain sub-layers are rebuilt: a wrapped one (a fake-quant twin) would lose its wrapper,
    and its quantization range would see the padding (such trials train alone)."""
    if type(layer) is not cls:
        raise TypeError(f"a factorized layer holds a {type(layer).__name__}, not an {cls.__name__}: not resizable")


def _linear_with(lin: nnx.Linear, in_features: int, out_features: int) -> nnx.Linear:
    _plain(lin, nnx.Linear)
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=lin.use_bias,
        dtype=lin.dtype,
        param_dtype=lin.param_dtype,
        precision=lin.precision,
        dot_general=lin.dot_general,
        promote_dtype=lin.promote_dtype,
        preferred_element_type=lin.preferred_element_type,
        rngs=nnx.Rngs(0),
    )


def _linear_general_with(lin: nnx.LinearGeneral, in_features, out_features) -> nnx.LinearGeneral:
    _plain(lin, nnx.LinearGeneral)
    return nnx.LinearGeneral(
        tuple(in_features),
        tuple(out_features),
        axis=lin.axis,
        use_bias=lin.use_bias,
        dtype=lin.dtype,
        param_dtype=lin.param_dtype,
        precision=lin.precision,
        dot_general=lin.dot_general,
        dot_general_cls=lin.dot_general_cls,
        promote_dtype=lin.promote_dtype,
        preferred_element_type=lin.preferred_element_type,
        rngs=nnx.Rngs(0),
    )


def _conv_with(conv: nnx.Conv, in_features: int, out_features: int, groups: int = 1) -> nnx.Conv:
    _plain(conv, nnx.Conv)
    if conv.mask is not None:
        raise TypeError("a factorized layer holds a masked nnx.Conv: not resizable")
    return nnx.Conv(
        in_features,
        out_features,
        conv.kernel_size,
        strides=conv.strides,
        padding=conv.padding,
        input_dilation=conv.input_dilation,
        kernel_dilation=conv.kernel_dilation,
        feature_group_count=groups,
        use_bias=conv.use_bias,
        dtype=conv.dtype,
        param_dtype=conv.param_dtype,
        precision=conv.precision,
        conv_general_dilated=conv.conv_general_dilated,
        promote_dtype=conv.promote_dtype,
        preferred_element_type=conv.preferred_element_type,
        rngs=nnx.Rngs(0),
    )


def _low_rank_resized(layer: LowRankLinear, sizes: tuple[int, ...]) -> LowRankLinear:
    (rank,) = sizes
    new = nnx.clone(layer)
    new.rank = rank
    new.first = _linear_with(layer.first, layer.in_features, rank)
    new.second = _linear_with(layer.second, rank, layer.out_features)
    return new


def _low_rank_general_resized(layer: LowRankLinearGeneral, sizes: tuple[int, ...]) -> LowRankLinearGeneral:
    (rank,) = sizes
    new = nnx.clone(layer)
    new.rank = rank
    new.first = _linear_general_with(layer.first, layer.in_features, (rank,))
    new.second = _linear_general_with(layer.second, (rank,), layer.out_features)
    return new


def _tucker2_resized(layer: Tucker2Conv, sizes: tuple[int, ...]) -> Tucker2Conv:
    r_in, r_out = sizes
    new = nnx.clone(layer)
    new.ranks = (r_in, r_out)
    new.reduce = _conv_with(layer.reduce, layer.in_features, r_in)
    new.core = _conv_with(layer.core, r_in, r_out)
    new.expand = _conv_with(layer.expand, r_out, layer.out_features)
    return new


def _cp_resized(layer: CPConv, sizes: tuple[int, ...]) -> CPConv:
    (rank,) = sizes
    new = nnx.clone(layer)
    new.rank = rank
    new.reduce = _conv_with(layer.reduce, layer.in_features, rank)
    new.spatial = nnx.List([_conv_with(conv, rank, rank, groups=rank) for conv in layer.spatial])
    new.expand = _conv_with(layer.expand, rank, layer.out_features)
    return new


def _register_resizable() -> None:
    from research.population.padding import register_resizable  # pylint: disable=import-outside-toplevel

    register_resizable(LowRankLinear, sizes=lambda m: (m.rank,), resized=_low_rank_resized)
    register_resizable(LowRankLinearGeneral, sizes=lambda m: (m.rank,), resized=_low_rank_general_resized)
    register_resizable(Tucker2Conv, sizes=lambda m: tuple(m.ranks), resized=_tucker2_resized)
    register_resizable(CPConv, sizes=lambda m: (m.rank,), resized=_cp_resized)


_register_resizable()
