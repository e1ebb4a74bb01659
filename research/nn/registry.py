"""A decorator registry for zoo models: refuses duplicates and lists what it holds."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

from flax import nnx

import research.names as _names
from research.registry import Registry

# Created (with the built-in names declared) in the standard-library research.names, so configs are checked before JAX.
MODELS: Registry[Callable[..., nnx.Module]] = _names.MODELS


def register_model(name: str) -> Callable[[Callable[..., nnx.Module]], Callable[..., nnx.Module]]:
    """Registers a model constructor ``fn(input_shape, num_classes, *, rngs, **kwargs)``.

    Registering the same constructor again (a re-run notebook cell) is a no-op.

    Raises:
      DuplicateNameError: if another constructor is registered as ``name`` (a ``ValueError``).
    """
    return MODELS.register(name)


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return MODELS.names()


def model_kwargs(name: str) -> dict[str, Any]:
    """The keyword options a registered model accepts, with their defaults."""
    fn = get_model_fn(name)
    sig = inspect.signature(fn)
    return {k: p.default for k, p in sig.parameters.items() if p.kind == p.KEYWORD_ONLY and k != "rngs"}


def get_model_fn(name: str) -> Callable[..., nnx.Module]:
    """The constructor registered under ``name``.

    Raises:
      UnknownNameError: naming the unknown model, the closest and all registered ones (a ``KeyError``).
    """
    return MODELS.get(name)


def build_model(
    name: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    rngs: nnx.Rngs,
    **kwargs: Any,
) -> nnx.Module:
    """Builds a zoo model for inputs of ``input_shape`` (no batch dim) and ``num_classes``.

    Raises:
      KeyError: unknown model name.
      TypeError: an option the model does not take (the message lists the valid ones).
    """
    fn = get_model_fn(name)
    valid = model_kwargs(name)
    bad = sorted(set(kwargs) - set(valid))
    if bad:
        raise TypeError(f"model {name!r} has no option(s) {bad}; valid options: {valid}")
    return fn(tuple(input_shape), num_classes, rngs=rngs, **kwargs)
