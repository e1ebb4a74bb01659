"""The distillation registry that a config names, with the names of its built-in entries declared.

Standard library only: the ``distill`` stage's KD term names can be checked against
:data:`KD_TERMS` before JAX is imported . It is the
registry ``methods.distillation.transforms`` registers into; each declaration names the factory
that module registers on import (:meth:`research.registry.Registry.register_lazy`). The
conformance test (``tests/test_registry.py``) checks that the registered names equal the declared ones.
"""

from __future__ import annotations

from typing import Any

from research.names import KD_TERMS
from research.registry import Registry

#: Distillation loss terms (``methods.distillation.transforms``): factories ``options -> KDTerm``.
#: The registry object is the core's (:data:`research.names.KD_TERMS`), so ``KDTermConfig`` checks
#: names against it; the built-in names are declared here.
KD_TERMS: Registry[Any]

for _name in ("attention", "attention_map", "dkd", "fitnets", "hidden_state", "hinton", "rkd_angle", "rkd_distance"):
    KD_TERMS.register_lazy(_name, f"methods.distillation.transforms:{_name}_term")


def registries() -> dict[str, Registry]:
    """The registry declared here, by the name the package exports it under."""
    return {"KD_TERMS": KD_TERMS}
