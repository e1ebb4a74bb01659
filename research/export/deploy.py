"""Deploy hooks: how a model trained in a form the converters reject is turned into one they take.

A model after quantization-aware training (``methods.quantization``) contains fake-quant layers:
rounding ops in float. TFLite converts such a graph in float32, but its int8 converter cannot
re-quantize it. ``research`` never imports ``methods``, so the bridge is a registry: a method
package registers a hook with :func:`register_deploy_hook` when it is imported, and
:func:`research.export.export` asks the hooks (:func:`as_deployable`) before converting.

A hook takes the model and returns ``None`` when the model is not its kind, or a
:class:`Deployable`: a float model that computes what the trained model computes, in a form the
converters quantize (``methods.quantization`` bakes the fake-quantized kernels in as dequantized
values and clips each quantized input to its learned range, so that TFLite's int8 calibration
recovers the trained ranges), plus those ranges as ``activation_ranges`` for the export report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

from research.registry import Registry


@dataclasses.dataclass(frozen=True, kw_only=True)
class Deployable:
    """A float stand-in of a trained model, for the converters.

    Attributes:
      model: the float model (a ``flax.nnx.Module`` or a function ``x -> y``) converted for the
        TFLite and ONNX artifacts.
      activation_ranges: regular expression over TFLite tensor names -> learned ``(min, max)``
        (see ``activation_ranges`` of :func:`research.export.export`).
      source: the hook that produced it.
      notes: facts for the report (e.g. "4-bit activations deploy at 8 bits").
    """

    model: Any
    activation_ranges: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    source: str = ""
    notes: tuple[str, ...] = ()


DeployHook = Callable[[Any], "Deployable | None"]
DEPLOY_HOOKS: Registry[DeployHook] = Registry(
    "deploy hook", hint="register one with @research.export.deploy.register_deploy_hook('name')"
)


def register_deploy_hook(name: str) -> Callable[[DeployHook], DeployHook]:
    """Decorator registering ``hook(model) -> Deployable | None``; refuses a taken name (same definition again is fine).

    Example:
      >>> @register_deploy_hook("doc_example")
      ... def _never(model):
      ...     return None
      >>> "doc_example" in deploy_hooks()
      True
    """

    def deco(hook: DeployHook) -> DeployHook:
        return DEPLOY_HOOKS.register(name, hook)

    return deco


def deploy_hooks() -> tuple[str, ...]:
    """Names of the registered deploy hooks, in the order they are asked (by name)."""
    return tuple(DEPLOY_HOOKS.names())


def as_deployable(model: Any) -> Deployable | None:
    """Asks the registered hooks in name order; returns the first :class:`Deployable` or None.

    Args:
      model: the model about to be exported.

    Returns:
      The first hook's non-None answer (with ``source`` set to the hook's name), or None when no
      hook claims the model (it is exported as it is).
    """
    for name, hook in DEPLOY_HOOKS.items():
        dep = hook(model)
        if dep is not None:
            return dataclasses.replace(dep, source=dep.source or name)
    return None
