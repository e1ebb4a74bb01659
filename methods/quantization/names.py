"""The quantization registries that a config names, with the names of their built-in entries declared.

Standard library only: ``QuantizeStage.method``, ``observer`` and ``weight_observer`` are checked
against these before JAX is imported. Each registry is the one its module registers into
(``methods.quantization.observers.OBSERVERS`` is :data:`OBSERVERS`); each declaration names the
class its module registers on import (:meth:`research.registry.Registry.register_lazy`). The
conformance test (``tests/test_registry.py``) checks that the registered names equal the declared ones.
"""

from __future__ import annotations

from typing import Any

from research.registry import Registry

#: Activation and kernel observers (``methods.quantization.observers``).
OBSERVERS: Registry[Any] = Registry("observer", hint="register one with @register_observer('name')")
#: Fake-quant methods (``methods.quantization.modules``; an instance of each class is registered).
QUANT_METHODS: Registry[Any] = Registry(
    "quantization method", hint="register a QuantMethod subclass with @register_method('name')"
)

for _name, _cls in [
    ("minmax", "MinMaxObserver"),
    ("moving_average", "MovingAverageObserver"),
    ("mse", "MSEObserver"),
    ("percentile", "PercentileObserver"),
]:
    OBSERVERS.register_lazy(_name, f"methods.quantization.observers:{_cls}")
for _name, _cls in [("lsq", "LsqMethod"), ("pact", "PactMethod"), ("ste", "SteMethod")]:
    QUANT_METHODS.register_lazy(_name, f"methods.quantization.modules:{_cls}")


def registries() -> dict[str, Registry]:
    """The registries declared here, by the name the package exports them under."""
    return {"OBSERVERS": OBSERVERS, "QUANT_METHODS": QUANT_METHODS}
