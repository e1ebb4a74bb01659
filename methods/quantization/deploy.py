"""Deploying what was trained: a fake-quant model as a float model TFLite's int8 converter takes.

A model after :func:`~methods.quantization.quantize_model` + calibration (PTQ) or QAT computes
with fake-quant layers: rounding in float. TFLite converts that graph in float32, but its int8
converter cannot re-quantize it (the rounding ops break its zero-point rules). :func:`deployable`
returns what the converter needs instead:

* a **float model** in which every :class:`~methods.quantization.QuantLayer` is replaced by a
  :class:`DeployedLayer`: the wrapped Linear/Conv with the *fake-quantized kernel baked in*
  (dequantized values, so the weights are the trained grid points) behind a ``lax.clamp`` of
  its input to the input quantizer's *representable range* ``[(qmin - zp) * scale,
  (qmax - zp) * scale]``; a stand-alone activation :class:`~methods.quantization.FakeQuant`
  becomes a :class:`DeployedClip`. TFLite's int8 calibration (min/max per tensor) on the
  clipped tensor then recovers the trained range whenever the calibration data reaches it (it
  does for PTQ ranges calibrated on the same data; a QAT range the data never reaches deploys
  at the narrower observed range, which the export report shows);
* the **activation ranges**: ``{"deploy_clip/<layer path>/clamp": (lo, hi)}``, regular
  expressions over TFLite tensor names (the clamp runs under ``jax.named_scope``, whose name
  TFLite keeps), for the ``activation_ranges`` agreement report of
  :func:`research.export.export`.

Importing ``methods.quantization`` registers :func:`deployable` as the deploy hook
``"methods.quantization"`` of :mod:`research.export.deploy` (``research`` never imports
``methods``): ``research.export.export`` and the ``export`` stage then convert fake-quant models
through it automatically and compare the artifacts with the fake-quant model itself.

What TFLite cannot follow exactly: it re-quantizes the baked kernels per channel with a
symmetric narrow int8 grid (exact for 8-bit symmetric kernels whose largest level is 127;
otherwise within half an int8 step); it quantizes every other tensor (sums, pooling, residual
adds) that the fake-quant model keeps in float; and activations trained at fewer than 8 bits
deploy at 8 bits (finer than trained).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from methods.quantization.modules import FakeQuant
from methods.quantization.modules import QuantLayer
from research.export.deploy import Deployable
from research.export.deploy import register_deploy_hook
from research.nn import get_module
from research.nn import iter_modules
from research.nn import replace_module


def _representable_range(fq: FakeQuant) -> tuple[float, float]:
    """``[(qmin - zp) * scale, (qmax - zp) * scale]`` of a per-tensor quantizer."""
    scale, zp = fq.scale_zero_point()
    scale, zp = np.asarray(scale, np.float64), np.asarray(zp, np.float64)
    if scale.size != 1:
        raise ValueError(
            f"per-channel activation quantizer (scale shape {scale.shape}) has no single range "
            "TFLite can deploy; quantize activations per tensor (QuantRule default)"
        )
    qmin, qmax = fq.spec.grid(fq.signed)
    return float((qmin - zp) * scale), float((qmax - zp) * scale)


class DeployedClip(nnx.Module):
    """Clamps to ``[lo, hi]`` under the name scope ``deploy_clip/<path>`` (a float op TFLite keeps).

    Args:
      lo: lower bound.
      hi: upper bound.
      path: the layer path, put in the TFLite tensor name.
    """

    def __init__(self, lo: float, hi: float, path: str):
        self.lo = float(lo)
        self.hi = float(hi)
        self.path = path

    def __call__(self, x: jax.Array) -> jax.Array:
        with jax.named_scope(f"deploy_clip/{self.path}"):
            return jax.lax.clamp(np.asarray(self.lo, x.dtype), x, np.asarray(self.hi, x.dtype))


class DeployedLayer(nnx.Module):
    """A float Linear/Conv with the trained (dequantized) kernel, behind an optional input clip.

    Args:
      layer: the float layer, its kernel already the fake-quantized values.
      clip: the input clip (``None`` when the fake-quant layer kept its inputs in float).
    """

    def __init__(self, layer: nnx.Module, clip: DeployedClip | None):
        self.layer = layer
        self.clip = nnx.data(clip)

    def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
        if self.clip is not None:
            x = self.clip(x)
        return self.layer(x, *args, **kwargs)


def _clip_for(fq: FakeQuant | None, path: str, ranges: dict[str, tuple[float, float]]):
    if fq is None:
        return None
    if not fq.calibrated:
        raise ValueError(
            f"the input quantizer of {path!r} has no range; run "
            "methods.quantization.calibrate(model, batches) before deploying"
        )
    lo, hi = _representable_range(fq)
    ranges[f"deploy_clip/{path}/clamp"] = (lo, hi)
    return DeployedClip(lo, hi, path)


def deployable(model: nnx.Module) -> tuple[nnx.Module, dict[str, tuple[float, float]]]:
    """Returns a float model computing with the trained quantized weights and ranges.

    Args:
      model: a calibrated or QAT-trained fake-quant model (left untouched).

    Returns:
      ``(float_model, activation_ranges)``: the float model (eval mode) in which every fake-quant
      layer is a :class:`DeployedLayer` and every stand-alone activation quantizer a
      :class:`DeployedClip`, and the learned ranges keyed by a regular expression over TFLite
      tensor names (``activation_ranges`` of :func:`research.export.export`).

    Raises:
      ValueError: the model has no fake-quant module, or an input quantizer is uncalibrated.

    Example:
      >>> from research.nn import build_model
      >>> from methods.quantization import QuantRule, calibrate, quantize_model
      >>> m = build_model("mlp", input_shape=(4,), num_classes=3, rngs=nnx.Rngs(0))
      >>> q = calibrate(quantize_model(m, [QuantRule(bits=8)]), [np.ones((2, 4), np.float32)])
      >>> fm, ranges = deployable(q)
      >>> sorted(ranges)[0]
      'deploy_clip/head/clamp'
    """
    out = nnx.clone(model)
    out.eval()
    ranges: dict[str, tuple[float, float]] = {}
    layers = [(p, m) for p, m in iter_modules(out) if isinstance(m, QuantLayer)]
    quantizers = [(p, m) for p, m in iter_modules(out) if isinstance(m, FakeQuant)]
    if not layers and not quantizers:
        raise ValueError(f"{type(model).__name__} has no fake-quant layer; export it as it is (no deploy step)")
    for path, ql in sorted(layers, key=lambda pm: -pm[0].count("/")):
        layer = nnx.clone(ql.layer)
        layer.kernel.set_value(ql.quantized_kernel())
        clip = _clip_for(ql.input_quant, path, ranges)
        out = replace_module(out, path, DeployedLayer(layer, clip), copy=False)
    inside = {p for p, _ in layers}
    for path, fq in quantizers:
        if any(path.startswith(q + "/") for q in inside):
            continue
        if fq.role != "input":
            raise ValueError(f"stand-alone weight quantizer at {path!r}: only activations can be clipped")
        out = replace_module(out, path, _clip_for(get_module(out, path), path, ranges), copy=False)
    out.eval()
    return out, ranges


def _has_fake_quant(model) -> bool:
    return isinstance(model, nnx.Module) and any(isinstance(m, QuantLayer | FakeQuant) for _, m in iter_modules(model))


@register_deploy_hook("methods.quantization")
def _deploy_hook(model) -> Deployable | None:
    if not _has_fake_quant(model):
        return None
    float_model, ranges = deployable(model)
    notes = []
    low = sorted(
        {fq.spec.bits for _, fq in iter_modules(model) if isinstance(fq, FakeQuant) and fq.role == "input"} - {8}
    )
    if low:
        notes.append(f"activations trained at {low} bits deploy at 8 bits in TFLite/ONNX int8")
    return Deployable(model=float_model, activation_ranges=ranges, notes=tuple(notes))
