"""Typed experiment configs and ``--set`` overrides.

A config is a Python file exposing ``get_config(arg=None)`` that returns a :class:`Config`
(frozen keyword-only dataclasses all the way down). ``slimjax run FILE[:arg] --set a.b=value``
loads it, applies the overrides with type checks, validates names against the registries,
and only then trains.

Override keys are dotted field names. Stages are addressed by index or, when unique, by kind:
``stages.0.steps=100`` or ``stages.train.steps=100``. Model and data options are free-form
dicts checked against the model constructor / loader: ``model.options.widths=[128,64]``.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import math
import os
import sys
import traceback
import types
import typing
import warnings
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import ClassVar

from research import names
from research.registry import Registry
from research.registry import did_you_mean


class ConfigError(ValueError):
    """A bad config file, override key or value; the message names it and lists valid keys."""


# ----------------------------------------------------------------------------- field checks


@dataclasses.dataclass(frozen=True)
class ValidationContext:
    """What a field check may need besides the value: the stages that run before this one.

    Attributes:
      earlier: labels (``"0_train"``) and kinds (``"train"``) of the earlier stages; ``None``
        when unknown (a stage validated on its own), which skips the checks that need it.
      registries: ``False`` skips the checks that import a registry or a method's module (see
        :meth:`Check.needs_imports`) and the classes' ``check`` hooks: :func:`check_values` runs
        the rest before JAX is imported.
      names_complete: whether the registries' declared and registered names are all the names
        there will be. ``False`` (an installed stage plugin declares none, so it may register
        more when it loads) makes a :class:`Registered` check that runs before the imports
        (``registries=False``) pass an unknown name on to :func:`validate`.
    """

    earlier: tuple[str, ...] | None = None
    registries: bool = True
    names_complete: bool = True


class Check:
    """A constraint on one field's value, declared in a config class's ``checks`` ClassVar.

    ``check(value, key, context)`` raises :class:`ConfigError` naming the dotted ``key``;
    ``bad_values()`` gives values the check must refuse (the conformance test tries them all).
    ``None`` always passes (``X | None`` fields say "unset" with it; the type check covers it).
    """

    def check(self, value: Any, key: str, context: ValidationContext) -> None:
        raise NotImplementedError

    def bad_values(self) -> tuple[Any, ...]:
        return ()

    def needs_imports(self) -> bool:
        """Whether checking imports modules beyond the standard library (a registry's, a method's)."""
        return False


@dataclasses.dataclass(frozen=True)
class Range(Check):
    """A finite number in ``[lo, hi]`` (``lo_open``/``hi_open`` exclude the bound; None = unbounded)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    hint: str = ""

    def describe(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi}"
        return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"

    def check(self, value, key, context):
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return  # None or a type error (reported by the type check)
        ok = math.isfinite(value)
        if ok and self.lo is not None:
            ok = value > self.lo if self.lo_open else value >= self.lo
        if ok and self.hi is not None:
            ok = value < self.hi if self.hi_open else value <= self.hi
        if not ok:
            hint = f" ({self.hint})" if self.hint else ""
            where = self.describe()
            verb = "is outside" if where.startswith("in ") else "must be"
            raise ConfigError(f"{key}={value!r} {verb} {where.removeprefix('in ')}{hint}")

    def bad_values(self):
        out = []
        if self.lo is not None:
            out += [self.lo] if self.lo_open else []
            out.append(self.lo - 1)
        if self.hi is not None:
            out += [self.hi] if self.hi_open else []
            out.append(self.hi + 1)
        return tuple(out)


positive = Range(lo=0, lo_open=True)
nonnegative = Range(lo=0)
at_least_one = Range(lo=1)
fraction = Range(lo=0, hi=1)  # [0, 1]


@dataclasses.dataclass(frozen=True)
class OneOf(Check):
    """A name from a registry (``choices`` is a list or a zero-argument function listing it).

    Attributes:
      choices: the valid names, or a function returning them (read when checked, so a registry
        filled by later imports is seen).
      what: what the names are, for the message (``"pruning scorer"``).
      also: extra accepted values (``""`` for "unset", ``"current"``...).
      bad: values that must be refused (for the conformance test).
    """

    choices: Any
    what: str = "name"
    also: tuple[Any, ...] = ()
    bad: tuple[Any, ...] = ("bogus",)

    def names(self) -> list[Any]:
        names = self.choices() if callable(self.choices) else self.choices
        return list(names)

    def check(self, value, key, context):
        if value is None or value in self.also:
            return
        names = self.names()
        if value not in names:
            extra = f" (or {list(self.also)})" if self.also else ""
            hint = did_you_mean(value, names) if isinstance(value, str) else ""
            raise ConfigError(f"{key}={value!r} is not registered ({self.what});{hint} choose from {names}{extra}")

    def bad_values(self):
        return self.bad

    def needs_imports(self):
        return callable(self.choices)


