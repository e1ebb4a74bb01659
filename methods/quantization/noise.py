"""Int8-noise agreement training: fine-tune a float model so its full-integer export predicts what it predicts.

A full-integer file (TFLite ``int8``, its ONNX Q/DQ file) rounds every activation tensor to one
int8 grid whose step is the tensor's range / 255. Its top-1 prediction differs from the float
model's on the inputs whose top-1 margin (largest logit minus the second) is smaller than the
logit error this rounding causes: a few near-ties decide the agreement. Lowering the rounding
error alone (a kurtosis penalty) is not enough when the same fine-tuning also shrinks the margins.

This module trains the quantity that decides agreement directly. :func:`noisy_forward` runs the
model equation by equation (:func:`methods.quantization.kurtosis.run_activations`) and adds, to the
input and to every activation a full-integer file stores on an int8 grid, uniform noise of one
grid step, ``step = (max(t, 0) - min(t, 0)) / (2**bits - 1)`` per tensor over the batch (as a
per-tensor asymmetric grid, which always holds 0, sees it). :func:`quant_noise_regularizer` adds to
the task loss the cross-entropy of these noisy logits against the float model's own top-1 class
(``target="top1"``; ``"kl"``: the KL divergence from the float model's softmax). The float logits
are the target (no gradient through them), so the term is lowered only by making the prediction
survive the noise: larger margins where the noise is large, smaller ranges (the step is
differentiable in the tensor, so a tensor whose range costs agreement is pulled in), in proportion
to each tensor's measured effect on the logits, not a proxy of it. Noise (not rounding with a
straight-through gradient) keeps that gradient with respect to the range.

Measured on the attention + GRU zoo model (MNIST-1D, ``python -m experiments.int8_seq.noise``,
``experiments/int8_seq/README.md``): the noise at one step matches the int8 file's error level
(median max-logit error 0.47 vs 0.46 for rounding), and 300 fine-tuning steps with the term
lowered the file's median error by 8-19 % but not its agreement (0.978-0.984 against the
control's 0.983 on the hardest variation, five settings): the inputs that flip there have a few
large errors from one tensor's rounding (a LayerNorm's ``var + epsilon``;
:func:`methods.quantization.int8_norm_epsilon` addresses it), which spread-out noise does not
single out.

References:
  Défossez, Adi & Synnaeve, "Differentiable Model Compression via Pseudo Quantization Noise"
  (DiffQ: additive uniform noise in place of rounding), https://arxiv.org/abs/2104.09987
  Fan et al., "Training with Quantization Noise for Extreme Model Compression",
  https://arxiv.org/abs/2004.07320
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from methods.quantization.kurtosis import run_activations
from research.train.losses import LossFn
from research.train.losses import LossTransform

#: What the noisy logits are trained to match: the float model's top-1 class (cross-entropy) or
#: its whole softmax (KL divergence).
TARGETS = ("top1", "kl")


def grid_noise(t: jax.Array, key: jax.Array, *, bits: int = 8, scale: float = 1.0) -> jax.Array:
    """``t`` plus uniform noise of ``scale`` steps of a per-tensor asymmetric ``bits``-bit grid.

    The grid spans ``[min(t, 0), max(t, 0)]`` over all of ``t``'s elements; the noise is uniform in
    ``±scale * step / 2``, ``step = span / (2**bits - 1)``, and differentiable with respect to the
    span. Non-floating tensors are returned unchanged.
    """
    if not jnp.issubdtype(jnp.result_type(t), jnp.floating):
        return t
    t32 = t.astype(jnp.float32)
    lo, hi = jnp.min(t32), jnp.max(t32)
    span = jnp.maximum(hi, 0.0) - jnp.minimum(lo, 0.0)
    u = jax.random.uniform(key, jnp.shape(t), jnp.float32, -0.5, 0.5)
    noisy = t32 + (scale * span / (2**bits - 1)) * u
    # Rounding keeps a value inside its tensor's range (a variance stays >= 0 for the rsqrt after it).
    noisy = jnp.clip(noisy, jax.lax.stop_gradient(lo), jax.lax.stop_gradient(hi))
    return noisy.astype(jnp.result_type(t))


def noisy_forward(
    model: nnx.Module, x: jax.Array, key: jax.Array, *, bits: int = 8, scale: float = 1.0, min_size: int = 2
) -> jax.Array:
    """``model(x)`` with :func:`grid_noise` added to the input and to every activation.

    The activations are those of :func:`methods.quantization.activations` (every floating tensor
    computed from the input, except the ones only moved); each gets its own key
    (``fold_in(key, i)``). Works inside ``jax.grad``/``jax.jit``.

    Raises:
      ValueError: ``bits`` below 2, ``scale`` negative or not finite, ``min_size`` below 2.
    """
    _check(1.0, bits, scale, "top1", min_size)
    count = [0]

    def perturb(name, t):
        del name
        count[0] += 1
        return grid_noise(t, jax.random.fold_in(key, count[0]), bits=bits, scale=scale)

    out, _ = run_activations(model, x, min_size=min_size, perturb=perturb)
    return out


def _check(weight, bits, scale, target, min_size) -> None:
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
        raise ValueError(f"quant-noise weight={weight!r} must be a finite number >= 0 (0 turns the term off)")
    if not (isinstance(bits, int) and 2 <= bits <= 16):
        raise ValueError(f"bits={bits!r} must be an int in [2, 16] (8 for a full-int8 export)")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0):
        raise ValueError(f"noise scale={scale!r} must be a finite number >= 0 (1 = one grid step)")
    if target not in TARGETS:
        raise ValueError(f"target={target!r} is not one of {TARGETS}")
    if int(min_size) < 2:
        raise ValueError(f"min_size={min_size}: a tensor needs at least 2 values for a range; pass min_size >= 2")


def quant_noise_regularizer(
    weight: float = 1.0,
    *,
    bits: int = 8,
    scale: float = 1.0,
    target: str = "top1",
    min_size: int = 2,
    input_key: str = "x",
) -> LossTransform:
    """A loss transform adding ``weight * D(float logits, noisy logits)`` to the loss.

    ``noisy logits`` = :func:`noisy_forward` on ``batch[input_key]`` with a key drawn from the
    step's ``rng``; ``float logits`` = ``aux["logits"]`` of the wrapped loss, held fixed
    (``stop_gradient``). ``D`` is the cross-entropy against the float top-1 class
    (``target="top1"``) or ``KL(softmax(float) || softmax(noisy))`` (``"kl"``). The term's value goes
    into ``aux["quant_noise_loss"]`` and the fraction of the batch whose noisy top-1 equals the
    float one into ``aux["quant_noise_agreement"]``. ``weight=0`` returns the loss function itself.

    Args:
      weight: the term's weight (``>= 0``).
      bits: the grid's bit width (8 for a full-int8 export).
      scale: the noise amplitude in grid steps (1: the rounding error's range).
      target: ``"top1"`` or ``"kl"``.
      min_size: tensors with fewer elements get no noise.
      input_key: the batch entry the model is called on.

    Returns:
      ``transform(loss_fn) -> loss_fn``.

    Raises:
      ValueError: a negative or non-finite ``weight`` or ``scale``, ``bits`` outside [2, 16], an
      unknown ``target``, ``min_size`` below 2.

    Example::

        from research.train import finetune
        trained = finetune(model, ds, workdir=d, steps=300, learning_rate=1e-3,
                           loss_transforms=[quant_noise_regularizer(1.0)])
    """
    _check(weight, bits, scale, target, min_size)

    def transform(loss_fn: LossFn) -> LossFn:
        if weight == 0:
            return loss_fn

        def new_loss(model, batch, rng):
            loss, aux = loss_fn(model, batch, rng)
            clean = jax.lax.stop_gradient(aux["logits"]).astype(jnp.float32)
            key = jax.random.fold_in(rng, 0x51A7)
            noisy = noisy_forward(model, batch[input_key], key, bits=bits, scale=scale, min_size=min_size)
            noisy = noisy.astype(jnp.float32)
            top1 = jnp.argmax(clean, -1)
            if target == "top1":
                term = optax.softmax_cross_entropy_with_integer_labels(noisy, top1).mean()
            else:
                p = jax.nn.softmax(clean, -1)
                term = jnp.sum(p * (jax.nn.log_softmax(clean, -1) - jax.nn.log_softmax(noisy, -1)), -1).mean()
            agree = jnp.mean(jnp.argmax(noisy, -1) == top1)
            return loss + weight * term, {**aux, "quant_noise_loss": term, "quant_noise_agreement": agree}

        return new_loss

    return transform
