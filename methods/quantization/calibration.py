"""Calibration (post-training quantization ranges) with observers."""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from methods.quantization.modules import find_quantizers
from methods.quantization.observers import make_observer
from research.nn import get_module
from research.nn.flax_errors import flax_boundary


def _as_input(batch: Any) -> np.ndarray:
    if isinstance(batch, Mapping):
        return np.asarray(batch["x"])
    return np.asarray(batch)


def calibrate(
    model: nnx.Module,
    batches: Iterable[Any],
    observer: str = "minmax",
    *,
    weight_observer: str = "minmax",
    num_batches: int | None = None,
    observer_options: dict[str, Any] | None = None,
) -> nnx.Module:
    """Sets every quantizer's range from calibration data; no training (PTQ).

    Input quantizers observe the **float** activations (all quantizers are bypassed while the
    model runs on the calibration batches, in eval mode). Kernel quantizers observe the
    kernels with ``weight_observer`` (per channel where the spec says so). LSQ steps and PACT
    clipping values are initialised from the calibrated ranges, so QAT starts from them.

    Args:
      model: a model with fake-quant layers (from :func:`quantize_model`); left untouched.
      batches: iterable of input arrays or of dicts with an ``"x"`` entry.
      observer: registered observer for activations (``"minmax"``, ``"moving_average"``,
        ``"percentile"``, ``"mse"``).
      weight_observer: registered observer for kernels.
      num_batches: use at most this many batches.
      observer_options: extra keyword arguments for the activation observers.

    Returns:
      A calibrated copy of ``model`` in eval mode.

    Raises:
      ValueError: no quantizers in the model, or no batches.

    Example:
      >>> from research.nn import build_model
      >>> from methods.quantization import QuantRule, quantize_model
      >>> m = build_model("mlp", input_shape=(4,), num_classes=3, rngs=nnx.Rngs(0))
      >>> q = calibrate(quantize_model(m, [QuantRule(bits=8)]), [np.ones((2, 4), np.float32)])
    """
    out = nnx.clone(model)
    out.eval()
    qs = find_quantizers(out)
    if not qs:
        raise ValueError("the model has no fake-quant layers; run quantize_model(model, rules) first")
    opts = dict(observer_options or {})
    inputs = [(p, fq) for p, fq in qs if fq.role == "input"]
    if inputs:
        observers = {
            p: make_observer(
                observer,
                axis=fq.axis,
                bits=fq.spec.bits,
                signed=fq.spec.signed,
                symmetric=fq.spec.symmetric,
                **opts,
            )
            for p, fq in inputs
        }
        for _, fq in qs:
            fq.observing = True
        graphdef, state = nnx.split(out)
        input_paths = [p for p, _ in inputs]

        @jax.jit
        def capture(state, x):
            m = nnx.merge(graphdef, state)
            with flax_boundary("calibrating activation ranges (quantizers record the float activations)", m):
                m(x)
            return {p: get_module(m, p).captured[...] for p in input_paths}

        seen = 0
        for batch in batches:
            if num_batches is not None and seen >= num_batches:
                break
            acts = jax.device_get(capture(state, _as_input(batch)))
            for p in input_paths:
                observers[p].update(acts[p])
            seen += 1
        for _, fq in qs:
            fq.observing = False
        if seen == 0:
            raise ValueError("no calibration batches were given; pass a non-empty iterable")
        for p, fq in inputs:
            fq.set_range(*observers[p].range())
    for p, fq in qs:
        if fq.role != "weight":
            continue
        parent = get_module(out, p.rpartition("/")[0])
        kernel = np.asarray(parent.layer.kernel[...])
        obs = make_observer(
            weight_observer,
            axis=fq.axis,
            bits=fq.spec.bits,
            signed=True,
            symmetric=fq.spec.symmetric,
        )
        obs.update(kernel)
        fq.set_range(*obs.range())
    return out