@dataclasses.dataclass(frozen=True)
class Registered(Check):
    """A name in a :class:`research.registry.Registry`, known without importing it.

    The registry's names include those declared with ``register_lazy``, so a registry created in
    a standard-library module (:mod:`research.names`, ``methods.<package>.names``) is checked
    before JAX is imported (:func:`check_values`), typos and all. The message names the closest
    name and lists them all.

    Attributes:
      registry: the registry, or a zero-argument function listing the names without heavy
        imports (``research.names.export_quantize_modes``).
      also: extra accepted values (``""`` for "unset", ``"current"``...).
      bad: values that must be refused (for the conformance test).
      what: what the names are, for the message (default: the registry's ``what``).
    """

    registry: Registry | Callable[[], Sequence[str]]
    also: tuple[Any, ...] = ()
    bad: tuple[Any, ...] = ("bogus",)
    what: str = ""

    def names(self) -> list[str]:
        """The valid names, declared ones included (nothing is imported)."""
        if isinstance(self.registry, Registry):
            return self.registry.names()
        return list(self.registry())

    def check(self, value, key, context):
        if value is None or value in self.also:
            return
        names_ = self.names()
        if value in names_:
            return
        if not context.registries and not context.names_complete:
            return  # a stage plugin may register it when it loads: validate() decides
        what = self.what or getattr(self.registry, "what", "name")
        extra = f" (or {list(self.also)})" if self.also else ""
        hint = did_you_mean(value, names_) if isinstance(value, str) else ""
        raise ConfigError(f"{key}={value!r} is not registered ({what});{hint} choose from {names_}{extra}")

    def bad_values(self):
        return self.bad


@dataclasses.dataclass(frozen=True)
class InstancesOf(Check):
    """A tuple whose items are instances of a class (rules).

    Attributes:
      cls: the class, or a zero-argument function returning it (imported only when checked,
        after the heavy imports; a class from a light module is checked before JAX loads).
      hint: how to make one (``"give methods.pruning.SparsityRule(pattern=...)"``).
    """

    cls: Any
    hint: str = ""

    def check(self, value, key, context):
        if not isinstance(value, (list, tuple)):
            return
        cls = self.cls if isinstance(self.cls, type) else self.cls()
        for i, item in enumerate(value):
            if not isinstance(item, cls):
                raise ConfigError(f"{key}.{i}={item!r} is not a {cls.__name__}; {self.hint or 'give one'}")

    def bad_values(self):
        return (("not a rule",),)

    def needs_imports(self):
        return not isinstance(self.cls, type)


@dataclasses.dataclass(frozen=True)
class Each(Check):
    """Applies ``inner`` to every item of a tuple field (keys ``field.0``, ``field.1``...)."""

    inner: Check

    def check(self, value, key, context):
        if not isinstance(value, (list, tuple)):
            return
        for i, item in enumerate(value):
            self.inner.check(item, f"{key}.{i}", context)

    def bad_values(self):
        return tuple((v,) for v in self.inner.bad_values())

    def needs_imports(self):
        return self.inner.needs_imports()


@dataclasses.dataclass(frozen=True)
class NonEmpty(Check):
    """A tuple or string that must not be empty (``hint`` says what to give)."""

    hint: str = ""

    def check(self, value, key, context):
        if isinstance(value, (tuple, list, str)) and not value:
            raise ConfigError(f"{key} is empty; {self.hint or 'give at least one item'}")

    def bad_values(self):
        return ((),)


@dataclasses.dataclass(frozen=True)
class EarlierStage(Check):
    """The label (``"0_train"``) or kind (``"train"``) of a stage that runs before this one.

    Attributes:
      also: values meaning "no earlier stage" (``""``, ``"current"``).
    """

    also: tuple[str, ...] = ("",)

    def check(self, value, key, context):
        if value is None or value in self.also or context.earlier is None:
            return
        if value not in context.earlier:
            raise ConfigError(
                f"{key}={value!r} names no earlier stage; use one of {list(context.earlier)} "
                f"(a label like '0_train' or a kind){' or ' + repr(list(self.also)) if self.also else ''}"
            )

    def bad_values(self):
        return ("no_such_stage",)


