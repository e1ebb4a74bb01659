"""The pruning registries that a config names, with the names of their built-in entries declared.

Standard library only: ``PruneStage.scorer`` and ``PruneStage.channel_score`` are checked against
these before JAX is imported. Each registry is the one its module registers into
(``methods.pruning.scores.SCORERS`` is :data:`SCORERS`); each declaration names the function its
module registers on import (:meth:`research.registry.Registry.register_lazy`). The conformance
test (``tests/test_registry.py``) checks that the registered names equal the declared ones.
"""

from __future__ import annotations

from typing import Any

from research.registry import Registry

#: Unstructured importance scores (``methods.pruning.scores``): ``PruneStage.scorer``.
SCORERS: Registry[Any] = Registry(
    "pruning scorer", hint="register one with @register_scorer('name') (fn(weight, grad, key) -> scores)"
)
#: Channel scores of structured pruning (``methods.pruning.structured.channels``): ``PruneStage.channel_score``.
CHANNEL_SCORES: Registry[Any] = Registry("channel score", hint="register one with @register_channel_score('name')")
#: Grow criteria of dynamic sparse training (``methods.pruning.dst``).
GROW: Registry[Any] = Registry(
    "dynamic-sparse grow criterion", hint="register one with @register_grow('name') (fn(weight, grad, key) -> scores)"
)

for _name, _attr in [("magnitude", "magnitude_score"), ("random", "random_score"), ("saliency", "saliency_score")]:
    SCORERS.register_lazy(_name, f"methods.pruning.scores:{_attr}")
for _name in ("bn_scale", "l1", "l2", "taylor"):
    CHANNEL_SCORES.register_lazy(_name, f"methods.pruning.structured.channels:{_name}_channel_score")
GROW.register_lazy("rigl", "methods.pruning.dst:_grow_gradient")
GROW.register_lazy("set", "methods.pruning.dst:_grow_random")


def registries() -> dict[str, Registry]:
    """The registries declared here, by the name the package exports them under."""
    return {"SCORERS": SCORERS, "CHANNEL_SCORES": CHANNEL_SCORES, "GROW": GROW}
