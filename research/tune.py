"""``slimjax tune``: a :class:`research.automl.Study` drives runs of a config.

A config file may define ``get_space(arg=None)`` next to ``get_config``, returning a
:class:`research.automl.Space` whose parameter names are the dotted keys that ``slimjax run --set``
accepts (``stages.train.learning_rate``, ``stages.prune.sparsity``, ``model.options.widths``...);
``when=`` conditions make a key active only under a parent choice. :func:`tune` then asks the
study for points, turns each into ``--set`` overrides (validated exactly as ``--set`` values are,
before anything trains), runs it with :func:`research.run.run` and tells the study the objectives
read from the run's report (validation accuracy, bytes, FLOPs, latency; never test accuracy)::

    WORKDIR/study.db                    the study (SQLite; the durable record of every trial)
    WORKDIR/tune_setup.json             what the study was started with (a rerun must match)
    WORKDIR/trials/<n>/                 trial n's run directory (config.json, stages/, report.json)
    WORKDIR/trials/<n>/b<budget>/       ... one per budget with --budget-key (a promotion continues
                                        from the previous budget's checkpoint)
    WORKDIR/trials/<n>/trial.json       overrides, objectives, constraints, compile/run seconds, error
    WORKDIR/tune.json, tune.txt         every trial, the Pareto set, hypervolume, parameter importance
    WORKDIR/pareto.png, history.png, hypervolume.png
    WORKDIR/best/trial_<n>.py           a config file per best (single objective) or Pareto trial;
                                        ``slimjax run best/trial_<n>.py`` reruns it

Resuming and workers: every ask and tell happens under a file lock in the workdir, and each worker
holds a lock file for its life, so a trial whose worker died (killed, machine rebooted) is seen as
orphaned by the next worker or rerun: it is retried in its run directory (which resumes from the
run's checkpoints) up to ``max_retries`` times, then marked failed. ``workers=K`` starts ``K - 1``
more processes on the same study; no trial is asked twice, none is lost, and scheduler promotions
are decided by one process at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np

from research import config as config_lib
from research import report as report_lib
from research import workdir as workdir_lib
from research.automl import ASHA
from research.automl import Hyperband
from research.automl import SQLiteStorage
from research.automl import Study
from research.automl import make_sampler
from research.automl.hypervolume import hypervolume
from research.automl.samplers import SAMPLERS
from research.automl.samplers import list_samplers
from research.automl.samplers import nondominated_rank
from research.automl.space import Categorical
from research.automl.space import Int
from research.automl.space import Space
from research.automl.trial import Trial
from research.automl.trial import TrialState
from research.registry import did_you_mean

SCHEDULERS = ("asha", "hyperband")
_ALIASES = {"val_acc": "val_accuracy", "latency": "latency_ms", "bytes_best": "bytes"}


# ----------------------------------------------------------------------------- objectives


@dataclasses.dataclass(frozen=True)
class Objective:
    """A run-report metric to maximise or minimise.

    Attributes:
      name: a key of the final stage's metrics (``val_accuracy``, ``flops``, ``latency_ms``, ...) or
        ``bytes`` (the smallest encoding the run reported, :func:`research.report.best_bytes`).
      direction: ``"max"`` or ``"min"``.
    """

    name: str
    direction: str

    @classmethod
    def parse(cls, text: str) -> Objective:
        """``"val_accuracy:max"`` -> ``Objective("val_accuracy", "max")``.

        Raises:
          ConfigError: no ``:max``/``:min``, or a test metric (test accuracy is only reported).
        """
        name, sep, direction = text.strip().rpartition(":")
        if not sep or direction not in ("max", "min") or not name:
            raise config_lib.ConfigError(
                f"objective {text!r} is not NAME:max or NAME:min (e.g. val_accuracy:max, bytes:min)"
            )
        name = _ALIASES.get(name, name)
        if reads_test_split(name):
            use = name.replace("test_", "val_", 1) if name.startswith("test_") else "a val_ metric, e.g. 'val_accuracy'"
            raise config_lib.ConfigError(
                f"objective {name!r} reads the test split, which is only reported, never tuned on; use {use!r}"
                if name.startswith("test_")
                else f"objective {name!r} reads the test split, which is only reported, never tuned on; use {use}"
            )
        return cls(name, direction)

    @property
    def study_direction(self) -> str:
        return "maximize" if self.direction == "max" else "minimize"

    def __str__(self) -> str:
        return f"{self.name}:{self.direction}"


@dataclasses.dataclass(frozen=True)
class Constraint:
    """A bound on a run-report metric (``bytes<=20000``); trials that break it are never on the front."""

    name: str
    op: str
    bound: float

    @classmethod
    def parse(cls, text: str) -> Constraint:
        """``"bytes<=20000"`` -> ``Constraint("bytes", "<=", 20000.0)``.

        Raises:
          ConfigError: not ``NAME<=NUMBER`` or ``NAME>=NUMBER``, or a test metric.
        """
        for op in ("<=", ">="):
            name, sep, bound = text.partition(op)
            if sep:
                try:
                    value = float(bound)
                except ValueError:
                    break
                name = _ALIASES.get(name.strip(), name.strip())
                if reads_test_split(name):
                    raise config_lib.ConfigError(f"constraint {text!r} reads the test split; use a val_ metric")
                return cls(name, op, value)
        raise config_lib.ConfigError(f"constraint {text!r} is not NAME<=NUMBER or NAME>=NUMBER (e.g. bytes<=20000)")

    def holds(self, value: float) -> bool:
        return value <= self.bound if self.op == "<=" else value >= self.bound

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.bound:g}"


def reads_test_split(name: str) -> bool:
    """Whether metric ``name`` is measured on the test split (``test_accuracy``, an exported
    artifact's ``tflite_int8_test_accuracy``): reported, never an objective or a constraint."""
    return re.search(r"(^|_)test(_|$)", name) is not None


class UnknownMetricError(config_lib.ConfigError, KeyError):
    """An objective or constraint names a metric the pipeline's final stage does not report.

    Every trial runs the same stages, so this is a config error: the study stops at the first
    finished trial instead of training every trial to the same failure."""

    def __str__(self) -> str:  # KeyError would print the message in quotes.
        return str(self.args[0]) if self.args else ""


def metric_value(metrics: Mapping[str, Any], name: str) -> float:
    """The value of ``name`` in a stage's metrics (``bytes`` is the best encoding).

    Raises:
      UnknownMetricError: the metric is absent (names the closest one and lists those reported).
    """
    if name == "bytes":
        return float(report_lib.best_bytes(dict(metrics)))
    if name not in metrics or not isinstance(metrics[name], (int, float)):
        have = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not reads_test_split(k))
        raise UnknownMetricError(
            f"the run's final stage reported no metric {name!r};{did_you_mean(name, [*have, 'bytes'])} "
            f"it reported {have} and 'bytes' (fix --objective / --constraint; a study keeps its objectives, so rerun with a new --workdir)"
        )
    return float(metrics[name])


# ----------------------------------------------------------------------------- space <-> config


def config_keys(config: config_lib.Config) -> list[str]:
    """Every dotted key ``--set`` accepts for ``config`` (stages by kind where unique, and by index).

    ``model.options.<option>`` lists the options of the config's model; ``data.options`` is free-form.
    """
    from research.nn import model_kwargs

    keys: list[str] = []

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            elif f.name == "stages":
                kinds = [getattr(s, "kind", "") for s in value]
                for i, stage in enumerate(value):
                    names = [str(i)] + ([stage.kind] if kinds.count(stage.kind) == 1 else [])
                    for n in names:
                        walk(stage, f"{prefix}stages.{n}.")
            else:
                keys.append(prefix + f.name)

    walk(config, "")
    try:
        keys += [f"model.options.{k}" for k in model_kwargs(config.model.name)]
    except KeyError:
        pass
    return sorted(set(keys))


