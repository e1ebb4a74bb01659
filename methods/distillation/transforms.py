"""KD loss transforms: ``LossFn -> LossFn`` that add distillation terms to any task loss.

A loss function follows the core protocol ``loss_fn(model, batch, rng) -> (loss, aux)`` with
``aux["logits"]`` (``research.train.losses``). Every transform here returns

    hard_weight * loss_fn(model, batch, rng) + sum_i weight_i * term_i(student, teacher)

where a :class:`KDTerm` compares the student's outputs (``aux["logits"]`` and, for
feature-based terms, intermediate outputs captured **in the same forward pass** that
``loss_fn`` runs) with the teacher's (from a teacher function: online or cached, see
:mod:`methods.distillation.teacher`). Each term's value is reported in ``aux`` as ``kd/<name>``
(logged by the train step) and the task loss as ``hard_loss``.

KD transforms applied directly on top of each other merge into one :class:`KDLoss`, so the
student is captured once and a shared teacher model runs once. Any other transform
(regularisers, quantizer penalties) composes as usual.

Every public transform accepts ``loss_fn=None`` and then returns the transform itself::

    step = make_train_step(defs, tx, loss_transforms=[distill(None, teacher, temperature=4.0)])
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from methods.distillation import losses as L
from methods.distillation import names as _names
from methods.distillation.capture import capture_intermediates
from methods.distillation.hints import HintedStudent
from methods.distillation.hints import student_prefix
from methods.distillation.hints import with_hints
from methods.distillation.teacher import OnlineTeacher
from methods.distillation.teacher import TeacherCache
from methods.distillation.teacher import TeacherFn
from methods.distillation.teacher import as_teacher_outputs
from research.registry import Registry
from research.train.losses import LossFn
from research.train.losses import LossTransform

Outputs = dict[str, Any]  # {"logits": (B, C), "features": {path: array}}
TermFn = Callable[[Outputs, Outputs, Mapping[str, jax.Array], nnx.Module], jax.Array]


@dataclasses.dataclass(frozen=True)
class KDTerm:
    """One distillation loss between student and teacher outputs.

    Attributes:
      name: the metric name (``aux["kd/<name>"]``).
      fn: ``fn(student, teacher, batch, model) -> scalar`` where ``student`` and ``teacher`` are
        ``{"logits": ..., "features": {path: ...}}`` and ``model`` is the trained module (e.g. a
        :class:`HintedStudent` holding projections).
      student_paths: student module paths whose outputs ``fn`` reads (relative to the student).
      teacher_paths: teacher module paths whose outputs ``fn`` reads.
      prepare: optional ``prepare(student, teacher, sample_x, rngs) -> model``: what the term
        needs added to the student before training (FitNets wraps it with projections); the
        ``distill`` stage calls it and unwraps the student afterwards
        (:func:`methods.distillation.unwrap_student`).
    """

    name: str
    fn: TermFn
    student_paths: tuple[str, ...] = ()
    teacher_paths: tuple[str, ...] = ()
    prepare: Callable[[nnx.Module, nnx.Module, Any, nnx.Rngs], nnx.Module] | None = None


# ------------------------------------------------------------------------------- term registry

# Created (with the built-in names declared) in the standard-library names module, so configs are checked before JAX.
KD_TERMS: Registry[Callable[..., KDTerm]] = _names.KD_TERMS


def register_kd_term(
    name: str, *, traced: Sequence[str] = ()
) -> Callable[[Callable[..., KDTerm]], Callable[..., KDTerm]]:
    """Registers a :class:`KDTerm` factory ``factory(**options) -> KDTerm`` under ``name``.

    The ``distill`` stage then accepts ``KDTermConfig(name=name, weight=..., options={...})``;
    config validation builds the term from its options, so bad options fail before training.
    Registering the same factory again is a no-op.

    Args:
      name: the term's name in configs.
      traced: numeric options the factory accepts as traced JAX scalars (used only in arithmetic,
        never in Python control flow). Runs that differ only in these (and in the weights) share
        one compiled step, so a population trains them together (:func:`kd_batch_loss`).

    Raises:
      DuplicateNameError: another factory is registered as ``name`` (a ``ValueError``).
      ValueError: a ``traced`` name is not a parameter of the factory.
    """
    register = KD_TERMS.register(name)

    def deco(factory: Callable[..., KDTerm]) -> Callable[..., KDTerm]:
        params = inspect.signature(factory).parameters
        unknown = [t for t in traced if t not in params]
        if unknown:
            raise ValueError(
                f"KD term {name!r}: traced options {unknown} are not parameters of {factory.__name__} "
                f"(it takes {list(params)}); name only numeric options it uses in arithmetic"
            )
        out = register(factory)
        if traced or not hasattr(factory, "kd_traced_options"):  # registering it again keeps its declaration
            factory.kd_traced_options = tuple(traced)
        return out

    return deco


def traced_options(name: str) -> tuple[str, ...]:
    """The options of registered term ``name`` that may be traced values (see :func:`register_kd_term`)."""
    return tuple(getattr(KD_TERMS.get(name), "kd_traced_options", ()))


def list_kd_terms() -> list[str]:
    """Names of the registered KD terms."""
    return KD_TERMS.names()


def make_kd_term(name: str, **options: Any) -> KDTerm:
    """Builds a registered term, e.g. ``make_kd_term("dkd", beta=4.0)``.

    Raises:
      UnknownNameError: unknown name (a ``KeyError`` naming the closest and all registered ones).
      TypeError: an option the factory does not take.
      ValueError: an option value the factory refuses.
    """
    term = KD_TERMS.get(name)(**options)
    if not isinstance(term, KDTerm):
        raise TypeError(f"KD term factory {name!r} returned {type(term).__name__}, expected a KDTerm")
    return term


def _feature(outputs: Outputs, path: str | None, who: str) -> jax.Array:
    if path is None:
        return outputs["logits"]
    feats = outputs["features"]
    if path not in feats:
        fix = (
            "build the teacher with OnlineTeacher(model, feature_paths=[...]) or "
            "build_teacher_cache(..., feature_paths=[...]), or pass the teacher model itself"
            if who == "teacher"
            else "name a student module path (research.nn.iter_modules)"
        )
        raise KeyError(f"{who} feature {path!r} is not available (have {sorted(feats)}); {fix}")
    return feats[path]


@register_kd_term("hinton", traced=("temperature",))
def hinton_term(temperature: float = 4.0) -> KDTerm:
    """Hinton KD on logits, :func:`methods.distillation.kd_loss` (``T**2``-scaled KL)."""
    L._check_temperature(temperature)
    return KDTerm("hinton", lambda s, t, b, m: L.kd_loss(s["logits"], t["logits"], temperature))


@register_kd_term("dkd", traced=("alpha", "beta", "temperature"))
def dkd_term(alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> KDTerm:
    """Decoupled KD on logits (needs ``batch["y"]``), :func:`methods.distillation.dkd_loss`."""
    L._check_temperature(temperature)

    def fn(s, t, batch, model):
        return L.dkd_loss(s["logits"], t["logits"], batch["y"], alpha=alpha, beta=beta, temperature=temperature)

    return KDTerm("dkd", fn)


@register_kd_term("fitnets")
def fitnets_term(hints: Sequence[tuple[str, str]] = ()) -> KDTerm:
    """FitNets hints: ``sum_i hint_loss(r_i(student[s_i]), teacher[t_i])``.

    The model being trained must be a :class:`HintedStudent` (see
    :func:`methods.distillation.with_hints`) whose projection ``i`` is ``r_i``.
    """
    hints = tuple((str(s), str(t)) for s, t in hints)
    if not hints:
        raise ValueError("fitnets needs at least one (student_path, teacher_path) hint pair")

    def fn(s, t, batch, model):
        if not isinstance(model, HintedStudent) or len(model.projections) != len(hints):
            raise TypeError(
                f"fitnets with {len(hints)} hint pair(s) needs the trained model to be a HintedStudent "
                f"with one projection per pair, got {type(model).__name__}; wrap the student with "
                "methods.distillation.with_hints(student, teacher, hints, sample_x, rngs=...)"
            )
        total = 0.0
        for i, (sp, tp) in enumerate(hints):
            total = total + L.hint_loss(model.project(i, _feature(s, sp, "student")), _feature(t, tp, "teacher"))
        return total

    def prepare(student, teacher, sample_x, rngs):
        return with_hints(student, teacher, hints, sample_x, rngs=rngs)

    return KDTerm("fitnets", fn, tuple(s for s, _ in hints), tuple(t for _, t in hints), prepare)


@register_kd_term("attention")
def attention_term(pairs: Sequence[tuple[str, str]] = (), p: float = 2.0) -> KDTerm:
    """Attention transfer: ``sum`` of :func:`methods.distillation.attention_loss` over layer pairs."""
    pairs = tuple((str(s), str(t)) for s, t in pairs)
    if not pairs:
        raise ValueError("attention transfer needs at least one (student_path, teacher_path) pair")

    def fn(s, t, batch, model):
        total = 0.0
        for sp, tp in pairs:
            total = total + L.attention_loss(_feature(s, sp, "student"), _feature(t, tp, "teacher"), p)
        return total

    return KDTerm("attention", fn, tuple(s for s, _ in pairs), tuple(t for _, t in pairs))


def self_attention_maps(query: jax.Array, key: jax.Array) -> jax.Array:
    """Attention distributions ``softmax(q . k / sqrt(head_dim))`` of shape ``(B, heads, L_q, L_k)``.

    Args:
      query, key: projections ``(B, L, heads, head_dim)`` (the outputs of an
        ``nnx.MultiHeadAttention``'s ``query`` and ``key`` layers).
    """
    if query.ndim != 4 or key.ndim != 4:
        raise ValueError(
            f"attention maps need query/key projections shaped (batch, length, heads, head_dim), got "
            f"{query.shape} and {key.shape}; name nnx.MultiHeadAttention modules (their query/key are captured)"
        )
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) / jnp.sqrt(jnp.asarray(query.shape[-1], query.dtype))
    return jax.nn.softmax(logits, axis=-1)


def attention_map_loss(student_maps: jax.Array, teacher_maps: jax.Array) -> jax.Array:
    """``KL(teacher || student)`` between attention distributions, averaged over batch, heads, queries.

    With equal head counts each student head follows its teacher head (MiniLM); otherwise (a
    head-pruned student) the head-averaged distributions are compared. Sequence lengths must match.

    References:
      Wang et al., "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of
      Pre-Trained Transformers", https://arxiv.org/abs/2002.10957
    """
    if student_maps.shape[0] != teacher_maps.shape[0] or student_maps.shape[2:] != teacher_maps.shape[2:]:
        raise ValueError(
            f"attention maps {student_maps.shape} (student) and {teacher_maps.shape} (teacher) differ in batch "
            "or sequence length; pair attention layers that see the same tokens"
        )
    t = jax.lax.stop_gradient(teacher_maps)
    s = student_maps
    if s.shape[1] != t.shape[1]:
        s, t = jnp.mean(s, axis=1, keepdims=True), jnp.mean(t, axis=1, keepdims=True)
    eps = jnp.finfo(s.dtype).tiny
    kl = jnp.sum(t * (jnp.log(t + eps) - jnp.log(s + eps)), axis=-1)
    return jnp.mean(kl)


def hidden_state_loss(student_feature: jax.Array, teacher_feature: jax.Array) -> jax.Array:
    """Mean squared difference between hidden states of equal shape (TinyBERT's hidden-state loss)."""
    if student_feature.shape != teacher_feature.shape:
        raise ValueError(
            f"hidden states {student_feature.shape} (student) and {teacher_feature.shape} (teacher) differ; "
            "pair layers of equal width, or use the 'fitnets' term, which learns a projection"
        )
    return jnp.mean((student_feature - jax.lax.stop_gradient(teacher_feature)) ** 2)


def _attention_pairs(pairs, what: str) -> tuple[tuple[str, str], ...]:
    pairs = tuple((str(s), str(t)) for s, t in pairs)
    if not pairs:
        raise ValueError(f"{what} needs at least one (student_path, teacher_path) pair")
    return pairs


@register_kd_term("attention_map")
def attention_map_term(pairs: Sequence[tuple[str, str]] = ()) -> KDTerm:
    """Self-attention distribution transfer between ``nnx.MultiHeadAttention`` layers (MiniLM).

    ``pairs`` name attention modules (``("blocks/0/attn", "blocks/0/attn")``); the maps are
    recomputed from their ``query``/``key`` projections captured in the forward pass, so
    quantized, factorized or head-pruned projections work. See :func:`attention_map_loss`.
    """
    pairs = _attention_pairs(pairs, "attention_map")

    def fn(s, t, batch, model):
        total = 0.0
        for sp, tp in pairs:
            s_maps = self_attention_maps(_feature(s, f"{sp}/query", "student"), _feature(s, f"{sp}/key", "student"))
            t_maps = self_attention_maps(_feature(t, f"{tp}/query", "teacher"), _feature(t, f"{tp}/key", "teacher"))
            total = total + attention_map_loss(s_maps, t_maps)
        return total

    student = tuple(f"{sp}/{n}" for sp, _ in pairs for n in ("query", "key"))
    teacher = tuple(f"{tp}/{n}" for _, tp in pairs for n in ("query", "key"))
    return KDTerm("attention_map", fn, student, teacher)


@register_kd_term("hidden_state")
def hidden_state_term(pairs: Sequence[tuple[str, str]] = ()) -> KDTerm:
    """Hidden-state transfer: :func:`hidden_state_loss` summed over (student, teacher) module pairs
    (e.g. encoder blocks, ``("blocks/1", "blocks/1")``)."""
    pairs = _attention_pairs(pairs, "hidden_state")

    def fn(s, t, batch, model):
        total = 0.0
        for sp, tp in pairs:
            total = total + hidden_state_loss(_feature(s, sp, "student"), _feature(t, tp, "teacher"))
        return total

    return KDTerm("hidden_state", fn, tuple(s for s, _ in pairs), tuple(t for _, t in pairs))


def _rkd_term(name, loss, student_path, teacher_path) -> KDTerm:
    def fn(s, t, batch, model):
        return loss(_feature(s, student_path, "student"), _feature(t, teacher_path, "teacher"))

    return KDTerm(
        name,
        fn,
        () if student_path is None else (student_path,),
        () if teacher_path is None else (teacher_path,),
    )


@register_kd_term("rkd_distance")
def rkd_distance_term(student_path: str | None = None, teacher_path: str | None = None) -> KDTerm:
    """RKD distance loss on logits (``None`` paths) or on the named embeddings."""
    return _rkd_term("rkd_distance", L.rkd_distance_loss, student_path, teacher_path)


@register_kd_term("rkd_angle")
def rkd_angle_term(student_path: str | None = None, teacher_path: str | None = None) -> KDTerm:
    """RKD angle loss on logits (``None`` paths) or on the named embeddings."""
    return _rkd_term("rkd_angle", L.rkd_angle_loss, student_path, teacher_path)


# ------------------------------------------------------------------------------- the loss


@dataclasses.dataclass(frozen=True)
class _Entry:
    weight: float
    term: KDTerm
    teacher: TeacherFn | nnx.Module


class KDLoss:
    """``hard_weight * base(model, batch, rng) + sum_i weight_i * term_i``: a loss function.

    Built by the transforms below; stacking KD transforms merges their entries, so the student
    is captured once and each distinct teacher model runs once. A teacher given as an NNX
    module becomes an :class:`OnlineTeacher` returning the features that its terms need.
    """

    def __init__(self, base: LossFn, entries: Sequence[_Entry], hard_weight: float = 1.0):
        self.base = base
        self.entries = tuple(entries)
        self.hard_weight = float(hard_weight)
        paths: dict[int, list[str]] = {}
        modules: dict[int, nnx.Module] = {}
        for e in self.entries:
            if isinstance(e.teacher, nnx.Module):
                modules[id(e.teacher)] = e.teacher
                paths.setdefault(id(e.teacher), [])
                paths[id(e.teacher)] += [p for p in e.term.teacher_paths if p not in paths[id(e.teacher)]]
        self._online = {k: OnlineTeacher(m, paths[k]) for k, m in modules.items()}
        self.student_paths = tuple(dict.fromkeys(p for e in self.entries for p in e.term.student_paths))

    def _teacher_fn(self, teacher) -> TeacherFn:
        return self._online[id(teacher)] if isinstance(teacher, nnx.Module) else teacher

    def __call__(self, model: nnx.Module, batch, rng):
        entries = [(e.weight, e.term, self._teacher_fn(e.teacher)) for e in self.entries]
        return _kd_objective(self.base, self.student_paths, entries, self.hard_weight, model, batch, rng)


def _kd_objective(base: LossFn, student_paths, entries, hard_weight, model, batch, rng):
    """``hard_weight * base + sum w * term(student, teacher_fn(batch))`` over ``entries`` of
    ``(w, KDTerm, teacher_fn)``: the student captured once, each distinct teacher function called once."""
    prefix = student_prefix(model)
    if student_paths:
        full = [prefix + p for p in student_paths]
        (loss, aux), feats = capture_intermediates(base, full)(model, batch, rng)
        feats = {p: feats[prefix + p] for p in student_paths}
    else:
        loss, aux = base(model, batch, rng)
        feats = {}
    if "logits" not in aux:
        raise KeyError(f"the wrapped loss function's aux has keys {sorted(aux)}; KD needs aux['logits']")
    student = {"logits": aux["logits"], "features": feats}
    teachers: dict[int, Outputs] = {}
    total = hard_weight * loss
    metrics: dict[str, jax.Array] = {"hard_loss": loss}
    for weight, term, fn in entries:
        if id(fn) not in teachers:
            teachers[id(fn)] = jax.lax.stop_gradient(as_teacher_outputs(fn(batch)))
        value = term.fn(student, teachers[id(fn)], batch, model)
        key = f"kd/{term.name}"
        n = 1
        while key in metrics or key in aux:
            n += 1
            key = f"kd/{term.name}_{n}"
        metrics[key] = value
        total = total + weight * value
    return total, {**aux, **metrics}


def weighted_sum(
    loss_fn: LossFn | None,
    teacher_fn: TeacherFn | nnx.Module,
    terms: Sequence[tuple[float, KDTerm]],
    *,
    hard_weight: float = 1.0,
) -> LossFn | LossTransform:
    """``hard_weight * loss_fn + sum_i w_i * term_i`` with one teacher for all terms.

    Args:
      loss_fn: the loss to wrap (``None`` returns the transform).
      teacher_fn: a teacher function (``batch -> logits | {"logits", "features"}``), e.g. an
        :class:`OnlineTeacher` or :class:`TeacherCache`, or the teacher NNX model itself.
      terms: ``(weight, KDTerm)`` pairs, e.g. ``[(0.9, hinton_term(4.0)), (25.0, rkd_distance_term())]``.
      hard_weight: weight of ``loss_fn``'s own loss.

    Returns:
      The new loss function (a :class:`KDLoss`), or the transform if ``loss_fn`` is None.
    """
    entries = [_Entry(float(w), t, teacher_fn) for w, t in terms]
    for e in entries:
        if not isinstance(e.term, KDTerm):
            raise TypeError(f"terms must be (weight, KDTerm) pairs, got {type(e.term).__name__}")

    def transform(fn: LossFn) -> LossFn:
        if isinstance(fn, KDLoss):  # merge: one capture, one teacher pass per teacher model
            inner = [_Entry(e.weight * hard_weight, e.term, e.teacher) for e in fn.entries]
            return KDLoss(fn.base, inner + entries, fn.hard_weight * hard_weight)
        return KDLoss(fn, entries, hard_weight)

    return transform if loss_fn is None else transform(loss_fn)


class BatchKDLoss:
    """A :class:`KDLoss` with a cached teacher whose values come from the batch, not the closure.

    ``batch["teacher"]`` holds the teacher's outputs for the batch's rows (``{"logits", "features"}``)
    and ``batch["kd"]`` the weights and the terms' traced options (``{"hard_weight": (),
    "weights": (n,), "options": ({option: ()}, ...)}``); the terms are built inside the traced
    function from them. The loss equals the :class:`KDLoss` of the same teacher cache and values
    (within float rounding), and runs that differ only in those values share one compiled step.
    Built by :func:`kd_batch_loss`.
    """

    def __init__(self, base: LossFn, specs: Sequence[tuple[str, Mapping[str, Any], tuple[str, ...]]], student_paths):
        self.base = base
        self.specs = tuple(specs)
        self.student_paths = tuple(student_paths)

    def __call__(self, model: nnx.Module, batch, rng):
        values = batch["kd"]
        outputs = batch["teacher"]

        def teacher(_batch):
            return outputs

        entries = []
        for i, (name, static, traced) in enumerate(self.specs):
            term = make_kd_term(name, **static, **{o: values["options"][i][o] for o in traced})
            entries.append((values["weights"][i], term, teacher))
        return _kd_objective(self.base, self.student_paths, entries, values["hard_weight"], model, batch, rng)


def kd_batch_loss(cache: TeacherCache, terms: Sequence[tuple[float, str, Mapping[str, Any]]], hard_weight: float = 1.0):
    """The KD loss of ``cache``'s teacher as a :class:`research.train.BatchLoss`: the teacher's
    outputs are rows, the weights and every term's traced numeric options (those declared with
    :func:`register_kd_term`'s ``traced``, defaults included) are constants of the batch.

    Trials whose KD differs only in temperatures, term weights, ``hard_weight`` (and their
    teachers) then share one program key, so a population fine-tunes them together.

    Args:
      cache: the teacher's outputs on the training split (row ``i`` for example ``i``).
      terms: ``(weight, term name, options)`` per term, as a :class:`KDTermConfig` gives them.
      hard_weight: weight of the wrapped loss's own (hard-label) loss.

    Returns:
      The :class:`research.train.BatchLoss` (one transform, a :class:`BatchKDLoss`).

    Raises:
      UnknownNameError, TypeError, ValueError: a term or option that does not build (as
        :func:`make_kd_term`).
    """
    from research.train.losses import BatchLoss  # pylint: disable=import-outside-toplevel

    specs, options, weights, student_paths = [], [], [], []
    for weight, name, opts in terms:
        built = make_kd_term(name, **dict(opts))  # refuses bad options with the factory's own error
        student_paths += [p for p in built.student_paths if p not in student_paths]
        params, declared = inspect.signature(KD_TERMS.get(name)).parameters, traced_options(name)
        given = {o: params[o].default for o in declared if params[o].default is not inspect.Parameter.empty}
        given.update(opts)
        numeric = {o for o, v in given.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        traced = tuple(sorted(numeric & set(declared)))
        specs.append((name, {o: v for o, v in dict(opts).items() if o not in traced}, traced))
        options.append({o: np.float32(given[o]) for o in traced})
        weights.append(weight)
    constants = {
        "kd": {
            "hard_weight": np.float32(hard_weight),
            "weights": np.asarray(weights, np.float32),
            "options": tuple(options),
        }
    }
    rows = {
        "teacher": {
            "logits": np.asarray(cache.logits),
            "features": {k: np.asarray(v) for k, v in cache.features.items()},
        }
    }
    shapes = jax.tree.map(lambda a: (a.shape[1:], str(a.dtype)), rows)
    key = (
        "kd_batch_loss",
        tuple((name, json.dumps(static, sort_keys=True, default=repr), traced) for name, static, traced in specs),
        tuple(student_paths),
        json.dumps(shapes, sort_keys=True, default=repr),
    )

    def transform(fn: LossFn) -> LossFn:
        return BatchKDLoss(fn, specs, student_paths)

    return BatchLoss(transforms=(transform,), constants=constants, rows=rows, key=key)


def distill(
    loss_fn: LossFn | None,
    teacher_fn: TeacherFn | nnx.Module,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> LossFn | LossTransform:
    """Hinton KD: ``(1 - alpha) * loss_fn + alpha * kd_loss(student, teacher, T)``.

    Args:
      loss_fn: the hard-label loss (e.g. ``research.train.cross_entropy_loss``); ``None``
        returns the transform.
      teacher_fn: teacher function or teacher NNX model (see :func:`weighted_sum`).
      temperature: softening temperature (the ``T**2`` factor is inside :func:`kd_loss`).
      alpha: weight of the soft loss in ``[0, 1]``.

    Example:
      >>> from flax import nnx
      >>> import jax, jax.numpy as jnp
      >>> from research.nn import build_model
      >>> from research.train import cross_entropy_loss
      >>> t = build_model("mlp", input_shape=(4,), num_classes=3, widths=(8,), rngs=nnx.Rngs(0))
      >>> s = build_model("mlp", input_shape=(4,), num_classes=3, widths=(2,), rngs=nnx.Rngs(1))
      >>> loss_fn = distill(cross_entropy_loss, t, temperature=4.0, alpha=0.9)
      >>> batch = {"x": jnp.ones((5, 4)), "y": jnp.zeros(5, jnp.int32)}
      >>> loss, aux = loss_fn(s, batch, jax.random.key(0))
      >>> sorted(k for k in aux if k.startswith("kd/"))
      ['kd/hinton']

    References:
      Hinton, Vinyals, Dean, https://arxiv.org/abs/1503.02531
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1] (the weight of the soft loss)")
    return weighted_sum(loss_fn, teacher_fn, [(alpha, hinton_term(temperature))], hard_weight=1.0 - alpha)


def dkd(
    loss_fn: LossFn | None,
    teacher_fn: TeacherFn | nnx.Module,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    weight: float = 1.0,
) -> LossFn | LossTransform:
    """Decoupled KD: ``loss_fn + weight * dkd_loss(...)`` (arXiv 2203.08679)."""
    return weighted_sum(loss_fn, teacher_fn, [(weight, dkd_term(alpha, beta, temperature))])


def fitnets(
    loss_fn: LossFn | None,
    teacher_fn: TeacherFn | nnx.Module,
    hints: Sequence[tuple[str, str]],
    weight: float = 1.0,
) -> LossFn | LossTransform:
    """FitNets hints: ``loss_fn + weight * sum_i 1/2 ||r_i(s_i) - t_i||^2`` (arXiv 1412.6550).

    Train a :class:`HintedStudent` from :func:`methods.distillation.with_hints` so that the
    projections ``r_i`` are trained with the student.
    """
    return weighted_sum(loss_fn, teacher_fn, [(weight, fitnets_term(hints))])


def attention_transfer(
    loss_fn: LossFn | None,
    teacher_fn: TeacherFn | nnx.Module,
    pairs: Sequence[tuple[str, str]],
    weight: float = 500.0,
    p: float = 2.0,
) -> LossFn | LossTransform:
    """Attention transfer: ``loss_fn + weight * sum_pairs at_loss`` (``weight = beta/2``, arXiv 1612.03928)."""
    return weighted_sum(loss_fn, teacher_fn, [(weight, attention_term(pairs, p))])


def rkd(
    loss_fn: LossFn | None,
    teacher_fn: TeacherFn | nnx.Module,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
    student_path: str | None = None,
    teacher_path: str | None = None,
) -> LossFn | LossTransform:
    """Relational KD: ``loss_fn + w_D * RKD-D + w_A * RKD-A`` on logits or embeddings (arXiv 1904.05068)."""
    terms = []
    if distance_weight:
        terms.append((distance_weight, rkd_distance_term(student_path, teacher_path)))
    if angle_weight:
        terms.append((angle_weight, rkd_angle_term(student_path, teacher_path)))
    if not terms:
        raise ValueError("rkd needs distance_weight or angle_weight > 0")
    return weighted_sum(loss_fn, teacher_fn, terms)