@dataclasses.dataclass(frozen=True)
class ExistingDir(Check):
    """A path to an existing directory (``""`` = unset)."""

    def check(self, value, key, context):
        if value and isinstance(value, str) and not os.path.isdir(value):
            raise ConfigError(f"{key}={value!r} is not a directory; give the path of a finished run directory")

    def bad_values(self):
        return ("/no/such/run/dir",)


@dataclasses.dataclass(frozen=True)
class RunName(Check):
    """A non-empty name usable as one directory name (``runs/<name>``)."""

    def check(self, value, key, context):
        if not isinstance(value, str):
            return
        if not value.strip() or value in (".", "..") or "/" in value or "\\" in value:
            raise ConfigError(f"{key}={value!r} must be a non-empty name without '/' (it names runs/<name>)")

    def bad_values(self):
        return ("", "a/b", "..")


def _models():
    import research.nn  # pylint: disable=import-outside-toplevel

    return research.nn


def _data():
    import research.data  # pylint: disable=import-outside-toplevel

    return research.data


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which zoo model to build; ``options`` are its keyword options (see ``research.nn.model_kwargs``)."""

    checks: ClassVar[Mapping[str, Check]] = {"name": Registered(names.MODELS)}

    name: str = "mlp"
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def check(self, key: str, context: ValidationContext) -> None:
        """Model options must be keyword options of the model's constructor."""
        self.check_options(key, sorted(_models().model_kwargs(self.name)))

    def check_options(self, key: str, valid: Sequence[str] | None) -> None:
        """Refuses option keys that are not in ``valid`` (``None``: not known yet, nothing checked)."""
        bad = sorted(set(self.options) - set(valid)) if valid is not None else []
        if bad:
            raise ConfigError(
                f"{key}.options {bad} are not options of model {self.name!r}; valid keys: {sorted(valid)}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which shipped data set to load and how to split it."""

    checks: ClassVar[Mapping[str, Check]] = {
        "name": Registered(names.DATASETS, what="data set"),
        "val_fraction": Range(lo=0, hi=1, hi_open=True, hint="the fraction of training data held out"),
        "test_fraction": Range(lo=0, hi=1, lo_open=True, hi_open=True, hint="the fraction of data used for test"),
        "limit": Range(lo=1, hint="None keeps every training example"),
    }

    name: str = "digits"
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    limit: int | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def check(self, key: str, context: ValidationContext) -> None:
        """Data options must be keyword options of the data set's loader."""
        self.check_options(key, _data().dataset_options(self.name))

    def check_options(self, key: str, valid: Sequence[str] | None) -> None:
        """Refuses option keys that are not in ``valid`` (``None``: not known yet, nothing checked)."""
        bad = sorted(set(self.options) - set(valid)) if valid is not None else []
        if bad:
            raise ConfigError(f"{key}.options {bad} are not options of data set {self.name!r}; valid keys: {valid}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """A whole experiment: model, data and an ordered tuple of stages.

    Attributes:
      name: a label for the run.
      seed: seeds the model initialisation, the data split and every stage.
      model: see :class:`ModelConfig`.
      data: see :class:`DataConfig`.
      stages: stage configs (``research.stages.StageConfig`` subclasses), run in order.
      latency_batch_size: batch size for the latency measured after each stage.
    """

    checks: ClassVar[Mapping[str, Check]] = {
        "name": RunName(),
        "seed": Range(lo=0, hi=2**32 - 1),
        "latency_batch_size": Range(lo=1),
    }

    name: str = "run"
    seed: int = 0
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    stages: tuple[Any, ...] = ()
    latency_batch_size: int = 1


# ----------------------------------------------------------------------------- loading


def _where(exc: BaseException, path: str) -> str:
    """`` (path:line)`` of the innermost traceback frame in the config file, else ``""``."""
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if os.path.abspath(frame.filename) == os.path.abspath(path):
            line = frame.lineno
    return f" ({path}:{line})" if line else ""


def load_config(spec: str) -> Config:
    """Loads ``path/to/config.py[:arg]`` and calls its ``get_config(arg)``.

    The config file's directory is put first on ``sys.path`` before the file runs, so the config
    can ``import my_scorer`` from a ``my_scorer.py`` beside it (registering a scorer, KD term,
    sampler, model... that the config then names); every ``slimjax run/sweep/tune/nas`` loads
    its config through here.

    Every failure is one :class:`ConfigError` line naming the file (and the line where it
    can): a missing file, a syntax error, an import that fails, ``get_config`` missing or
    raising, or a return value that is not a :class:`Config`.

    Raises:
      ConfigError: see above.
    """
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist (give a path like configs/quickstart.py)")
    if os.path.isdir(path):
        raise ConfigError(f"config file {path!r} is a directory; give a Python file like configs/quickstart.py")
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        code = compile(source, path, "exec")
    except SyntaxError as e:
        text = f": {e.text.strip()}" if e.text and e.text.strip() else ""
        raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}{text}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"cannot read config file {path!r}: {e}") from None
    # The config's directory goes first on sys.path (as `python config.py` would put it), so a
    # config can import the user's own scorer/loss/model/sampler module that sits beside it.
    config_dir = os.path.dirname(os.path.abspath(path))
    if config_dir not in sys.path:
        sys.path.insert(0, config_dir)
    mod_name = "slimjax_config_" + os.path.splitext(os.path.basename(path))[0]
    module = types.ModuleType(mod_name)
    module.__file__ = path
    # Registered before it runs, so dataclasses (and `from __future__ import annotations`) in the
    # config file can resolve their own module.
    sys.modules[mod_name] = module
    try:
        exec(code, module.__dict__)  # noqa: S102 - a config file is Python code the user runs
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}{_where(e, path)}") from None
    except Exception as e:  # noqa: BLE001 - every failure becomes one config-error line
        hint = " (is slimjax installed, and the module name right?)" if isinstance(e, ImportError) else ""
        raise ConfigError(f"{path}: loading it raised {type(e).__name__}: {e}{_where(e, path)}{hint}") from None
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"config file {path!r} has no get_config(arg=None) function")
    try:
        config = module.get_config(arg or None)
    except ConfigError as e:
        raise ConfigError(f"{path}:get_config({arg or None!r}): {e}{_where(e, path)}") from None
    except Exception as e:  # noqa: BLE001
        raise ConfigError(
            f"{path}:get_config({arg or None!r}) raised {type(e).__name__}: {e}{_where(e, path)}"
        ) from None
    if not isinstance(config, Config):
        raise ConfigError(f"{path}:get_config returned {type(config).__name__}, expected research.config.Config")
    return config


# ----------------------------------------------------------------------------- overrides


def parse_value(text: str) -> Any:
    """Parses an override value: a Python literal (``3``, ``0.1``, ``[1,2]``, ``None``) or a bare string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        return text


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """Returns ``value`` converted to ``annotation`` or raises ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is not None and len(args) == 2 and type(None) in args:  # X | None: X's own message
            return _check_type(value, next(a for a in args if a is not type(None)), key)
        errors = []
        for a in args:
            try:
                return _check_type(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}={value!r} matches none of {annotation}")
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}={value!r} should be None")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}={value!r} must be one of {list(args)}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be a bool (True/False)")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be an int")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r} must be a float")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} must be a string")
    if origin in (tuple, Sequence, list) or annotation in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(
                f"{key}={value!r} must be a list/tuple, e.g. {_list_example(args)}{_quote_hint(key, value)}"
            )
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ConfigError(f"{key}={value!r} must have {len(args)} items")
            return tuple(_check_type(v, a, key) for v, a in zip(value, args, strict=False))
        item = args[0] if args else Any
        return tuple(_check_type(v, item, key) for v in value)
    if origin in (dict, Mapping) or annotation in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value!r} must be a dict")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        raise ConfigError(f"{key}: cannot set a whole {annotation.__name__} from {value!r}; set its fields")
    return value


def _list_example(args: tuple) -> str:
    """An example list for a sequence field's error: its item type's (``["a", "b"]`` for strings)."""
    item = args[0] if args else Any
    if typing.get_origin(item) is typing.Literal:
        return repr(list(typing.get_args(item)[:2])).replace("'", '"')
    return '["a", "b"]' if item is str else "[1, 2]"


def _quote_hint(key: str, value: Any) -> str:
    """For a ``--set`` value that looked like a list but was read as a string (unquoted items):
    the same items quoted, as a ``--set`` argument."""
    if not (isinstance(value, str) and value.strip()[:1] in ("[", "(")):
        return ""
    items = [v.strip().strip("'\"") for v in value.strip().strip("[]()").split(",") if v.strip()]
    quoted = ", ".join(f'"{v}"' for v in items)
    return f"; a --set value is read as a Python literal, so quote the strings inside it: --set '{key}=[{quoted}]'"


def _field_types(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def _stage_index(stages: tuple, part: str, key: str) -> int:
    if part.isdigit():
        i = int(part)
        if i >= len(stages):
            raise ConfigError(f"{key}: stage index {i} out of range; the config has {len(stages)} stages")
        return i
    hits = [i for i, s in enumerate(stages) if getattr(s, "kind", None) == part]
    if len(hits) == 1:
        return hits[0]
    kinds = [f"{i}:{getattr(s, 'kind', '?')}" for i, s in enumerate(stages)]
    if not hits:
        raise ConfigError(f"{key}: no stage {part!r}; stages are {kinds} (address by index or kind)")
    raise ConfigError(f"{key}: {len(hits)} stages have kind {part!r}; address one by index: {kinds}")


def _set(obj: Any, parts: list[str], value: Any, key: str) -> Any:
    head, rest = parts[0], parts[1:]
    if isinstance(obj, tuple):  # the stages tuple
        i = _stage_index(obj, head, key)
        if not rest:
            raise ConfigError(f"{key}: set a field of the stage, e.g. {key}.steps=100")
        items = list(obj)
        items[i] = _set(items[i], rest, value, key)
        return tuple(items)
    if isinstance(obj, Mapping):
        new = dict(obj)
        new[head] = value if not rest else _set(new.get(head, {}), rest, value, key)
        return new
    if not dataclasses.is_dataclass(obj):
        raise ConfigError(f"{key}: {type(obj).__name__} has no fields to set")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    renamed = getattr(type(obj), "renamed", {})
    if head not in fields and head in renamed:  # a deprecated spelling, kept for one release
        prefix = key[: len(key) - len(".".join(parts))]
        new_key = prefix + ".".join([renamed[head], *rest])
        warnings.warn(
            f"override key {key!r} is deprecated and will be removed in the next release; use {new_key!r}",
            DeprecationWarning,
            stacklevel=2,
        )
        new_parts = renamed[head].split(".") + rest
        nested = getattr(obj, new_parts[0], None)
        if rest or (len(new_parts) > 1 and nested is not None and not (new_parts[-1] == "steps" and value == 0)):
            return _set(obj, new_parts, value, new_key)
        return obj.replace_renamed(head, value)  # a renamed field, or steps=0 / a schedule that is None
    if head not in fields:
        where = type(obj).__name__
        raise ConfigError(f"unknown key {key!r}: {where} has no field {head!r}; valid keys: {sorted(fields)}")
    current = getattr(obj, head)
    if (
        rest and current is None
    ):  # an unset optional dataclass (`teacher: TeacherConfig | None`): start from its defaults
        cls = next((a for a in typing.get_args(_field_types(obj)[head]) if dataclasses.is_dataclass(a)), None)
        current = cls() if cls is not None else None
    if rest:
        new_value = _set(current, rest, value, key)
    else:
        new_value = _check_type(value, _field_types(obj)[head], key)
    try:
        return dataclasses.replace(obj, **{head: new_value})
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # a rule refusing the value at construction
        raise ConfigError(f"{key}={value!r}: {e}") from None


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """Applies ``key=value`` overrides (type-checked) and returns the new config.

    Raises:
      ConfigError: malformed override, unknown key (lists the valid ones), or wrong type.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. stages.0.steps=100)")
        key, _, text = item.partition("=")
        config = _set(config, key.strip().split("."), parse_value(text.strip()), key.strip())
    return config


# ----------------------------------------------------------------------------- validation / io


def stage_key(stages: Sequence[Any], i: int) -> str:
    """The dotted key of stage ``i``: ``stages.<kind>`` when the kind is unique, else ``stages.<i>``."""
    kind = getattr(stages[i], "kind", None)
    if kind and sum(getattr(s, "kind", None) == kind for s in stages) == 1:
        return f"stages.{kind}"
    return f"stages.{i}"


def validate_fields(obj: Any, key: str, context: ValidationContext | None = None) -> None:
    """Checks a config dataclass field by field, then its ``check`` hook, recursing into nested ones.

    Every field's value is checked against its type annotation (Literals included), then against
    the class's ``checks`` (ranges, registry names, earlier stages); dataclass values (a stage's
    ``train`` schedule, rules in a tuple) are checked the same way under ``key.field[.i]``.

    Raises:
      ConfigError: naming the dotted key of the first bad value (``stages.prune.train.learning_rate``).
    """
    context = context or ValidationContext()
    hints = typing.get_type_hints(type(obj))
    checks = getattr(type(obj), "checks", {})
    unknown = sorted(set(checks) - {f.name for f in dataclasses.fields(obj)})
    if unknown:
        raise TypeError(f"{type(obj).__name__}.checks names fields it does not have: {unknown}")
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        k = f"{key}.{f.name}" if key else f.name
        _check_type(value, hints[f.name], k)
        if f.name in checks and (context.registries or not checks[f.name].needs_imports()):
            checks[f.name].check(value, k, context)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            validate_fields(value, k, context)
        elif isinstance(value, (list, tuple)):
            for j, item in enumerate(value):
                if dataclasses.is_dataclass(item) and not isinstance(item, type):
                    validate_fields(item, f"{k}.{j}", context)
    hook = getattr(obj, "check", None)
    if callable(hook) and context.registries:
        try:
            hook(key, context)
        except ConfigError:
            raise
        except (ValueError, KeyError, TypeError) as e:  # a method's own check, e.g. a registry lookup
            raise ConfigError(f"{key}: {e}") from e


def register_all_stages() -> None:
    """Registers every stage kind, and fills every registry a field check names: the installed
    stage plugins (entry-point group ``slimjax.stages``) and the core's ``research.export`` (see
    :func:`research.stages.load_all_stages`). Standard library only until those imports run.

    Raises:
      ImportError: an installed stage plugin failed to load (the message names it).
    """
    from research.stages import load_all_stages  # pylint: disable=import-outside-toplevel

    load_all_stages()


#: The function a stage plugin's entry-point module may define to declare, with the standard
#: library only, the registry names its plugin registers (see :func:`declare_plugin_names`).
DECLARE_NAMES = "declare_names"


def declare_plugin_names() -> bool:
    """Lets every installed stage plugin declare its registry names before JAX is imported.

    For each entry point of the ``slimjax.stages`` group this imports the entry point's module
    (which must be light: ``methods`` for ``methods:register_stages``) and calls its
    ``declare_names()`` if it has one: a function that declares, without heavy imports, every
    registry name the plugin registers when it loads (``MODELS.register_lazy("mine",
    "mypkg.models:mine")``, or importing its standard-library ``names`` modules).

    Returns:
      Whether every plugin declared its names: then an unknown registry name is an error before
      the plugins load (:func:`check_values`); otherwise such a name waits for :func:`validate`.
    """
    from research import stages  # pylint: disable=import-outside-toplevel

    complete = True
    for ep in stages._entry_points():  # pylint: disable=protected-access
        try:
            declare = getattr(importlib.import_module(ep.module), DECLARE_NAMES, None)
            if callable(declare):
                declare()
            else:
                complete = False
        except Exception:  # noqa: BLE001 - the plugin's load (validate) reports it, naming the plugin
            complete = False
    return complete


def check_values(config: Config) -> None:
    """The checks of :func:`validate` that need nothing beyond the standard library and the config's
    own classes: types, ranges, registry names and the other declared checks of every field,
    except the checks that import a method's module (:meth:`Check.needs_imports`) and the
    classes' ``check`` hooks. ``slimjax`` runs it before importing JAX, so a bad value or an
    unknown name (a typo of an observer, scorer, export format, model, data set...) is reported
    at once; :func:`validate` (after the imports) checks everything.

    Registry names are checked against the names declared in the standard-library registry
    modules (:mod:`research.names`, ``methods.<package>.names``), what the config's own imports
    registered, and what the installed stage plugins declare (:func:`declare_plugin_names`); when
    a plugin declares nothing, an unknown name is left to :func:`validate`.

    Raises:
      ConfigError: naming the dotted key of the first bad value (``stages.prune.train.learning_rate``).
    """
    _check_values(config, declare_plugin_names())


def check_grid_values(config: Config, grid: Mapping[str, Sequence[Any]]) -> None:
    """:func:`check_values` of ``config`` with each value of a sweep grid set on its own.

    ``slimjax sweep`` runs it before JAX is imported, so a bad or misspelt grid value is reported
    at once (every combination is validated in full by the sweep before any point runs).

    Args:
      config: the base config (overrides applied).
      grid: ``{override key: [values]}`` with parsed values (``slimjax sweep --grid``).

    Raises:
      ConfigError: ``--grid KEY=VALUE: <the error>`` for the first bad value.
    """
    complete = declare_plugin_names()
    for key, values in grid.items():
        for value in values:
            try:
                with warnings.catch_warnings():  # a deprecated key warns once, when the sweep applies it
                    warnings.simplefilter("ignore", DeprecationWarning)
                    point = _set(config, key.split("."), value, key)
                _check_values(point, complete)
            except ConfigError as e:
                raise ConfigError(f"--grid {key}={value!r}: {e}") from None


def _check_values(config: Config, names_complete: bool) -> None:
    if not isinstance(config, Config):
        raise ConfigError(f"expected a research.config.Config, got {type(config).__name__}")
    if not isinstance(config.stages, (tuple, list)):
        raise ConfigError(f"stages={config.stages!r} must be a tuple of stage configs, e.g. (TrainStage(steps=500),)")
    top = ValidationContext(registries=False, names_complete=names_complete)
    validate_fields(dataclasses.replace(config, stages=()), "", top)
    # Option keys read from the constructor's / loader's source (no import); None defers to validate().
    if isinstance(config.model, ModelConfig) and config.model.name in names.MODELS:
        config.model.check_options("model", names.model_option_names(config.model.name))
    if isinstance(config.data, DataConfig) and config.data.name in names.DATASETS:
        config.data.check_options("data", names.dataset_option_names(config.data.name))
    earlier: list[str] = []
    for i, stage in enumerate(config.stages):
        if not dataclasses.is_dataclass(stage) or not getattr(stage, "kind", None):
            continue  # validate() names it
        context = dataclasses.replace(top, earlier=tuple(earlier))
        validate_fields(stage, stage_key(config.stages, i), context)
        earlier += [f"{i}_{stage.kind}", stage.kind]


def validate(config: Config) -> None:
    """Checks every field of ``config`` (types, ranges, registry names) before anything is trained.

    Stage kinds must be registered (:func:`register_all_stages` first, as ``research.run``
    does); each stage is checked with :func:`validate_fields`, knowing which
    stages run before it (a distillation teacher or an export source must be one of them).

    Raises:
      ConfigError: naming the dotted key (``stages.quantize.observer``, ``data.val_fraction``)
        and the valid values.
    """
    from research.stages import list_stages  # pylint: disable=import-outside-toplevel
    from research.stages import missing_plugins_hint  # pylint: disable=import-outside-toplevel

    if not isinstance(config, Config):
        raise ConfigError(f"expected a research.config.Config, got {type(config).__name__}")
    if not isinstance(config.stages, (tuple, list)):
        raise ConfigError(f"stages={config.stages!r} must be a tuple of stage configs, e.g. (TrainStage(steps=500),)")
    if not config.stages:
        raise ConfigError("the config has no stages; add e.g. research.stages.TrainStage(steps=500)")
    for i, stage in enumerate(config.stages):
        kind = getattr(stage, "kind", None)
        if kind not in list_stages():
            raise ConfigError(
                f"stages.{i} has kind {kind!r}, which is not registered; registered: {list_stages()}{missing_plugins_hint()}"
            )
    top = dataclasses.replace(config, stages=())  # the stages are checked below, with their context
    validate_fields(top, "")
    earlier: list[str] = []
    for i, stage in enumerate(config.stages):
        validate_fields(stage, stage_key(config.stages, i), ValidationContext(earlier=tuple(earlier)))
        earlier += [f"{i}_{stage.kind}", stage.kind]


def to_dict(obj: Any) -> Any:
    """A JSON-friendly dict of a config (stages carry their ``kind``)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        kind = getattr(obj, "kind", None)
        if kind is not None:
            out = {"kind": kind, **out}
        return out
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def to_json(config: Config) -> str:
    return json.dumps(to_dict(config), indent=2, sort_keys=True, default=str)