def _literal(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return value


def point_overrides(space: Space, params: Mapping[str, Any]) -> list[str]:
    """The ``key=value`` ``--set`` items of a sampled point, in the space's order (parents first).

    String choices that parse as Python literals (``"[64, 32]"``) are passed as that literal, so a
    categorical can choose list-valued fields such as ``model.options.widths``.
    """
    out = []
    for name in space.names:
        if name in params and not name.startswith(POLICY_PREFIX):
            value = _literal(params[name])
            out.append(f"{name}={value if isinstance(value, str) else repr(value)}")
    return out


def point_config(
    config: config_lib.Config, space: Space, params: Mapping[str, Any], policies: Sequence[LayerPolicy] = ()
) -> config_lib.Config:
    """``config`` with a sampled point applied, validated exactly as ``slimjax run --set`` values are.

    Per-layer ``policies`` turn their ``policy.*`` parameters into rules (repaired to their budget).

    Raises:
      ConfigError: a value the config refuses (names the key and value), or a policy budget that
        cannot be met.
    """
    return _apply_point(config, space, params, policies)[0]


def _apply_point(config, space, params, policies):
    """``(config, --set overrides, {policy key: (rules, repaired values)})`` of a point."""
    overrides = point_overrides(space, params)
    applied = {}
    try:
        cfg = config_lib.apply_overrides(config, overrides)
        for policy in policies:
            cfg, values = policy.apply(cfg, params)
            applied[policy.key] = (_get_key(cfg, policy.key), values)
        config_lib.validate(cfg)
    except config_lib.ConfigError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise config_lib.ConfigError(f"point {dict(params)} is not a valid config: {e}") from e
    return cfg, overrides, applied


def _representative(space: Space, name: str) -> dict[str, Any]:
    """A point activating ``name``: its lowest value, its parents at their first allowed value."""
    p = space[name]
    value = p.choices[0] if isinstance(p, Categorical) else p.low
    point = {name: value}
    for parent, allowed in p.when or ():
        point.update(_representative(space, parent))
        point[parent] = allowed[0]
    return point


def check_space(config: config_lib.Config, space: Space, policies: Sequence[LayerPolicy] = ()) -> None:
    """Checks, before anything trains, that every parameter of ``space`` is a config key.

    Each parameter (with its parents set so it is active) is applied to ``config`` as a ``--set``
    value and the result validated.

    Raises:
      ConfigError: a name that is not a ``--set`` key (lists the valid keys), or a value the config
        refuses.
    """
    if not isinstance(space, Space):
        raise config_lib.ConfigError(f"get_space() returned {type(space).__name__}; return a research.automl.Space")
    if not len(space):
        raise config_lib.ConfigError("the search space is empty; add parameters named by --set keys")
    valid = config_keys(config)
    claimed = {n for p in policies for n in p.names}
    unclaimed = [n for n in space.names if n.startswith(POLICY_PREFIX) and n not in claimed]
    if unclaimed:
        raise config_lib.ConfigError(
            f"search-space keys {unclaimed[:3]} name per-layer policy values that no policy provides; "
            "pass the LayerPolicy (tune(policies=...) or get_policies() in the config file)"
        )
    missing = sorted(claimed - set(space.names))
    if missing:
        raise config_lib.ConfigError(f"the space lacks policy parameters {missing[:3]}; merge policy.parameters()")
    if policies:
        point = {}
        for name in claimed:
            point.update(_representative(space, name))
        try:
            _apply_point(config, space, point, policies)
        except config_lib.ConfigError as e:
            raise config_lib.ConfigError(f"per-layer policies: {e}") from e
    for name in space.names:
        if name in claimed:
            continue
        point = _representative(space, name)
        try:
            config_lib.apply_overrides(config, [f"{name}=0"])
        except config_lib.ConfigError as e:
            if "must be" not in str(e) and "matches none" not in str(e) and "should be" not in str(e):
                raise config_lib.ConfigError(
                    f"search-space key {name!r} is not a config key ({e}); valid keys: {valid}"
                ) from e
        try:
            point_config(config, space, point)
        except config_lib.ConfigError as e:
            raise config_lib.ConfigError(f"search-space key {name!r}: {e}; valid keys: {valid}") from e


def _config_module(spec: str):
    """The module of a config file that :func:`research.config.load_config` has loaded."""
    path = spec.partition(":")[0]
    module = sys.modules.get("slimjax_config_" + os.path.splitext(os.path.basename(path))[0])
    if module is None:  # load_config registers the module under this name; load it ourselves if not
        module_spec = importlib.util.spec_from_file_location("slimjax_space_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    return module


def load_policies(spec: str) -> list[LayerPolicy]:
    """The per-layer policies of a config file's ``get_policies(arg)`` (``[]`` when it has none).

    Raises:
      ConfigError: ``get_policies`` returns something other than LayerPolicy objects.
    """
    path, _, arg = spec.partition(":")
    module = _config_module(spec)
    if not hasattr(module, "get_policies"):
        return []
    policies = list(module.get_policies(arg or None))
    bad = [type(p).__name__ for p in policies if not isinstance(p, LayerPolicy)]
    if bad:
        raise config_lib.ConfigError(
            f"{path}:get_policies returned {bad}; return research.tune.layer_policy(...) objects"
        )
    return policies


def load_config_and_space(spec: str) -> tuple[config_lib.Config, Space]:
    """Loads ``path/to/config.py[:arg]``: ``get_config(arg)`` and ``get_space(arg)``.

    Raises:
      ConfigError: the file has no ``get_space`` or it does not return a Space.
    """
    config = config_lib.load_config(spec)
    path, _, arg = spec.partition(":")
    module = _config_module(spec)
    if not hasattr(module, "get_space"):
        raise config_lib.ConfigError(
            f"config file {path!r} has no get_space(arg=None); define one returning a research.automl.Space "
            "whose names are --set keys, e.g. Space({'stages.train.learning_rate': Float(1e-4, 1e-2, log=True)})"
        )
    space = module.get_space(arg or None)
    if not isinstance(space, Space):
        raise config_lib.ConfigError(
            f"{path}:get_space returned {type(space).__name__}, expected research.automl.Space"
        )
    return config, space


# ----------------------------------------------------------------------------- per-layer policies


@dataclasses.dataclass(frozen=True)
class LayerPolicy:
    """One search parameter per layer (sparsity, bits, ...) and the rules that consume them.

    Its parameters are named ``policy.<field>.<layer>``; :meth:`apply` turns a point's values into
    one rule per layer (``rule(pattern="^<layer>$", <field>=value)``), placed in the config field
    ``key`` (e.g. ``stages.prune.rules``) before ``extra_rules``. With ``budget_bytes`` a point
    whose modelled size exceeds the budget is repaired before it trains (AMC's scaling of
    per-layer ratios): see :meth:`repair`. Build one with :func:`layer_policy`.

    Attributes:
      key: the ``--set`` key of the rules tuple the policy fills.
      rule: the rule class (``methods.pruning.SparsityRule``, ``methods.quantization.QuantRule``).
      field: the rule field searched per layer (``"sparsity"``, ``"bits"``).
      layers: the rule targets (leaf paths such as ``conv1/kernel``, or module paths such as ``conv1``).
      sizes: weights per layer.
      domain: the per-layer search domain (``Float`` for ratios, ``Categorical``/``Int`` for bits).
      budget_bytes: the size budget the repair meets, or ``None``.
      bits: bits per kept weight when ``field`` is a sparsity (32 for fp32, 8 after int8 quantization).
      extra_rules: rules appended after the per-layer ones.
    """

    key: str
    rule: type
    field: str
    layers: tuple[str, ...]
    sizes: tuple[int, ...]
    domain: Any
    budget_bytes: float | None = None
    bits: int = 32
    extra_rules: tuple[Any, ...] = ()

    @property
    def names(self) -> list[str]:
        return [f"policy.{self.field}.{layer}" for layer in self.layers]

    def parameters(self) -> dict[str, Any]:
        """``{name: domain}`` to merge into a :class:`~research.automl.Space`."""
        return {n: self.domain for n in self.names}

    def values(self, params: Mapping[str, Any]) -> list[Any]:
        """The per-layer values of a point, in layer order.

        Raises:
          ConfigError: a layer's parameter is missing from the point.
        """
        missing = [n for n in self.names if n not in params]
        if missing:
            raise config_lib.ConfigError(f"the point lacks the policy parameters {missing}; add policy.parameters()")
        return [params[n] for n in self.names]

    def cost(self, values: Sequence[Any]) -> float:
        """Modelled bytes of the layers: kept weights x ``bits`` / 8, or weights x bits / 8."""
        n = np.asarray(self.sizes, float)
        v = np.asarray(values, float)
        if self.field == "bits":
            return float(np.sum(n * v) / 8)
        return float(np.sum(n * (1.0 - v)) * self.bits / 8)

    def repair(self, values: Sequence[Any]) -> list[Any]:
        """Values meeting ``budget_bytes``: unchanged if they do, else scaled to meet it.

        Sparsities: every layer's kept fraction is scaled by one factor (clipped to the domain),
        found by bisection, so the modelled size equals the budget. Bits: the layer whose next
        lower bit width saves the most bytes is lowered, repeatedly, until the size fits.

        Raises:
          ConfigError: even the smallest values of the domain exceed the budget.
        """
        values = [_literal(v) for v in values]
        if self.budget_bytes is None or self.cost(values) <= self.budget_bytes:
            return values
        if self.field == "bits":
            choices = sorted(
                self.domain.choices
                if isinstance(self.domain, Categorical)
                else range(self.domain.low, self.domain.high + 1)
            )
            out = list(values)
            while self.cost(out) > self.budget_bytes:
                best, saving = None, 0.0
                for i, b in enumerate(out):
                    lower = [c for c in choices if c < b]
                    if lower and self.sizes[i] * (b - lower[-1]) > saving:
                        best, saving = i, self.sizes[i] * (b - lower[-1])
                if best is None:
                    raise config_lib.ConfigError(
                        f"no bit widths in {choices} fit {self.budget_bytes:g} bytes; raise the budget"
                    )
                out[best] = max(c for c in choices if c < out[best])
            return out
        lo, hi = (self.domain.low, self.domain.high) if hasattr(self.domain, "low") else (0.0, 0.99)
        keep = 1.0 - np.asarray(values, float)

        def size(alpha: float) -> float:
            return self.cost(1.0 - np.clip(alpha * keep, 1.0 - hi, 1.0 - lo))

        if size(0.0) > self.budget_bytes:
            raise config_lib.ConfigError(
                f"even sparsity {hi} in every layer gives {size(0.0):,.0f} bytes > budget {self.budget_bytes:,.0f}; "
                "raise the budget or the domain's upper bound"
            )
        a, b = 0.0, 1.0
        for _ in range(60):
            mid = 0.5 * (a + b)
            a, b = (mid, b) if size(mid) <= self.budget_bytes else (a, mid)
        return [float(v) for v in 1.0 - np.clip(a * keep, 1.0 - hi, 1.0 - lo)]

    def apply(self, config: config_lib.Config, params: Mapping[str, Any]) -> tuple[config_lib.Config, list[Any]]:
        """``(config with the per-layer rules, the repaired values)``."""
        values = self.repair(self.values(params))
        rules = tuple(
            self.rule(pattern="^" + re.escape(layer) + "$", **{self.field: v})
            for layer, v in zip(self.layers, values, strict=True)
        )
        parts = self.key.split(".")
        new = config_lib._set(config, parts, rules + tuple(self.extra_rules), self.key)  # noqa: SLF001 - --set's setter
        return new, values


def layer_policy(
    config: config_lib.Config,
    *,
    key: str,
    rule: type,
    field: str,
    domain: Any,
    module_paths: bool = False,
    budget_bytes: float | None = None,
    bits: int = 32,
    extra_rules: Sequence[Any] = (),
    include: str = r"(^|/)kernel$",
) -> LayerPolicy:
    """A :class:`LayerPolicy` over the prunable/quantizable layers of ``config``'s model.

    The layers are the model's parameters whose path matches ``include`` (every Linear/Conv
    kernel by default), as the pruning rules see them (``conv1/kernel``), or their module paths
    (``conv1``) with ``module_paths=True`` for quantization rules.

    Example:
      In a config file (``get_policies`` next to ``get_space``; ``SparsityRule`` is the pruning
      package's rule class)::

        def get_policies(arg=None):
            return [tune.layer_policy(get_config(arg), key="stages.prune.rules", rule=SparsityRule,
                                      field="sparsity", domain=Float(0.0, 0.95), budget_bytes=8000)]
    """
    layers, sizes = [], []
    for path, size in _param_sizes(config_lib.to_json(config), config):
        if re.search(include, path):
            layers.append(path.rsplit("/", 1)[0] if module_paths else path)
            sizes.append(size)
    if not layers:
        raise config_lib.ConfigError(f"no parameter of {config.model.name!r} matches include={include!r}")
    policy = LayerPolicy(key, rule, field, tuple(layers), tuple(sizes), domain, budget_bytes, bits, tuple(extra_rules))
    try:
        config_lib.validate(policy.apply(config, {n: _domain_low(domain) for n in policy.names})[0])
    except (ValueError, KeyError, TypeError) as e:
        raise config_lib.ConfigError(f"policy key {key!r}: {e}; valid keys: {config_keys(config)}") from e
    return policy


_SIZES: dict[str, list[tuple[str, int]]] = {}


def _param_sizes(key: str, config: config_lib.Config) -> list[tuple[str, int]]:
    """``(path, size)`` of every parameter of ``config``'s model (shapes only; cached per config)."""
    if key not in _SIZES:
        from flax import nnx

        from research.nn import build_model
        from research.run import load_data
        from research.tree import flatten_with_paths

        ds = load_data(config)

        def build():
            options = dict(config.model.options)
            return build_model(config.model.name, input_shape=ds.input_shape, num_classes=ds.num_classes,
                               rngs=nnx.Rngs(config.seed), **options)  # fmt: skip

        model = nnx.eval_shape(build)  # nothing is initialised
        leaves = flatten_with_paths(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        _SIZES[key] = [(path, math.prod(leaf.shape)) for path, leaf in leaves]
    return _SIZES[key]


def _domain_low(domain: Any) -> Any:
    return domain.choices[0] if isinstance(domain, Categorical) else domain.low


# ----------------------------------------------------------------------------- Pareto, hypervolume, importance


def importance(space: Space, params: Sequence[Mapping[str, Any]], values: Sequence[float]) -> dict[str, float]:
    """How much of an objective's variance each parameter explains on its own (correlation ratio).

    Each parameter's values are grouped (by choice for categoricals and small int ranges, else into
    up to four quantile bins of at least three trials) and ``eta^2 = between-group variance / total
    variance`` is computed over the trials where the parameter is active. A first-order screen, like
    the marginals fANOVA starts from.

    Returns:
      ``{name: eta^2 in [0, 1]}`` for parameters with at least 4 active trials and at least two
      trials per group on average.
    """
    y_all = np.asarray(values, float)
    out = {}
    for name in space.names:
        rows = [(p[name], y) for p, y in zip(params, y_all, strict=True) if name in p and math.isfinite(y)]
        if len(rows) < 4:
            continue
        x = [r[0] for r in rows]
        y = np.array([r[1] for r in rows])
        total = float(np.sum((y - y.mean()) ** 2))
        if total <= 0:
            out[name] = 0.0
            continue
        p = space[name]
        if isinstance(p, Categorical) or (isinstance(p, Int) and p.high - p.low < 6):
            groups = [json.dumps(v) for v in x]
        else:
            xs = np.array(x, float)
            bins = min(4, max(2, len(xs) // 3))
            edges = np.quantile(xs, np.arange(1, bins) / bins)
            groups = list(np.searchsorted(edges, xs, side="right"))
        if len(set(groups)) > len(y) / 2:
            continue  # too few trials per group: eta^2 would be near 1 by construction
        between = 0.0
        for g in set(groups):
            sel = np.array([gg == g for gg in groups])
            between += sel.sum() * (y[sel].mean() - y.mean()) ** 2
        out[name] = float(between / total)
    return out


# ----------------------------------------------------------------------------- compile-time accounting

POLICY_PREFIX = "policy."


def _get_key(config: config_lib.Config, key: str) -> Any:
    return _current_value(config, key)


_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_compile_seconds = [0.0]
_listening = [False]


def _listen_compile_time() -> None:
    if _listening[0]:
        return
    from jax import monitoring

    def listener(event: str, duration: float, **_: Any) -> None:
        if event in _COMPILE_EVENTS:
            _compile_seconds[0] += duration

    monitoring.register_event_duration_secs_listener(listener)
    _listening[0] = True


_CACHE_OPTIONS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


def enable_compilation_cache(directory: str) -> dict[str, Any]:
    """Turns on JAX's persistent compilation cache for every program, however fast it compiles.

    Trials of the same shapes then load compiled programs from disk instead of compiling them,
    also across worker processes and reruns of the study. A cache directory the user already set
    (``JAX_COMPILATION_CACHE_DIR``) is kept; else ``directory`` is used.

    Returns:
      The previous settings, for :func:`restore_compilation_cache`.
    """
    import jax

    previous = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
    if not previous["jax_compilation_cache_dir"]:
        os.makedirs(directory, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _reset_cache()
    return previous


def _cache_dir() -> str | None:
    import jax

    return jax.config.jax_compilation_cache_dir


def restore_compilation_cache(previous: Mapping[str, Any]) -> None:
    """Puts back the settings :func:`enable_compilation_cache` changed."""
    import jax

    for name, value in previous.items():
        jax.config.update(name, value)
    _reset_cache()


def _reset_cache() -> None:
    try:  # a process that compiled before the directory was set initialised the cache without it
        from jax._src import compilation_cache

        compilation_cache.reset_cache()
    except (ImportError, AttributeError):
        pass


# ----------------------------------------------------------------------------- locks


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive ``flock`` on ``path`` for the ``with`` block (waits for other processes)."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _owner_alive(workdir: str, token: str) -> bool:
    """Whether the worker holding ``workers/<token>.lock`` is still alive (it holds the flock)."""
    path = os.path.join(workdir, "workers", f"{token}.lock")
    if not os.path.exists(path):
        return False
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    return False


# ----------------------------------------------------------------------------- setup


@dataclasses.dataclass(frozen=True)
class TuneSetup:
    """Everything a worker needs to run trials of one study (written to ``tune_setup.json``)."""

    space: dict[str, Any]
    objectives: tuple[str, ...]
    constraints: tuple[str, ...] = ()
    sampler: str = "tpe"
    seed: int = 0
    scheduler: str | None = None
    budget_key: str | None = None
    min_budget: float | None = None
    max_budget: float | None = None
    eta: int = 3
    config_json: str = ""
    config_spec: str | None = None
    set_overrides: tuple[str, ...] = ()

    def matches(self, other: TuneSetup) -> list[str]:
        """Names of the fields that differ from ``other`` (a rerun must not change the study)."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, obj: Any) -> None:
    report_lib.write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return str(x)


# ----------------------------------------------------------------------------- the worker


class _Worker:
    """Runs trials of one study until the study has ``trials`` configurations and none is running."""

    def __init__(
        self,
        config: config_lib.Config,
        space: Space,
        workdir: str,
        setup: TuneSetup,
        *,
        trials: int,
        max_retries: int = 1,
        progress: bool = False,
        echo: bool = True,
        policies: Sequence[LayerPolicy] = (),
        plot_every: int = 1,
    ):
        self.config, self.space, self.workdir, self.setup = config, space, workdir, setup
        self.plot_every, self.finished = plot_every, 0
        self.policies = tuple(policies)
        self.n_trials, self.max_retries, self.progress, self.echo = trials, max_retries, progress, echo
        self.objectives = [Objective.parse(o) for o in setup.objectives]
        self.constraints = [Constraint.parse(c) for c in setup.constraints]
        self.lock_path = os.path.join(workdir, "study.lock")
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.study = open_study(workdir, setup, space)
        os.makedirs(os.path.join(workdir, "workers"), exist_ok=True)
        self._life = open(os.path.join(workdir, "workers", f"{self.token}.lock"), "a+")  # noqa: SIM115
        fcntl.flock(self._life, fcntl.LOCK_EX)
        self.budget_stage = _budget_stage(config, setup.budget_key)

    def close(self) -> None:
        path = self._life.name
        fcntl.flock(self._life, fcntl.LOCK_UN)
        self._life.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)

    def say(self, text: str) -> None:
        if self.echo:
            print(f"tune: {text}", file=sys.stderr, flush=True)

    # -- choosing the next job, under the study lock
    def _next(self) -> tuple[Trial | None, bool]:
        """``(trial to run, stop)``: an orphan to retry, a promotion, a new trial; or wait/stop."""
        trials = self.study.trials
        for t in trials:
            if t.state != TrialState.RUNNING:
                continue
            info = _trial_info(self.workdir, t.number)
            owner = info.get("owner")
            if owner == self.token or (owner and _owner_alive(self.workdir, owner)):
                continue
            attempts = int(info.get("attempts", 0))
            if attempts > self.max_retries:
                err = RuntimeError(f"the worker running trial {t.number} died {attempts} times; marked failed")
                self.study.tell(t, exception=err)
                _update_info(self.workdir, t.number, {"error": str(err), "status": "FAILED"})
                self.say(f"trial {t.number}: {err}")
                return None, False
            self.say(f"trial {t.number}: its worker died; retrying it (attempt {attempts + 1})")
            _update_info(self.workdir, t.number, {"owner": self.token, "attempts": attempts + 1})
            return t, False
        n_configs = len(trials)
        running = any(t.state == TrialState.RUNNING for t in trials)
        if n_configs >= self.n_trials:
            if self.study.scheduler is None:
                return None, True
            jobs, _ = self.study.scheduler.plan(trials, 1)
            if jobs[0].trial_id is None:  # only new configurations left to start
                return None, not running
        (trial,) = self.study.ask()
        fresh = {"owner": self.token, "attempts": 1, "params": dict(trial.params), "error": None, "traceback": None}
        _update_info(self.workdir, trial.number, fresh)
        return trial, False

    def loop(self) -> None:
        while True:
            with _locked(self.lock_path):
                trial, stop = self._next()
            if stop:
                return
            if trial is None:
                time.sleep(0.5)
                continue
            values, error, info = self.evaluate(trial)
            self._tell(trial, values, error, info)

    def _penalized(self, values: Sequence[float], info: Mapping[str, Any]) -> list[float]:
        """What the sampler is told for an infeasible trial: worse than every feasible trial.

        Each objective becomes the worst of its own value and the feasible trials' values, made
        worse by the relative constraint violation times the objectives' spread, so samplers learn
        to avoid infeasible regions (and more violation ranks lower). The real metrics stay in
        ``trial.json``, ``tune.json`` and the tables.
        """
        sign = np.array([-1.0 if o.direction == "max" else 1.0 for o in self.objectives])
        own = sign * np.asarray(values, float)
        feasible = []
        for t in self.study.trials:
            if t.state == TrialState.COMPLETE and t.values is not None:
                if _trial_info(self.workdir, t.number).get("feasible", True):
                    feasible.append(sign * np.asarray(t.values, float))
        allv = np.array([own, *feasible])
        spread = np.where(allv.max(0) > allv.min(0), allv.max(0) - allv.min(0), np.abs(own) + 1.0)
        metrics = info.get("metrics", {})
        violation = 0.0
        for c in self.constraints:
            v = metric_value(metrics, c.name)
            excess = v - c.bound if c.op == "<=" else c.bound - v
            violation += max(excess, 0.0) / max(abs(c.bound), 1e-12)
        worst = allv.max(0) + spread * min(violation, 10.0) + 1e-9 * spread
        return [float(x) for x in sign * worst]

    # -- one evaluation
    def evaluate(self, trial: Trial) -> tuple[list[float] | None, BaseException | None, dict[str, Any]]:
        """Runs one trial; ``(objective values, exception, info for trial.json)``."""
        from research.run import run

        _listen_compile_time()
        info: dict[str, Any] = {"number": trial.number, "params": dict(trial.params), "worker": self.token}
        t0, c0 = time.perf_counter(), _compile_seconds[0]
        try:
            cfg, run_dir = self._prepare(trial, info)
            twin = self._finished_twin(cfg, trial, info)
            if twin is not None:  # the same config finished before: same seed, same numbers
                values, error = self._reuse(twin, info)
            else:
                report = run(cfg, run_dir, progress=self.progress, echo=False)
                values, error = self._finish(report, info)
        except UnknownMetricError:  # the same in every trial: stop the study (the run is kept)
            raise
        except Exception as e:  # a failed trial is recorded and the study goes on
            values, error = None, self._failed(trial, e, info)
        seconds = time.perf_counter() - t0
        compile_s = _compile_seconds[0] - c0
        info["seconds"] = seconds
        info["compile_seconds"] = compile_s
        info["run_seconds"] = max(seconds - compile_s, 0.0)
        return values, error, info

    def _prepare(self, trial: Trial, info: dict[str, Any]) -> tuple[config_lib.Config, str]:
        """The trial's config and run directory (recording its overrides and rules in ``info``)."""
        tdir = _trial_dir(self.workdir, trial.number)
        cfg, overrides, applied = _apply_point(self.config, self.space, trial.params, self.policies)
        if applied:
            info["rules"] = {k: [repr(r) for r in rules] for k, (rules, _) in applied.items()}
            info["rule_imports"] = sorted(
                {(type(r).__module__, type(r).__qualname__) for rules, _ in applied.values() for r in rules}
            )
            info["repaired"] = {n: v for p in self.policies for n, v in zip(p.names, applied[p.key][1], strict=True)}
        run_dir = tdir
        if trial.budget is not None:
            budget = _budget_value(self.config, self.setup.budget_key, trial.budget)
            overrides.append(f"{self.setup.budget_key}={budget!r}")
            cfg = config_lib.apply_overrides(cfg, [overrides[-1]])
            config_lib.validate(cfg)
            run_dir = os.path.join(tdir, f"b{budget}")
            resumed = _continue_from_previous(tdir, run_dir, cfg, self.budget_stage, budget)
            if resumed is not None:
                info["resumed_from"] = resumed
        info["overrides"] = overrides
        info["run_dir"] = os.path.relpath(run_dir, self.workdir)
        return cfg, run_dir

    def _finished_twin(self, cfg: config_lib.Config, trial: Trial, info: dict[str, Any]) -> dict[str, Any] | None:
        """The ``trial.json`` of an earlier complete trial whose config is exactly ``cfg``, if any.

        Different points can become one config: a per-layer policy repairs them to the same rules
        (in an AMC/HAQ-style search most points over the budget land on a few), or a parameter
        decodes to the same value. A run is deterministic in its config, so the earlier trial's
        metrics are this trial's; training it again would only cost time. Multi-fidelity trials
        (a budget) always run: their checkpoints are what a promotion continues from.
        """
        digest = hashlib.sha256(config_lib.to_json(cfg).encode()).hexdigest()[:16]
        info["config_digest"] = digest
        if trial.budget is not None:
            return None
        root = os.path.join(self.workdir, "trials")
        for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            if not name.isdigit() or int(name) == trial.number:
                continue
            other = _trial_info(self.workdir, int(name))
            if (
                other.get("config_digest") == digest
                and other.get("status") == "COMPLETE"
                and other.get("objectives") is not None
                and "metrics" in other
            ):
                return other
        return None

    def _reuse(self, twin: Mapping[str, Any], info: dict[str, Any]) -> tuple[list[float], None]:
        """This trial's values and info from its finished twin (no run directory of its own)."""
        info["duplicate_of"] = twin["number"]
        info["run_dir"] = twin["run_dir"]
        info["metrics"] = dict(twin["metrics"])
        info["objectives"] = list(twin["objectives"])
        info["feasible"] = twin.get("feasible", True)
        return list(twin["objectives"]), None

    def _finish(self, report: Mapping[str, Any], info: dict[str, Any]) -> tuple[list[float] | None, Exception | None]:
        """``(objective values, error)`` read from a finished run's report (metrics into ``info``)."""
        metrics = report["stages"][-1]["metrics"]
        values = [metric_value(metrics, o.name) for o in self.objectives]
        info["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        info["metrics"]["bytes"] = metric_value(metrics, "bytes")
        info["objectives"] = values
        info["feasible"] = all(c.holds(metric_value(metrics, c.name)) for c in self.constraints)
        if not all(math.isfinite(v) for v in values):
            bad = {o.name: v for o, v in zip(self.objectives, values, strict=True) if not math.isfinite(v)}
            error = FloatingPointError(f"objective(s) not finite: {bad}")
            info["error"] = str(error)
            return None, error
        return values, None

    def _failed(self, trial: Trial, e: BaseException, info: dict[str, Any], tb: str | None = None) -> BaseException:
        tdir = _trial_dir(self.workdir, trial.number)
        os.makedirs(tdir, exist_ok=True)
        tb = tb or traceback.format_exc()
        report_lib.write_text_atomic(os.path.join(tdir, "error.txt"), tb)
        info["error"] = f"{type(e).__name__}: {e}"
        info["traceback"] = tb
        return e

    # -- a batch through an executor (population)
    def _next_batch(self, q: int) -> tuple[list[Trial], bool]:
        """``(trials, stop)``: an orphan alone, or up to ``q`` new trials asked as one batch."""
        trial, stop = self._next()
        if trial is None:
            return [], stop
        if _trial_info(self.workdir, trial.number).get("attempts", 1) > 1 or q <= 1:
            return [trial], False
        room = self.n_trials - len(self.study.trials)
        batch = [trial]
        if room > 0:
            for t in self.study.ask(min(q - 1, room)):
                fresh = {"owner": self.token, "attempts": 1, "params": dict(t.params), "error": None, "traceback": None}
                _update_info(self.workdir, t.number, fresh)
                batch.append(t)
        return batch, False

    def loop_batches(self, executor: Any, q: int) -> None:
        """Runs the study ``q`` trials at a time through ``executor`` (the sampler's batch suggestion)."""
        from research.executors import Job

        while True:
            with _locked(self.lock_path):
                batch, stop = self._next_batch(q)
            if stop:
                return
            if not batch:
                time.sleep(0.5)
                continue
            infos, jobs, results = {}, [], {}
            for trial in batch:
                info = {"number": trial.number, "params": dict(trial.params), "worker": self.token}
                infos[trial.number] = info
                try:
                    cfg, run_dir = self._prepare(trial, info)
                    jobs.append(Job(key=trial.number, config=cfg, run_dir=run_dir))
                except Exception as e:  # a config the space allows but the run refuses
                    results[trial.number] = (None, self._failed(trial, e, info))
                    info.update(seconds=0.0, compile_seconds=0.0, run_seconds=0.0)
            by_number = {t.number: t for t in batch}
            for number in list(results):
                self._tell(by_number[number], *results[number], infos[number])
            for out in executor.run(jobs, progress=self.progress):
                self._told(out, by_number[out.job.key], infos[out.job.key])
            _write_json(os.path.join(self.workdir, "executor.json"), executor.summary())

    def loop_async(self, executor: Any) -> None:
        """Keeps every slot of ``executor`` busy (the Ray executor): asks the sampler for as many
        trials as slots are free, submits them, and as each one finishes tells the study and asks
        for the next. The study and its lock stay in this process."""
        from research.executors import Job

        slots = executor.slots()
        running: dict[int, tuple[Trial, dict[str, Any]]] = {}
        try:
            while True:
                stop = False
                if len(running) < slots:
                    with _locked(self.lock_path):
                        batch, stop = self._next_batch(slots - len(running))
                    for trial in batch:
                        info = {"number": trial.number, "params": dict(trial.params), "worker": self.token}
                        try:
                            cfg, run_dir = self._prepare(trial, info)
                        except Exception as e:  # a config the space allows but the run refuses
                            info.update(seconds=0.0, compile_seconds=0.0, run_seconds=0.0)
                            self._tell(trial, None, self._failed(trial, e, info), info)
                            continue
                        running[trial.number] = (trial, info)
                        out = executor.submit(Job(key=trial.number, config=cfg, run_dir=run_dir))
                        if out is not None:  # finished earlier (a driver killed before it told the study)
                            self._told(out, *running.pop(trial.number))
                if not running:
                    if stop:
                        return
                    time.sleep(0.5)  # an orphan of another process may still be retried
                    continue
                out = executor.next_outcome()
                self._told(out, *running.pop(out.job.key))
        finally:
            executor.cancel_all()
            _write_json(os.path.join(self.workdir, "executor.json"), executor.summary())

    def _told(self, out: Any, trial: Trial, info: dict[str, Any]) -> None:
        """Tells the study the :class:`research.executors.Outcome` of ``trial``."""
        info.update(seconds=out.seconds, compile_seconds=0.0, run_seconds=out.seconds, executor=out.note)
        if out.report is not None:
            values, error = self._finish(out.report, info)
        else:
            values, error = None, self._failed(trial, out.error, info, out.traceback)
        self._tell(trial, values, error, info)

    def _tell(self, trial: Trial, values, error, info: dict[str, Any]) -> None:
        """Tells the study (infeasible points penalised), updates the trial's info and the outputs."""
        with _locked(self.lock_path):
            if error is not None:
                told = self.study.tell(trial, exception=error)
            else:
                if info.get("feasible") is False:
                    values = self._penalized(values, info)
                    info["study_values"] = values
                told = self.study.tell(trial, values)
            info["status"] = told.state.value
            info["owner"] = None
            _update_info(self.workdir, trial.number, info)
            self.finished += 1
            plots = self.plot_every > 0 and self.finished % self.plot_every == 0
            write_outputs(self.workdir, self.study, self.space, self.setup, plots=plots)
        self.say(_one_line(told, info, self.objectives))


def _one_line(trial: Trial, info: Mapping[str, Any], objectives: Sequence[Objective]) -> str:
    budget = f" @ {trial.budget:g}" if trial.budget is not None else ""
    if info.get("error"):
        return f"trial {trial.number}{budget}: {trial.state.value}: {info['error']}"
    vals = ", ".join(f"{o.name} {v:.4g}" for o, v in zip(objectives, info.get("objectives", []), strict=False))
    feas = "" if info.get("feasible", True) else " (infeasible)"
    if "duplicate_of" in info:
        return f"trial {trial.number}{budget}: {trial.state.value}: {vals}{feas} (the config of trial {info['duplicate_of']}: not run again)"
    return (
        f"trial {trial.number}{budget}: {trial.state.value}: {vals}{feas} "
        f"({info['seconds']:.1f}s, compile {info['compile_seconds']:.1f}s)"
    )


def _trial_dir(workdir: str, number: int) -> str:
    return os.path.join(workdir, "trials", f"{number:04d}")


def _trial_info(workdir: str, number: int) -> dict[str, Any]:
    path = os.path.join(_trial_dir(workdir, number), "trial.json")
    if not os.path.exists(path):
        return {}
    return _read_json(path)


def _update_info(workdir: str, number: int, changes: Mapping[str, Any]) -> None:
    tdir = _trial_dir(workdir, number)
    os.makedirs(tdir, exist_ok=True)
    info = {**_trial_info(workdir, number), **changes}
    _write_json(os.path.join(tdir, "trial.json"), info)


# ----------------------------------------------------------------------------- multi-fidelity


def _budget_stage(config: config_lib.Config, budget_key: str | None) -> int | None:
    """Index of the stage the budget key belongs to (``None`` when it is not a stage field)."""
    if not budget_key:
        return None
    parts = budget_key.split(".")
    if parts[0] != "stages" or len(parts) < 3:
        return None
    return config_lib._stage_index(config.stages, parts[1], budget_key)  # noqa: SLF001 - the --set resolver


def _current_value(config: config_lib.Config, key: str) -> Any:
    obj: Any = config
    for part in key.split("."):
        if isinstance(obj, tuple):
            obj = obj[config_lib._stage_index(obj, part, key)]  # noqa: SLF001
        elif isinstance(obj, Mapping):
            obj = obj[part]
        else:
            obj = getattr(obj, part)
    return obj


def _budget_value(config: config_lib.Config, key: str, budget: float) -> int | float:
    """The budget as the type of the config field (steps are ints)."""
    return int(round(budget)) if isinstance(_current_value(config, key), int) else float(budget)


def _continue_from_previous(
    trial_dir: str, run_dir: str, config: config_lib.Config, stage: int | None, budget: float
) -> int | None:
    """Seeds ``run_dir`` from the trial's largest smaller budget so the budget stage continues.

    The stages before the budget stage are copied whole (same config, same result); the budget
    stage's checkpoints and metrics are copied, so :func:`research.train.fit` restores the last
    checkpoint and trains only the remaining steps. Stages after it run again.

    Returns:
      The budget continued from, or ``None`` (first budget, already seeded, or no stage budget).
    """
    if stage is None or os.path.exists(os.path.join(run_dir, "config.json")):
        return None
    previous = []
    for name in os.listdir(trial_dir) if os.path.isdir(trial_dir) else []:
        if name.startswith("b") and os.path.isdir(os.path.join(trial_dir, name)):
            try:
                b = float(name[1:])
            except ValueError:
                continue
            if b < budget:
                previous.append((b, os.path.join(trial_dir, name)))
    if not previous:
        return None
    b_prev, prev_dir = max(previous)
    os.makedirs(os.path.join(run_dir, "stages"), exist_ok=True)
    for i, st in enumerate(config.stages[: stage + 1]):
        label = f"{i}_{st.kind}"
        src = os.path.join(prev_dir, "stages", label)
        dst = os.path.join(run_dir, "stages", label)
        if not os.path.isdir(src):
            return None
        if i < stage:
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            os.makedirs(dst, exist_ok=True)
            # The stage's key is the new budget's, so the run resumes this directory's checkpoints
            # (research.workdir keeps a stage directory only when its key matches the config).
            workdir_lib.write_json_atomic(
                os.path.join(dst, workdir_lib.KEY_NAME),
                {"key": workdir_lib.stage_keys(config)[i], "config": workdir_lib.stage_prefix(config, i)},
            )
            if os.path.isdir(os.path.join(src, "checkpoints")):
                shutil.copytree(os.path.join(src, "checkpoints"), os.path.join(dst, "checkpoints"), dirs_exist_ok=True)
            if os.path.exists(os.path.join(src, "metrics.jsonl")):
                shutil.copy2(os.path.join(src, "metrics.jsonl"), os.path.join(dst, "metrics.jsonl"))
    return int(b_prev) if float(b_prev).is_integer() else b_prev


# ----------------------------------------------------------------------------- study and outputs


def open_study(workdir: str, setup: TuneSetup, space: Space) -> Study:
    """The study of ``workdir`` (``study.db``), created on first use."""
    directions = [Objective.parse(o).study_direction for o in setup.objectives]
    scheduler = None
    if setup.scheduler is not None:
        cls = ASHA if setup.scheduler == "asha" else Hyperband
        scheduler = cls(setup.min_budget, setup.max_budget, eta=setup.eta)
    sampler = make_sampler(setup.sampler, seed=setup.seed)
    storage = SQLiteStorage(os.path.join(workdir, "study.db"))
    return Study(space, sampler=sampler, direction=directions, storage=storage, name="tune", scheduler=scheduler)


def _real_values(t: Trial, info: Mapping[str, Any]) -> list[float] | None:
    """A trial's objective values as measured (an infeasible trial's study values are penalized)."""
    if t.values is None:
        return None
    if info.get("study_values") is not None and info.get("objectives") is not None:
        return list(info["objectives"])
    return list(t.values)


def _reference_point(setup: TuneSetup, losses: np.ndarray, workdir: str) -> tuple[np.ndarray | None, str]:
    """The hypervolume reference point in loss space (every objective minimised) and its origin."""
    objectives = [Objective.parse(o) for o in setup.objectives]
    sign = np.array([-1.0 if o.direction == "max" else 1.0 for o in objectives])
    ref_path = os.path.join(workdir, "reference.json")
    if os.path.exists(ref_path):
        ref = _read_json(ref_path)
        return sign * np.array([float(ref["point"][o.name]) for o in objectives]), ref["source"]
    if not len(losses):
        return None, "nadir"
    worst = losses.max(axis=0)
    span = np.where(losses.max(0) > losses.min(0), losses.max(0) - losses.min(0), np.abs(worst) + 1.0)
    return worst + 0.1 * span, "nadir of the feasible trials + 10% of their range"


def summarize(workdir: str, study: Study, space: Space, setup: TuneSetup) -> dict[str, Any]:
    """The ``tune.json`` dict: setup, trials (with trial.json info), Pareto set, hypervolume, importance."""
    objectives = [Objective.parse(o) for o in setup.objectives]
    sign = np.array([-1.0 if o.direction == "max" else 1.0 for o in objectives])
    rows = []
    for t in study.trials:
        info = _trial_info(workdir, t.number)
        rows.append(
            {
                "number": t.number,
                "state": t.state.value,
                "params": dict(t.params),
                "values": _real_values(t, info),
                "study_values": info.get("study_values"),
                "budget": t.budget,
                "intermediate": {str(k): v for k, v in t.intermediate.items()},
                "feasible": info.get("feasible"),
                "metrics": info.get("metrics", {}),
                "overrides": info.get("overrides"),
                "run_dir": info.get("run_dir"),
                "seconds": info.get("seconds"),
                "compile_seconds": info.get("compile_seconds"),
                "run_seconds": info.get("run_seconds"),
                "attempts": info.get("attempts"),
                "worker": info.get("worker"),
                "resumed_from": info.get("resumed_from"),
                "rules": info.get("rules"),
                "rule_imports": info.get("rule_imports"),
                "repaired": info.get("repaired"),
                "error": info.get("error") or t.attrs.get("error"),
                "traceback": info.get("traceback"),
            }
        )
    ok = [r for r in rows if r["state"] == TrialState.COMPLETE.value and r["feasible"] is not False]
    losses = np.array([sign * np.array(r["values"]) for r in ok]).reshape(len(ok), len(objectives))
    front: list[int] = []
    if ok:
        rank = nondominated_rank(losses)
        front = [r["number"] for r, k in zip(ok, rank, strict=True) if k == 0]
    ref, ref_source = _reference_point(setup, losses, workdir)
    history = []
    for i in range(len(ok)):
        history.append(
            {
                "number": ok[i]["number"],
                "hypervolume": hypervolume(losses[: i + 1], ref) if ref is not None else None,
            }
        )
    imp = {}
    done = [r for r in rows if r["values"] is not None]
    for j, o in enumerate(objectives):
        imp[str(o)] = importance(space, [r["params"] for r in done], [r["values"][j] for r in done])
    return {
        "workdir": os.path.abspath(workdir),
        "setup": dataclasses.asdict(setup),
        "objectives": [str(o) for o in objectives],
        "constraints": list(setup.constraints),
        "trials": rows,
        "pareto": front,
        "reference": None if ref is None else list(sign * ref),
        "reference_source": ref_source,
        "hypervolume": history[-1]["hypervolume"] if history else 0.0,
        "hypervolume_history": history,
        "importance": imp,
    }


def render(summary: Mapping[str, Any]) -> str:
    """The ``tune.txt`` text: trials table, Pareto/best rows, hypervolume, importance."""
    objectives = [Objective.parse(o) for o in summary["objectives"]]
    names = [n for n in Space.from_dict(summary["setup"]["space"]).names]
    short = {n: n.split(".")[-1] if sum(m.split(".")[-1] == n.split(".")[-1] for m in names) == 1 else n for n in names}

    def table(rows):
        out = []
        for r in rows:
            row = {"trial": r["number"], "state": r["state"]}
            if r.get("budget") is not None:
                row["budget"] = r["budget"]
            for n in names:
                row[short[n]] = r["params"].get(n)
            for j, o in enumerate(objectives):
                row[str(o)] = r["values"][j] if r["values"] is not None else None
            m = r.get("metrics") or {}
            for k in ("test_accuracy", "bytes", "flops", "latency_ms"):
                if f"{k}:max" not in row and f"{k}:min" not in row:
                    row[k] = m.get(k)
            row["feasible"] = {True: "yes", False: "NO", None: "-"}[r["feasible"]]
            row["s"] = r.get("seconds")
            row["compile s"] = r.get("compile_seconds")
            out.append(row)
        cols = []
        for k in out[0] if out else []:
            fmt = "{}"
            if any(isinstance(x.get(k), float) for x in out):
                fmt = "{:,.0f}" if k in ("bytes", "flops") else "{:.4g}"
            cols.append((k, k, fmt))
        return report_lib.format_table(out, cols)

    trials = summary["trials"]
    parts = [
        f"tune: {summary['workdir']}",
        f"objectives: {', '.join(summary['objectives'])}"
        + (f"; constraints: {', '.join(summary['constraints'])}" if summary["constraints"] else ""),
        f"sampler: {summary['setup']['sampler']}"
        + (
            f"; scheduler: {summary['setup']['scheduler']} over {summary['setup']['budget_key']}"
            if summary["setup"]["scheduler"]
            else ""
        ),
        "trials: "
        + ", ".join(f"{s} {sum(r['state'] == s for r in trials)}" for s in [x.value for x in TrialState])
        + (f"; infeasible {sum(r['feasible'] is False for r in trials)}" if summary["constraints"] else ""),
        "(objectives are read from the validation split; test accuracy is reported, never tuned on)",
        "",
        table(trials) if trials else "(no trial yet)",
    ]
    front = [r for r in trials if r["number"] in summary["pareto"]]
    if front:
        label = "best trial" if len(objectives) == 1 else f"Pareto front ({len(front)} trials)"
        parts += ["", label + ":", table(front)]
    if summary["reference"] is not None and len(objectives) > 1:
        ref = ", ".join(f"{o.name}={v:.4g}" for o, v in zip(objectives, summary["reference"], strict=True))
        parts.append(f"\nhypervolume {summary['hypervolume']:.6g} against ({ref}), {summary['reference_source']}")
    for o, imp in summary["importance"].items():
        if imp:
            rows = [{"parameter": k, "importance (eta^2)": v} for k, v in sorted(imp.items(), key=lambda kv: -kv[1])]
            parts += ["", f"parameter importance for {o} (share of variance explained alone):"]
            parts.append(
                report_lib.format_table(
                    rows, [("parameter", "parameter", "{}"), *[("importance (eta^2)", "eta^2", "{:.3f}")]]
                )
            )
    errors = [r for r in trials if r["error"]]
    for r in errors:
        parts.append(f"trial {r['number']} failed: {r['error']} (traceback in trial.json / error.txt)")
    return "\n".join(parts)


def _plot(summary: Mapping[str, Any], workdir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives = [Objective.parse(o) for o in summary["objectives"]]
    done = [r for r in summary["trials"] if r["values"] is not None and r["state"] == "COMPLETE"]
    written = []
    if not done:
        return written
    # history: each objective against trial number, with the best feasible so far
    fig, axes = plt.subplots(1, len(objectives), figsize=(5 * len(objectives), 3.6), squeeze=False)
    for j, (o, ax) in enumerate(zip(objectives, axes[0], strict=True)):
        num = [r["number"] for r in done]
        val = [r["values"][j] for r in done]
        colors = ["C0" if r["feasible"] is not False else "0.6" for r in done]
        ax.scatter(num, val, s=14, c=colors, label="trial")
        best, cur = [], None
        for r in done:
            if r["feasible"] is not False:
                v = r["values"][j]
                cur = v if cur is None else (max(cur, v) if o.direction == "max" else min(cur, v))
            best.append(cur)
        ax.step(num, [math.nan if b is None else b for b in best], where="post", color="C3", label="best feasible")
        ax.set(xlabel="trial", ylabel=str(o))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(workdir, "history.png")
    report_lib.save_figure(fig, path, dpi=100)
    plt.close(fig)
    written.append(path)
    path = _plot_params(summary, objectives, done, os.path.join(workdir, "params.png"))
    if path is not None:
        written.append(path)
    if len(objectives) >= 2:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        feas = [r for r in done if r["feasible"] is not False]
        infeas = [r for r in done if r["feasible"] is False]
        ax.scatter([r["values"][1] for r in feas], [r["values"][0] for r in feas], s=18, color="C0", label="trial")
        if infeas:
            ax.scatter([r["values"][1] for r in infeas], [r["values"][0] for r in infeas], s=18, marker="x",
                       color="0.5", label="infeasible")  # fmt: skip
        front = sorted((r["values"][1], r["values"][0], r["number"]) for r in done if r["number"] in summary["pareto"])
        if front:
            ax.plot([f[0] for f in front], [f[1] for f in front], "o-", color="C3", mfc="none", ms=9, label="Pareto")
            for x, y, n in front:
                ax.annotate(str(n), (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set(xlabel=str(objectives[1]), ylabel=str(objectives[0]))
        ax.set_title(f"Pareto front ({len(front)} of {len(done)} trials)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(workdir, "pareto.png")
        report_lib.save_figure(fig, path, dpi=100)
        plt.close(fig)
        written.append(path)
        hist = [h for h in summary["hypervolume_history"] if h["hypervolume"] is not None]
        if hist:
            fig, ax = plt.subplots(figsize=(6, 3.6))
            ax.step([h["number"] for h in hist], [h["hypervolume"] for h in hist], where="post")
            ax.set(xlabel="trial", ylabel="hypervolume", title=f"hypervolume ({summary['reference_source']})")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            path = os.path.join(workdir, "hypervolume.png")
            report_lib.save_figure(fig, path, dpi=100)
            plt.close(fig)
            written.append(path)
    return written


PARAMS_PER_ROW = 4
"""Panels per row of ``params.png``."""


def _plot_params(
    summary: Mapping[str, Any], objectives: Sequence[Objective], done: list[dict], path: str
) -> str | None:
    """``params.png``: each objective against each parameter's value (a slice plot), one panel per
    (objective, parameter), a block of rows per objective; the trials coloured by number, infeasible
    ones grey crosses, the objective's best feasible trial ringed, each panel titled with the
    parameter's importance (eta^2) for that objective. A log-scaled parameter gets a log axis, a
    categorical one its choices as positions; a trial where a conditional parameter was inactive is
    absent from its panel. ``None`` when no trial completed."""
    if not done:
        return None
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    from matplotlib import ticker  # pylint: disable=import-outside-toplevel

    space = Space.from_dict(summary["setup"]["space"])
    names = list(space.names)
    cols = min(len(names), PARAMS_PER_ROW)
    block = math.ceil(len(names) / cols)  # rows per objective
    rows = block * len(objectives)
    width, height = 3.4 * cols + 1.2, 2.9 * rows
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    # Fixed margins in inches (a layout engine measured every label: half the plot's time).
    fig.subplots_adjust(
        left=0.7 / width, right=1 - 1.05 / width, bottom=0.4 / height, top=1 - 0.3 / height, wspace=0.25, hspace=0.4
    )
    numbers = [r["number"] for r in done]
    norm = plt.Normalize(min(numbers), max(max(numbers), min(numbers) + 1))
    feasible = [r for r in done if r["feasible"] is not False]
    image = None
    for j, objective in enumerate(objectives):
        importance = summary["importance"].get(str(objective), {})
        best = None
        if feasible:
            pick = max if objective.direction == "max" else min
            best = pick(feasible, key=lambda r, j=j: r["values"][j])["number"]
        panels = list(axes[j * block : (j + 1) * block].flat)
        for ax, name in zip(panels, names, strict=False):
            param = space[name]
            active = [r for r in done if r["params"].get(name) is not None]
            if isinstance(param, Categorical):
                choices = list(param.choices)
                xs = [choices.index(r["params"][name]) for r in active]
                ax.set_xticks(range(len(choices)), [str(c) for c in choices], rotation=30 if len(choices) > 4 else 0)
                ax.set_xlim(-0.5, len(choices) - 0.5)
            else:
                xs = [r["params"][name] for r in active]
                if param.log:  # ticks at 1, 2 and 5 per decade, labelled as plain numbers
                    ax.set_xscale("log")
                    ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
                    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ys = [r["values"][j] for r in active]
            ok = [i for i, r in enumerate(active) if r["feasible"] is not False]
            bad = [i for i, r in enumerate(active) if r["feasible"] is False]
            image = ax.scatter(
                [xs[i] for i in ok],
                [ys[i] for i in ok],
                c=[active[i]["number"] for i in ok],
                cmap="viridis",
                norm=norm,
                s=16,
            )
            if bad:
                ax.scatter(
                    [xs[i] for i in bad], [ys[i] for i in bad], marker="x", color="0.5", s=16, label="infeasible"
                )
                ax.legend(fontsize=7)
            for i, r in enumerate(active):
                if r["number"] == best:
                    ax.scatter([xs[i]], [ys[i]], s=110, facecolors="none", edgecolors="C3", lw=1.5)
            title = name if len(name) <= 32 else "..." + name[-29:]
            if name in importance:
                title += f"  (eta^2 {importance[name]:.2f})"
            ax.set_title(title, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in axes[j * block : (j + 1) * block, 0]:
            ax.set_ylabel(str(objective), fontsize=8)
        for ax in panels[len(names) :]:
            ax.set_visible(False)
    if image is not None:
        bar = fig.add_axes((1 - 0.8 / width, 0.4 / height, 0.12 / width, 1 - 0.7 / height))
        fig.colorbar(image, cax=bar, label="trial")
    report_lib.save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


_BEST_TEMPLATE = '''"""Trial {number} of the tune study in {workdir}: {what}.

Rerun it with:
  slimjax run {path}

Its overrides of the base config {base}:
{overrides_doc}
Measured by the trial: {measured}
{note}"""

from research import config as config_lib

{imports}BASE = {base_literal}
OVERRIDES = {overrides!r}
RULES = {rules}


def get_config(arg=None):
    config = config_lib.apply_overrides(config_lib.load_config(BASE), OVERRIDES)
    for key, rules in RULES.items():  # per-layer policy rules (not expressible as --set values)
        config = config_lib._set(config, key.split("."), rules, key)
    return config
'''


def _write_best(workdir: str, summary: Mapping[str, Any], setup: TuneSetup) -> list[str]:
    best_dir = os.path.join(workdir, "best")
    os.makedirs(best_dir, exist_ok=True)
    base = setup.config_spec
    keep = set()
    single = len(summary["objectives"]) == 1
    for r in summary["trials"]:
        if r["number"] not in summary["pareto"] or not r["overrides"]:
            continue
        name = f"trial_{r['number']:04d}.py"
        keep.add(name)
        overrides = [*setup.set_overrides, *r["overrides"]]
        note = ""
        if setup.scheduler:
            note = (
                "\nNote: with a multi-fidelity scheduler the trial continued from lower-budget checkpoints; "
                "this config trains from scratch at the full budget, so its numbers can differ a little.\n"
            )
        measured = {k: r["metrics"].get(k) for k in ("val_accuracy", "test_accuracy", "bytes", "flops")}
        rules = r.get("rules") or {}
        if not base:  # a config object given in Python: no file to load, so the overrides as data
            name = f"trial_{r['number']:04d}.json"
            keep.add(name)
            _write_json(
                os.path.join(best_dir, name),
                {
                    "overrides": overrides,
                    "rules": rules,
                    "measured": measured,
                    "how": "apply to the base config given to tune(): research.config.apply_overrides(config, "
                    "overrides), then set each rules key to its rules",
                },
            )
            continue
        imports = "".join(f"from {m} import {c}\n" for m, c in r.get("rule_imports") or [])
        rules_src = (
            "{" + "".join(f"\n    {k!r}: ({', '.join(v)},)," for k, v in rules.items()) + ("\n}" if rules else "}")
        )
        text = _BEST_TEMPLATE.format(
            number=r["number"],
            workdir=summary["workdir"],
            what="the best trial" if single else "a Pareto-optimal trial",
            path=os.path.join(best_dir, name),
            base=base,
            base_literal=repr(base),
            overrides=overrides,
            overrides_doc="".join(f"  --set {o}\n" for o in overrides),
            measured=", ".join(f"{k} {v:.6g}" for k, v in measured.items() if v is not None),
            note=note,
            imports=imports + ("\n" if imports else ""),
            rules=rules_src,
        )
        report_lib.write_text_atomic(os.path.join(best_dir, name), text)
    for name in os.listdir(best_dir):
        if name.startswith("trial_") and name.endswith((".py", ".json")) and name not in keep:
            os.remove(os.path.join(best_dir, name))  # no longer on the front
    return sorted(keep)


def write_outputs(workdir: str, study: Study, space: Space, setup: TuneSetup, *, plots: bool = True) -> dict[str, Any]:
    """Writes tune.json, tune.txt, best/ and (with ``plots``) the plots, each file atomically.

    Returns:
      The summary (the ``tune.json`` dict).
    """
    summary = summarize(workdir, study, space, setup)
    if os.path.exists(os.path.join(workdir, "executor.json")):
        summary["executor"] = _read_json(os.path.join(workdir, "executor.json"))
    summary["best_configs"] = [os.path.join("best", n) for n in _write_best(workdir, summary, setup)]
    _write_json(os.path.join(workdir, "tune.json"), summary)
    report_lib.write_text_atomic(os.path.join(workdir, "tune.txt"), render(summary) + "\n")
    if not plots:
        return summary
    import tempfile

    tmp = tempfile.mkdtemp(dir=workdir, prefix=".plots-")
    try:
        for path in _plot(summary, tmp):
            os.replace(path, os.path.join(workdir, os.path.basename(path)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


# ----------------------------------------------------------------------------- entry points


@dataclasses.dataclass(frozen=True)
class TuneResult:
    """What :func:`tune` returns: the ``tune.json`` summary and a rendered table."""

    workdir: str
    summary: dict[str, Any]

    @property
    def trials(self) -> list[dict[str, Any]]:
        return self.summary["trials"]

    @property
    def pareto(self) -> list[dict[str, Any]]:
        """The Pareto-optimal (single objective: best) feasible complete trials."""
        return [t for t in self.trials if t["number"] in self.summary["pareto"]]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [t for t in self.trials if t["state"] == "FAILED"]

    def table(self) -> str:
        return render(self.summary)


def tune(
    config: config_lib.Config,
    space: Space,
    workdir: str,
    *,
    trials: int,
    sampler: str = "tpe",
    objectives: Sequence[str] = ("val_accuracy:max",),
    constraints: Sequence[str] = (),
    budget_key: str | None = None,
    scheduler: str | None = None,
    min_budget: float | None = None,
    eta: int = 3,
    workers: int = 1,
    executor: str | Any = "sequential",
    seed: int = 0,
    reference: str | Mapping[str, float] | None = "baseline",
    policies: Sequence[LayerPolicy] = (),
    max_retries: int = 1,
    config_spec: str | None = None,
    set_overrides: Sequence[str] = (),
    compilation_cache: bool = True,
    plot_every: int = 1,
    progress: bool = False,
    echo: bool = True,
) -> TuneResult:
    """Tunes ``config`` over ``space``: each trial is a run directory under ``workdir/trials``.

    Args:
      config: the base config (``--set`` overrides already applied).
      space: parameters named by ``--set`` keys (see :func:`check_space`).
      workdir: the study directory; a rerun with the same arguments resumes it (``trials`` may grow).
      trials: number of configurations (promotions to larger budgets do not count).
      sampler: ``gp``, ``tpe``, ``bohb``, ``random``, ``sobol``, or for several objectives ``ehvi``
        (GP per objective, expected hypervolume improvement) or ``motpe`` (multi-objective TPE).
      objectives: ``NAME:max|min`` of final-stage report metrics (``val_accuracy``, ``bytes``, ``flops``,
        ``latency_ms``, ...); never test metrics.
      constraints: ``NAME<=X`` / ``NAME>=X``; trials breaking one are recorded as infeasible and
        never on the Pareto front.
      budget_key: the ``--set`` key a scheduler varies (e.g. ``stages.train.steps``); its value in
        ``config`` is the full budget.
      scheduler: ``asha`` or ``hyperband`` (needs ``budget_key`` and one objective).
      min_budget: smallest budget (default: full budget / eta**2).
      eta: the scheduler's halving factor.
      workers: processes running trials on the study at once (this one and ``workers - 1`` more).
      executor: ``"sequential"`` (one trial at a time per process), ``"population"`` (the sampler
        is asked for a batch of q trials, q the measured chunk size, and the batch trains as one
        vmapped program, :mod:`research.population`; one process, no scheduler), ``"ray"`` (each trial
        a Ray task; the sampler (or the scheduler, with its promotions) is asked for as many trials as
        Ray slots are free, and for the next as soon as one finishes; the study stays with this
        process; see
        :mod:`research.distributed.ray_executor`), or an
        :class:`research.executors.Executor`. What it decided goes into ``executor.json`` and
        ``tune.json``.
      seed: the sampler's seed.
      reference: hypervolume reference point (several objectives): ``"baseline"`` (default: run
        ``config`` unchanged, once, in ``workdir/baseline`` and use its metrics), ``{metric: value}``,
        or ``None`` (the nadir of the feasible trials plus 10% of their range).
      policies: per-layer policies (:func:`layer_policy`) whose ``policy.*`` parameters are in ``space``.
      max_retries: times a trial whose worker died is retried before it is marked failed.
      config_spec: the config file ``path[:arg]``: ``best/`` configs load it (without it, ``best/``
        holds each trial's overrides as JSON) and worker processes (``workers > 1``, which need it)
        load the config and its policies from it; nothing in the workdir is unpickled.
      set_overrides: the ``--set`` items already applied to ``config`` (repeated in ``best/``).
      compilation_cache: use JAX's persistent compilation cache in ``workdir/jax_cache``.
      plot_every: redraw the plots after every this many trials a worker finishes (0: only at the end;
        tune.json, tune.txt and best/ are rewritten after every trial).
      progress: progress bars of the runs.
      echo: one line per trial on stderr.

    Returns:
      The :class:`TuneResult` (also in ``workdir/tune.json``).

    Raises:
      ConfigError: a bad space key, objective, sampler, scheduler or budget key, or a workdir that
        holds a different study; raised before anything trains.
    """
    from research.run import register_all_stages

    register_all_stages()
    config_lib.validate(config)
    check_space(config, space, policies)
    objs = [Objective.parse(o) for o in objectives]
    if not objs:
        raise config_lib.ConfigError("no objective; give e.g. objectives=['val_accuracy:max']")
    if len({o.name for o in objs}) != len(objs):
        raise config_lib.ConfigError(f"objectives {[str(o) for o in objs]} name a metric twice")
    cons = [Constraint.parse(c) for c in constraints]
    if sampler not in list_samplers():  # any registered sampler, also one the config file's modules register
        raise config_lib.ConfigError(f"sampler={sampler!r}: {SAMPLERS.unknown_message(sampler)}")
    if trials < 1:
        raise config_lib.ConfigError(f"trials={trials} must be >= 1")
    if workers < 1:
        raise config_lib.ConfigError(f"workers={workers} must be >= 1")
    made_here = isinstance(executor, str)
    if made_here:
        from research.executors import make_executor

        executor = make_executor(executor)
    batched = executor.name != "sequential"
    if batched and workers > 1:
        what = "the population" if executor.name == "population" else f"the {executor.name} executor"
        raise config_lib.ConfigError(
            f"executor={executor.name!r} with workers={workers}: {what} is the parallelism; use workers=1"
        )
    if batched and scheduler is not None and not hasattr(executor, "submit"):  # Ray runs one trial per task
        raise config_lib.ConfigError(
            f"executor={executor.name!r} with scheduler={scheduler!r}: promotions run one trial at a time; "
            "use executor='sequential' with a scheduler"
        )
    if workers > 1:
        if not config_spec:
            raise config_lib.ConfigError(
                f"workers={workers} needs config_spec (the config file path[:arg]): worker processes load the "
                "config from it, never from a pickle"
            )
        reloaded = config_lib.apply_overrides(config_lib.load_config(config_spec), list(set_overrides))
        if config_lib.to_json(reloaded) != config_lib.to_json(config):
            raise config_lib.ConfigError(
                f"workers={workers}: config_spec={config_spec!r} with set_overrides={list(set_overrides)} is not "
                "the config given; worker processes would run another config"
            )
        if policies and [repr(p) for p in load_policies(config_spec)] != [repr(p) for p in policies]:
            raise config_lib.ConfigError(
                f"workers={workers}: the policies given are not {config_spec}'s get_policies(); worker processes "
                "load them from the file"
            )
    max_budget = None
    if scheduler is not None or budget_key is not None:
        if scheduler not in SCHEDULERS or not budget_key:
            raise config_lib.ConfigError(
                f"multi-fidelity needs both budget_key and scheduler in {SCHEDULERS} "
                f"(got budget_key={budget_key!r}, scheduler={scheduler!r})"
            )
        if len(objs) != 1:
            raise config_lib.ConfigError(f"a scheduler needs one objective; got {[str(o) for o in objs]}")
        if budget_key in space:
            raise config_lib.ConfigError(f"budget_key {budget_key!r} is also a search-space key; remove one")
        try:
            max_budget = float(_current_value(config, budget_key))
        except (AttributeError, KeyError, config_lib.ConfigError) as e:
            raise config_lib.ConfigError(
                f"budget_key {budget_key!r} is not a config key; valid keys: {config_keys(config)}"
            ) from e
        min_budget = float(min_budget) if min_budget is not None else max(1.0, math.floor(max_budget / eta**2))
        if not 0 < min_budget <= max_budget:
            raise config_lib.ConfigError(f"min_budget={min_budget} must be in (0, {max_budget}] ({budget_key})")
        if scheduler == "hyperband":
            first = Hyperband(min_budget, max_budget, eta=eta)
            needed = first.n_configs(first.s_max, 0)
            if trials < needed:
                raise config_lib.ConfigError(
                    f"hyperband's first bracket starts {needed} configurations at budget {min_budget:g}; "
                    f"trials={trials} would never promote one; give trials >= {needed}, a larger min_budget, "
                    "or scheduler='asha'"
                )
    setup = TuneSetup(
        space=space.to_dict(),
        objectives=tuple(str(o) for o in objs),
        constraints=tuple(str(c) for c in cons),
        sampler=sampler,
        seed=seed,
        scheduler=scheduler,
        budget_key=budget_key,
        min_budget=min_budget if scheduler else None,
        max_budget=max_budget,
        eta=eta,
        config_json=config_lib.to_json(config),
        config_spec=_absolute_spec(config_spec),
        set_overrides=tuple(set_overrides),
    )
    os.makedirs(workdir, exist_ok=True)
    setup_path = os.path.join(workdir, "tune_setup.json")
    with _locked(os.path.join(workdir, "study.lock")):
        if os.path.exists(setup_path):
            old = TuneSetup(**{k: tuple(v) if isinstance(v, list) else v for k, v in _read_json(setup_path).items()})
            diff = old.matches(setup)
            if diff:
                raise config_lib.ConfigError(
                    f"{workdir} holds a tune study started with other {diff}; rerun with the same arguments "
                    "to resume it (only --trials and --workers may change), or use a new --workdir"
                )
        else:
            _write_json(setup_path, dataclasses.asdict(setup))
    if len(objs) > 1 and reference is not None:
        _set_reference(workdir, config, objs, reference, progress=progress, echo=echo)
    elif os.path.exists(os.path.join(workdir, "reference.json")):
        os.remove(os.path.join(workdir, "reference.json"))  # nadir now
    cache_settings = enable_compilation_cache(os.path.join(workdir, "jax_cache")) if compilation_cache else None
    _write_json(
        os.path.join(workdir, "worker_job.json"),
        {
            "space": space.to_dict(),
            "trials": trials,
            "max_retries": max_retries,
            "policies": bool(policies),
            "plot_every": plot_every,
            "cache_dir": _cache_dir() if compilation_cache else None,
        },
    )
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from research.tune import worker_main; sys.exit(worker_main(sys.argv[1]))",
                workdir,
            ],
            cwd=os.getcwd(),
        )
        for _ in range(workers - 1)
    ]
    _wait_for_workers(workdir, children)
    worker = _Worker(
        config,
        space,
        workdir,
        setup,
        trials=trials,
        max_retries=max_retries,
        progress=progress,
        echo=echo,
        policies=policies,
        plot_every=plot_every,
    )
    if not batched:
        _write_json(os.path.join(workdir, "executor.json"), {"executor": executor.name, "workers": workers})
    try:
        if batched and hasattr(executor, "submit"):  # the Ray executor: a new trial whenever a slot frees
            worker.loop_async(executor)
        elif batched:
            remaining = max(trials - len(worker.study.trials), 1)
            plan = getattr(executor, "plan", None)
            q = plan(config, remaining) if plan else remaining
            worker.loop_batches(executor, q)
        worker.loop()
        for child in children:
            child.wait()
        worker.loop()  # trials of a worker process that died are retried here
    finally:
        worker.close()
        for child in children:
            child.wait()
        if cache_settings is not None:
            restore_compilation_cache(cache_settings)
        if made_here:  # an executor given as an object is the caller's to close
            from research.executors import close_executor

            close_executor(executor)
    with _locked(os.path.join(workdir, "study.lock")):
        summary = write_outputs(workdir, worker.study, space, setup)
    bad = [c.returncode for c in children if c.returncode]
    if bad:
        print(
            f"tune: {len(bad)} worker process(es) exited with {bad}; their trials are retried on rerun", file=sys.stderr
        )
    return TuneResult(workdir=os.path.abspath(workdir), summary=summary)


def _wait_for_workers(workdir: str, children: Sequence[subprocess.Popen], timeout_s: float = 300.0) -> None:
    """Waits until every child worker has registered (its lock file exists) or exited, so the K
    workers start on the study together instead of this one running ahead while they import."""
    if not children:
        return
    lock_dir = os.path.join(workdir, "workers")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [c for c in children if c.poll() is None]
        registered = len(os.listdir(lock_dir)) if os.path.isdir(lock_dir) else 0
        if not alive or registered >= len(alive):
            return
        time.sleep(0.1)


def _absolute_spec(spec: str | None) -> str | None:
    """``path[:arg]`` with an absolute path (``best/`` configs load it from anywhere)."""
    if spec is None:
        return None
    path, sep, arg = spec.partition(":")
    return os.path.abspath(path) + sep + arg


def _set_reference(workdir, config, objs, reference, *, progress, echo) -> None:
    path = os.path.join(workdir, "reference.json")
    if isinstance(reference, Mapping):
        missing = [o.name for o in objs if o.name not in reference]
        if missing:
            raise config_lib.ConfigError(
                f"reference point {dict(reference)} lacks {missing}; give one value per objective"
            )
        point, source = {o.name: float(reference[o.name]) for o in objs}, "user-given reference point"
    elif reference == "baseline":
        from research.run import run

        if os.path.exists(path):
            return
        report = run(config, os.path.join(workdir, "baseline"), progress=progress, echo=echo)
        metrics = report["stages"][-1]["metrics"]
        point = {o.name: metric_value(metrics, o.name) for o in objs}
        source = "the unmodified config's metrics (workdir/baseline)"
    else:
        raise config_lib.ConfigError(f"reference={reference!r}: give {{metric: value}}, 'baseline' or None")
    _write_json(path, {"point": point, "source": source})


def worker_main(workdir: str) -> int:
    """Entry point of the extra worker processes ``tune(workers=K)`` starts."""
    from research.run import register_all_stages

    register_all_stages()
    job = _read_json(os.path.join(workdir, "worker_job.json"))
    data = _read_json(os.path.join(workdir, "tune_setup.json"))
    setup = TuneSetup(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
    # Nothing in the workdir is unpickled: the config and policies are loaded from the config file.
    config = config_lib.apply_overrides(config_lib.load_config(setup.config_spec), setup.set_overrides)
    policies = tuple(load_policies(setup.config_spec)) if job["policies"] else ()
    if job["cache_dir"]:
        import jax

        jax.config.update("jax_compilation_cache_dir", job["cache_dir"])
        enable_compilation_cache(job["cache_dir"])
    worker = _Worker(
        config,
        Space.from_dict(job["space"]),
        workdir,
        setup,
        trials=job["trials"],
        max_retries=job["max_retries"],
        policies=policies,
        plot_every=job["plot_every"],
    )
    try:
        worker.loop()
    finally:
        worker.close()
    return 0


def parse_reference(text: str | None) -> str | dict[str, float] | None:
    """``--reference``: ``baseline`` (also for None), ``nadir`` or ``val_accuracy=0.9,bytes=30000``.

    Raises:
      ConfigError: an item that is not ``NAME=NUMBER``.
    """
    if text == "nadir":
        return None
    if text is None or text == "baseline":
        return "baseline"
    out = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            out[_ALIASES.get(name.strip(), name.strip())] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise config_lib.ConfigError(
                f"--reference {text!r}: use 'baseline', 'nadir' or NAME=VALUE,... (e.g. val_accuracy=0.9,bytes=30000)"
            )
    return out


__all__ = [
    "Constraint",
    "Objective",
    "TuneResult",
    "TuneSetup",
    "check_space",
    "config_keys",
    "enable_compilation_cache",
    "layer_policy",
    "LayerPolicy",
    "load_policies",
    "restore_compilation_cache",
    "hypervolume",
    "importance",
    "load_config_and_space",
    "metric_value",
    "parse_reference",
    "point_config",
    "point_overrides",
    "tune",
    "write_outputs",
]
