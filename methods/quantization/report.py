"""Export-ready quantization parameters, per-layer tables and model size at the chosen bits.

:func:`quant_params` returns plain Python/numpy data (no NNX objects), version ``1``::

    {
      "version": 1,
      "layers": {
        "<module path>": {                      # e.g. "blocks/0/conv1"
          "type": "conv" | "linear",
          "kernel_path": "<path>/layer/kernel",  # parameter path (research.tree style)
          "bias_path": "<path>/layer/bias" | None,
          "kernel_shape": (kh, kw, cin/groups, cout) | (in, out),
          "feature_group_count": int,            # 1 for Linear
          "weight": QPARAMS | None,              # None: kernel kept in float
          "input": QPARAMS | None,               # None: inputs kept in float
          "kernel_int": int8/uint8 array         # only with integer_weights=True
        }, ...
      },
      "float_layers": ["<module path>", ...],    # Linear/Conv layers left in float
    }

    QPARAMS = {
      "bits": int, "signed": bool, "symmetric": bool, "narrow_range": bool,
      "qmin": int, "qmax": int,
      "scale": float32 array, shape () or (C,),
      "zero_point": int32 array, same shape,
      "axis": int | None,      # per-channel axis of the quantized tensor (non-negative), None per tensor
      "method": "ste" | "lsq" | "pact",
    }

Real value ``r`` and integer ``q`` relate by ``r = (q - zero_point) * scale`` (per channel
along ``axis``), exactly as in TFLite and ONNX ``QuantizeLinear``/``DequantizeLinear``; the
kernel's per-channel axis is its last (output-channel) axis. Biases stay float; a runtime that
wants int32 biases uses ``scale_bias = scale_input * scale_weight``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from methods.quantization import quantizers as Q
from methods.quantization.modules import FakeQuant
from methods.quantization.modules import QuantConv
from methods.quantization.modules import QuantLayer
from methods.quantization.surgery import float_layers
from research.metrics import bitmask_bytes
from research.nn import get_module
from research.nn import iter_modules

FORMAT_VERSION = 1


def _qparams(fq: FakeQuant) -> dict[str, Any]:
    scale, zp = fq.scale_zero_point()
    qmin, qmax = fq.spec.grid(fq.signed)
    return {
        "bits": fq.spec.bits,
        "signed": bool(fq.signed),
        "symmetric": bool(fq.spec.symmetric),
        "narrow_range": bool(fq.spec.narrow_range),
        "qmin": qmin,
        "qmax": qmax,
        "scale": np.asarray(scale, np.float32),
        "zero_point": np.asarray(zp).astype(np.int32),
        "axis": fq.axis,
        "method": fq.spec.method,
    }


def quant_layers(model: nnx.Module) -> list[tuple[str, QuantLayer]]:
    """The ``(path, QuantLayer)`` pairs of a model."""
    return [(p, m) for p, m in iter_modules(model) if isinstance(m, QuantLayer)]


def quant_params(model: nnx.Module, *, integer_weights: bool = False) -> dict[str, Any]:
    """Per-layer quantization parameters in the documented plain-dict form (see module doc).

    Args:
      model: a calibrated or trained fake-quant model.
      integer_weights: also include each quantized kernel as integers (``"kernel_int"``).

    Returns:
      ``{"version": 1, "layers": {...}, "float_layers": [...]}``.
    """
    layers = {}
    for path, ql in quant_layers(model):
        kernel = np.asarray(ql.layer.kernel[...])
        entry: dict[str, Any] = {
            "type": "conv" if isinstance(ql, QuantConv) else "linear",
            "kernel_path": f"{path}/layer/kernel",
            "bias_path": f"{path}/layer/bias" if ql.layer.bias is not None else None,
            "kernel_shape": tuple(kernel.shape),
            "feature_group_count": int(getattr(ql.layer, "feature_group_count", 1)),
            "weight": _qparams(ql.weight_quant) if ql.weight_quant is not None else None,
            "input": _qparams(ql.input_quant) if ql.input_quant is not None and ql.input_quant.calibrated else None,
        }
        if integer_weights and entry["weight"] is not None:
            w = entry["weight"]
            q = Q.quantize(
                kernel,
                w["scale"],
                w["zero_point"],
                w["bits"],
                signed=w["signed"],
                narrow_range=w["narrow_range"],
                axis=w["axis"],
            )
            entry["kernel_int"] = np.asarray(q).astype(np.int8 if w["signed"] else np.uint8)
        layers[path] = entry
    return {"version": FORMAT_VERSION, "layers": layers, "float_layers": float_layers(model)}


def _n(x) -> int:
    return int(np.prod(np.shape(x)))


def _kernel_bitmask_bytes(kernel, bits: int) -> float:
    """Bytes of a kernel at ``bits``: dense, or a bitmask plus the non-zeros when smaller."""
    k = np.asarray(kernel)
    return min(k.size * bits / 8, bitmask_bytes(k, bits))


def layer_table(model: nnx.Module) -> list[dict[str, Any]]:
    """One row per Linear/Conv layer (quantized or float), in path order.

    Columns: ``path``, ``type``, ``weight_bits`` (32 for float), ``act_bits`` (32 for float
    inputs), ``method``, ``per_channel``, ``params`` (kernel + bias), ``bytes`` (kernel at its
    bits, bias and quantization parameters at 32 bits), ``bitmask_bytes`` (as ``bytes``, with a
    pruned kernel stored as one bit per entry plus its non-zero values at their bits, when that
    is smaller).
    """
    rows = []
    for path, ql in quant_layers(model):
        wq, iq = ql.weight_quant, ql.input_quant
        k = _n(ql.layer.kernel[...])
        b = _n(ql.layer.bias[...]) if ql.layer.bias is not None else 0
        wbits = wq.spec.bits if wq is not None else 32
        nq = (_n(wq.lo[...]) if wq is not None else 0) + (1 if iq is not None else 0)
        rest = 4 * b + 8 * nq
        rows.append(
            {
                "path": path,
                "type": type(ql.layer).__name__,
                "weight_bits": wbits,
                "act_bits": iq.spec.bits if iq is not None else 32,
                "method": wq.spec.method if wq is not None else "-",
                "per_channel": bool(wq is not None and wq.spec.per_channel),
                "params": k + b,
                "bytes": k * wbits / 8 + rest,
                "bitmask_bytes": _kernel_bitmask_bytes(ql.layer.kernel[...], wbits) + rest,
            }
        )
    for path in float_layers(model):
        layer = get_module(model, path)
        k = _n(layer.kernel[...])
        b = _n(layer.bias[...]) if layer.bias is not None else 0
        rows.append(
            {
                "path": path,
                "type": type(layer).__name__,
                "weight_bits": 32,
                "act_bits": 32,
                "method": "float",
                "per_channel": False,
                "params": k + b,
                "bytes": 4.0 * (k + b),
                "bitmask_bytes": _kernel_bitmask_bytes(layer.kernel[...], 32) + 4.0 * b,
            }
        )
    return sorted(rows, key=lambda r: r["path"])


def quantized_bytes(model: nnx.Module, *, bitmask: bool = False) -> float:
    """Model size with quantized kernels at their bit widths.

    Quantized kernels count ``bits / 8`` bytes per value; each scale/zero-point pair 8 bytes;
    every other parameter (biases, float layers, BatchNorm affine) 4 bytes. LSQ steps and PACT
    clipping values are the scales, so they are not counted twice. BatchNorm statistics and
    observed ranges are not parameters and are not counted.

    Args:
      model: a model with fake-quant layers.
      bitmask: store each pruned kernel (float zeros) as one bit per entry plus its non-zero
        values at their bit width, where that is smaller than dense: the size of a pruned and
        quantized model.
    """
    total = sum(r["bitmask_bytes" if bitmask else "bytes"] for r in layer_table(model))
    covered = set()
    for path, _ in quant_layers(model):
        covered.add(path)
    for path in float_layers(model):
        covered.add(path)
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for key, value in params:
        path = "/".join(str(k) for k in key)
        if any(path.startswith(c + "/") for c in covered):
            continue
        total += 4 * _n(value[...] if hasattr(value, "shape") else value)
    return float(total)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of :func:`layer_table` rows."""
    if not rows:
        return "(no layers)"
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(f"{c:<{widths[c]}}" for c in cols)]
    lines += ["  ".join(f"{_fmt(r[c]):<{widths[c]}}" for c in cols) for r in rows]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.0f}" if isinstance(v, float) else str(v)
