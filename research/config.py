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
import importlib.util
import json
import os
import sys
import types
import typing
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any


class ConfigError(ValueError):
    """A bad config file, override key or value; the message names it and lists valid keys."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which zoo model to build; ``options`` are its keyword options (see ``research.nn.model_kwargs``)."""

    name: str = "mlp"
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which shipped data set to load and how to split it."""

    name: str = "digits"
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    limit: int | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


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

    name: str = "run"
    seed: int = 0
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    stages: tuple[Any, ...] = ()
    latency_batch_size: int = 1


# ----------------------------------------------------------------------------- loading


def load_config(spec: str) -> Config:
    """Loads ``path/to/config.py[:arg]`` and calls its ``get_config(arg)``.

    Raises:
      ConfigError: missing file, no ``get_config``, or it does not return a :class:`Config`.
    """
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist (give a path like configs/quickstart.py)")
    mod_name = "slimjax_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(module_spec)
    # Registered before it runs, so dataclasses (and `from __future__ import annotations`) in the
    # config file can resolve their own module.
    sys.modules[mod_name] = module
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} has no get_config(arg=None) function")
    config = module.get_config(arg or None)
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
            raise ConfigError(f"{key}={value!r} must be a list/tuple, e.g. [1, 2]")
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
    if head not in fields:
        where = type(obj).__name__
        raise ConfigError(f"unknown key {key!r}: {where} has no field {head!r}; valid keys: {sorted(fields)}")
    current = getattr(obj, head)
    if rest:
        new_value = _set(current, rest, value, key)
    else:
        new_value = _check_type(value, _field_types(obj)[head], key)
    return dataclasses.replace(obj, **{head: new_value})


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


def validate(config: Config) -> None:
    """Checks names and options against the registries before anything is trained.

    Raises:
      ConfigError: unknown model/data set/stage kind, or a model option the model lacks.
    """
    from research.data import list_datasets
    from research.nn import list_models
    from research.nn import model_kwargs
    from research.stages import list_stages

    if config.model.name not in list_models():
        raise ConfigError(f"model.name={config.model.name!r} is not a registered model; choose from {list_models()}")
    valid = model_kwargs(config.model.name)
    bad = sorted(set(config.model.options) - set(valid))
    if bad:
        raise ConfigError(f"model.options {bad} are not options of {config.model.name!r}; valid keys: {sorted(valid)}")
    if config.data.name not in list_datasets():
        raise ConfigError(f"data.name={config.data.name!r} is not a registered data set; choose from {list_datasets()}")
    if not config.stages:
        raise ConfigError("the config has no stages; add e.g. research.stages.TrainStage(steps=500)")
    for i, stage in enumerate(config.stages):
        kind = getattr(stage, "kind", None)
        if kind not in list_stages():
            raise ConfigError(f"stages.{i} has kind {kind!r}, which is not registered; registered: {list_stages()}")
        check = getattr(stage, "validate", None)
        if check is not None:
            check()


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
