"""Deprecated field spellings of config dataclasses, kept working for one release.

A config class lists its old spellings in a ``renamed`` ClassVar, mapping an old field name to
its new dotted place: ``{"finetune": "train"}`` (a renamed field) or ``{"steps": "train.steps"}``
(a field moved into the nested ``train`` schedule). With :class:`RenamedFieldsMeta` as its
metaclass, the old constructor keyword still works and warns (``DeprecationWarning``) naming the
new spelling; ``research.config.apply_overrides`` does the same for the old ``--set`` key.
Standard library only.
"""

from __future__ import annotations

import dataclasses
import types
import typing
import warnings
from typing import Any


class RenamedFieldsMeta(type):
    """Translates a class's deprecated constructor keywords (its ``renamed``) before ``__init__`` runs."""

    def __call__(cls, *args, **kwargs):
        if getattr(cls, "renamed", None) and set(kwargs) & set(cls.renamed):
            kwargs = translate(cls, kwargs, warn=True)
        return super().__call__(*args, **kwargs)


def _field(cls: type, name: str) -> tuple[Any, Any]:
    """``(default value or None, the dataclass type the annotation names or None)`` of field ``name``."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            default = None
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            elif f.default is not dataclasses.MISSING:
                default = f.default
            ann = typing.get_type_hints(cls)[name]
            options = typing.get_args(ann) if typing.get_origin(ann) in (typing.Union, types.UnionType) else (ann,)
            nested = next((a for a in options if dataclasses.is_dataclass(a)), None)
            return default, nested
    raise TypeError(f"{cls.__name__} has no field {name!r}")


def _optional(cls: type, name: str) -> bool:
    ann = typing.get_type_hints(cls)[name]
    return typing.get_origin(ann) in (typing.Union, types.UnionType) and type(None) in typing.get_args(ann)


def translate(cls: type, kwargs: dict[str, Any], *, warn: bool) -> dict[str, Any]:
    """``kwargs`` with every deprecated keyword of ``cls.renamed`` moved to its new place.

    Old values are merged into a nested schedule given under its new name (``train=``). An old
    ``steps=0`` moved into an optional schedule (``train: TrainStage | None``) means "no
    fine-tuning": the schedule becomes ``None``.

    Args:
      cls: the config class.
      kwargs: the constructor keywords, old spellings included.
      warn: warn once per old keyword (the constructor does; ``--set`` warns itself).

    Raises:
      TypeError: a renamed field given under both its old and its new name.
    """
    kwargs = dict(kwargs)
    old = {k: kwargs.pop(k) for k in list(kwargs) if k in cls.renamed}
    off: set[str] = set()
    for name in sorted(old, key=lambda k: not cls.renamed[k].endswith(".steps")):  # steps=0 first
        value, new = old[name], cls.renamed[name]
        head, _, sub = new.partition(".")
        if warn:
            kind = getattr(cls, "kind", "") or cls.__name__
            nested_name = _field(cls, head)[1].__name__ if sub and _field(cls, head)[1] else ""
            spelled = f"{head}={nested_name}({sub}=...)" if sub else f"{head}=..."
            warnings.warn(
                f"{cls.__name__}({name}=...) is deprecated and will be removed in the next release; use "
                f"{cls.__name__}({spelled}) (override key stages.{kind}.{new})",
                DeprecationWarning,
                stacklevel=3,
            )
        if not sub:
            if head in kwargs:
                raise TypeError(f"{cls.__name__}: give {head}= or the deprecated {name}=, not both")
            kwargs[head] = value
            continue
        if head in off:
            continue  # a schedule switched off by steps=0: its other old settings do not matter
        if sub == "steps" and value == 0 and _optional(cls, head):
            kwargs[head] = None
            off.add(head)
            continue
        nested = kwargs.get(head)
        if nested is None:
            default, nested_cls = _field(cls, head)
            nested = default if default is not None else nested_cls()
        kwargs[head] = dataclasses.replace(nested, **{sub: value})
    return kwargs
