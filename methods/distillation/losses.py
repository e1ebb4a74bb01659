"""Knowledge-distillation losses as pure functions of arrays.

Every function here maps student and teacher arrays (batch first) to a scalar and is safe to
``jax.jit``, ``jax.grad`` and ``jax.vmap``. Teacher arrays are wrapped in ``stop_gradient``: the
teacher is never trained by these losses. The loss transforms in
:mod:`methods.distillation.transforms` plug them into the training step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_EPS = 1e-12


def _check_pair(student: jax.Array, teacher: jax.Array, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: student shape {student.shape} differs from teacher shape {teacher.shape}; "
            "distil matching outputs (same classes) or project the student feature first "
            "(see methods.distillation.with_hints)"
        )


def _check_temperature(temperature: float) -> None:
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive; pass e.g. 4.0")


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 4.0) -> jax.Array:
    """Hinton et al.'s soft-target loss: ``T**2 * KL(softmax(t/T) || softmax(s/T))``, batch mean.

    The ``T**2`` factor keeps the gradient's size independent of the temperature: the gradient
    with respect to a student logit is ``T * (softmax(s/T) - softmax(t/T)) / B``, which for
    large ``T`` and zero-mean logits tends to ``(s - t) / (C * B)`` (logit matching).

    Args:
      student_logits: ``(B, C)`` student logits.
      teacher_logits: ``(B, C)`` teacher logits (gradients are stopped).
      temperature: the softening temperature ``T > 0``.

    Returns:
      A scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> float(kd_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), 4.0))
      0.0

    References:
      Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network",
      https://arxiv.org/abs/1503.02531
    """
    _check_pair(student_logits, teacher_logits, "kd_loss")
    _check_temperature(temperature)
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    log_p_t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    log_p_s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return temperature**2 * jnp.mean(kl)


def dkd_parts(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    temperature: float = 4.0,
) -> tuple[jax.Array, jax.Array]:
    """Per-example target-class (TCKD) and non-target-class (NCKD) KL terms of DKD.

    ``TCKD = KL(b_t || b_s)`` on the binary distributions ``[p_target, 1 - p_target]`` and
    ``NCKD = KL(q_t || q_s)`` on the softmax over the non-target classes only, all at
    temperature ``T`` and without the ``T**2`` factor. Classical KD decomposes as
    ``KL = TCKD + (1 - p_target_teacher) * NCKD`` (Zhao et al., Eq. 4).

    Returns:
      ``(tckd, nckd)``, each of shape ``(B,)``.
    """
    _check_pair(student_logits, teacher_logits, "dkd_parts")
    _check_temperature(temperature)
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    num_classes = student_logits.shape[-1]
    target = jax.nn.one_hot(labels, num_classes, dtype=bool)

    def binary_log_probs(z):
        log_p = jax.nn.log_softmax(z / temperature, axis=-1)
        log_pt = jnp.sum(jnp.where(target, log_p, 0.0), axis=-1)
        # log(1 - p_target) from the non-target logits, stable for p_target -> 1.
        log_rest = jax.nn.logsumexp(jnp.where(target, -jnp.inf, log_p), axis=-1)
        return log_pt, log_rest

    s_t, s_r = binary_log_probs(student_logits)
    t_t, t_r = binary_log_probs(teacher_logits)
    tckd = jnp.exp(t_t) * (t_t - s_t) + jnp.exp(t_r) * (t_r - s_r)

    # Softmax over the non-target classes: push the target logit far below the others (a finite
    # offset keeps gradients free of inf - inf).
    offset = 1e4 * target
    log_q_s = jax.nn.log_softmax(student_logits / temperature - offset, axis=-1)
    log_q_t = jax.nn.log_softmax(teacher_logits / temperature - offset, axis=-1)
    nckd = jnp.sum(jnp.where(target, 0.0, jnp.exp(log_q_t) * (log_q_t - log_q_s)), axis=-1)
    return tckd, nckd


def dkd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> jax.Array:
    """Decoupled KD: ``T**2 * mean(alpha * TCKD + beta * NCKD)`` (see :func:`dkd_parts`).

    Args:
      student_logits: ``(B, C)``.
      teacher_logits: ``(B, C)`` (gradients are stopped).
      labels: ``(B,)`` integer ground-truth classes (define the target class).
      alpha: weight of the target-class term.
      beta: weight of the non-target-class term (the paper's CIFAR setting is 8).
      temperature: softening temperature (``T**2`` scaling as in the authors' mdistiller code).

    Returns:
      A scalar.

    References:
      Zhao et al., "Decoupled Knowledge Distillation", https://arxiv.org/abs/2203.08679
    """
    tckd, nckd = dkd_parts(student_logits, teacher_logits, labels, temperature)
    return temperature**2 * jnp.mean(alpha * tckd + beta * nckd)


def hint_loss(student_feature: jax.Array, teacher_feature: jax.Array) -> jax.Array:
    """FitNets hint loss ``1/2 * ||r(v) - u||^2`` per example, averaged over the batch.

    ``student_feature`` is the student's guided-layer output **after** the learned regressor
    ``r`` (see :class:`methods.distillation.HintedStudent`); ``teacher_feature`` is the teacher's
    hint-layer output ``u``. The squared norm sums over all non-batch axes.

    References:
      Romero et al., "FitNets: Hints for Thin Deep Nets", https://arxiv.org/abs/1412.6550
    """
    _check_pair(student_feature, teacher_feature, "hint_loss")
    diff = student_feature - jax.lax.stop_gradient(teacher_feature)
    return 0.5 * jnp.mean(jnp.sum(jnp.reshape(diff**2, (diff.shape[0], -1)), axis=-1))


def attention_map(feature: jax.Array, p: float = 2.0) -> jax.Array:
    """Spatial attention map ``normalize(mean_c |A_c|^p)``, flattened to ``(B, positions)``.

    Channels are the last axis (NHWC / NLC). A ``(B, D)`` feature has no channel axis: each
    unit is a position and the map is ``normalize(|A|^p)``. Normalisation is the L2 norm per
    example (as in the authors' code).
    """
    a = jnp.abs(feature) ** p
    if feature.ndim > 2:
        a = jnp.mean(a, axis=-1)
    a = a.reshape(a.shape[0], -1)
    norm = jnp.sqrt(jnp.maximum(jnp.sum(a**2, axis=-1, keepdims=True), _EPS**2))
    return a / norm


def attention_loss(student_feature: jax.Array, teacher_feature: jax.Array, p: float = 2.0) -> jax.Array:
    """Attention transfer: ``mean((Q_s - Q_t)^2)`` over batch and positions.

    ``Q = attention_map(A, p)``; student and teacher may have different channel counts but need
    the same spatial size. This is the authors' ``at_loss``; the paper weights the sum over
    layer pairs by ``beta / 2`` with ``beta = 1000`` (the transform's default weight is 500).

    References:
      Zagoruyko & Komodakis, "Paying More Attention to Attention",
      https://arxiv.org/abs/1612.03928
    """
    q_s = attention_map(student_feature, p)
    q_t = jax.lax.stop_gradient(attention_map(teacher_feature, p))
    if q_s.shape != q_t.shape:
        raise ValueError(
            f"attention_loss: student map {q_s.shape} (feature {student_feature.shape}) differs from "
            f"teacher map {q_t.shape} (feature {teacher_feature.shape}); pair layers with the same "
            "spatial size"
        )
    return jnp.mean((q_s - q_t) ** 2)


def _smooth_l1(x: jax.Array) -> jax.Array:
    ax = jnp.abs(x)
    return jnp.where(ax < 1.0, 0.5 * x**2, ax - 0.5)


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


def pairwise_distances(x: jax.Array) -> jax.Array:
    """``(B, B)`` Euclidean distances between the rows of ``x`` (flattened), zero diagonal.

    The square root is taken of ``max(d^2, eps)`` so gradients stay finite on the diagonal.
    """
    x = _flat(x)
    sq = jnp.sum(x**2, axis=-1)
    d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
    eye = jnp.eye(x.shape[0], dtype=bool)
    return jnp.where(eye, 0.0, jnp.sqrt(jnp.maximum(d2, _EPS)))


def _normalised_distances(x: jax.Array) -> jax.Array:
    d = pairwise_distances(x)
    n = x.shape[0]
    mu = jnp.sum(d) / jnp.maximum(n * (n - 1), 1)
    return d / jnp.maximum(mu, _EPS)


def rkd_distance_loss(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """Relational KD, distance-wise: Huber loss between mean-normalised pairwise distances.

    ``psi_D(t_i, t_j) = ||t_i - t_j|| / mu`` with ``mu`` the mean distance over pairs
    ``i != j``; the loss is the mean smooth-L1 over all ``B*B`` pairs (authors' code).
    Student and teacher embeddings may have different widths.

    References:
      Park et al., "Relational Knowledge Distillation", https://arxiv.org/abs/1904.05068
    """
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"rkd: batch sizes differ, student {student.shape} vs teacher {teacher.shape}")
    t = jax.lax.stop_gradient(_normalised_distances(teacher))
    return jnp.mean(_smooth_l1(_normalised_distances(student) - t))


def _angles(x: jax.Array) -> jax.Array:
    x = _flat(x)
    diff = x[None, :, :] - x[:, None, :]  # diff[i, j] = x_j - x_i
    norm = jnp.sqrt(jnp.maximum(jnp.sum(diff**2, axis=-1, keepdims=True), _EPS**2))
    unit = diff / norm
    return jnp.einsum("ijd,ikd->ijk", unit, unit)  # cos of the angle at vertex i


def rkd_angle_loss(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """Relational KD, angle-wise: Huber loss between the cosines of all triplet angles.

    ``psi_A(t_i, t_j, t_k) = <e_ij, e_kj>`` with unit difference vectors; the loss is the mean
    smooth-L1 over all ``B**3`` triplets (authors' code). Memory is ``O(B**2 * D)``.

    References:
      Park et al., "Relational Knowledge Distillation", https://arxiv.org/abs/1904.05068
    """
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"rkd: batch sizes differ, student {student.shape} vs teacher {teacher.shape}")
    t = jax.lax.stop_gradient(_angles(teacher))
    return jnp.mean(_smooth_l1(_angles(student) - t))
