"""Recipes: a model's structure as JSON data, replayed from the base config.

A finished stage is stored as its parameters and state (plain arrays) plus a **recipe**: the
list of structural changes that turn the config's zoo model into the stage's model. Each step
is a JSON object ``{"kind": ..., "data": {...}}``; replaying a recipe calls the registered
function of each step's kind::

    model = None
    for step in recipe:
        model = STEPS[step["kind"]](model, step["data"])

The first step is always ``zoo_model`` (build a registered zoo model from its name, options,
input shape, class count and seed). Methods register the steps of their surgery when they are
imported (``methods.pruning`` registers ``remove_channels``, ``methods.decomposition``
``factorize``, ``methods.quantization`` ``fold_batchnorm``, ``quantize_model`` and
``quant_static``), so ``research`` never imports ``methods``. A stage that changes the model's
structure appends its step to ``bundle.recipe`` (:func:`append`); the runner checks at save time
that the recipe rebuilds exactly the model's graph (:func:`check`), so a forgotten step fails
when the stage finishes, not when the run directory is opened later.

Replaying a recipe only calls registered functions with JSON data: opening a run directory
never executes code stored in it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

from flax import nnx

from research.registry import Registry
from research.registry import did_you_mean

Step = dict[str, Any]
StepFn = Callable[[nnx.Module | None, dict[str, Any]], nnx.Module]
STEPS: Registry[StepFn] = Registry("recipe step", hint="register its replay with @register_step('kind')")


class RecipeError(ValueError):
    """A recipe that cannot be built, or that does not rebuild the model it describes."""


def register_step(kind: str) -> Callable[[StepFn], StepFn]:
    """Registers ``fn(model, data) -> model`` as the replay of recipe steps of ``kind``.

    Registering the same function again is a no-op.

    Raises:
      ValueError: empty ``kind``; DuplicateNameError (a ``ValueError``) when another function
        is registered as ``kind``.
    """
    if not kind:
        raise ValueError("a recipe step kind must be a non-empty string")
    return STEPS.register(kind)


def list_steps() -> list[str]:
    """The registered step kinds."""
    return STEPS.names()


def step(kind: str, **data: Any) -> Step:
    """A recipe step of a registered ``kind`` with JSON ``data`` (tuples become lists).

    Raises:
      RecipeError: unregistered kind, or data that is not plain JSON (names the value).
    """
    if kind not in STEPS:
        raise RecipeError(
            f"recipe step {kind!r} is not registered;{did_you_mean(kind, list_steps())} registered: {list_steps()}"
        )
    try:
        data = json.loads(json.dumps(data, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise RecipeError(
            f"recipe step {kind!r} holds data that is not plain JSON ({e}); store numbers, strings, lists and dicts"
        ) from None
    return {"kind": kind, "data": data}


def append(recipe: Sequence[Step], *steps: Step) -> tuple[Step, ...]:
    """``recipe`` followed by ``steps`` (a new tuple; bundles share recipes)."""
    return (*tuple(recipe), *steps)


def zoo_step(name: str, options: dict[str, Any], input_shape: Sequence[int], num_classes: int, seed: int) -> Step:
    """The first step of every recipe: the zoo model ``name`` built with ``options``."""
    return step(
        "zoo_model",
        name=name,
        options=dict(options),
        input_shape=list(input_shape),
        num_classes=int(num_classes),
        seed=int(seed),
    )


def _tuples(x: Any) -> Any:
    """JSON lists back to tuples (model options are frozen, hashable values)."""
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    return x


def zeros_like_abstract(abstract: nnx.Module) -> nnx.Module:
    """A concrete copy of an ``nnx.eval_shape`` model with every array zero (keys: ``key(0)``).

    Replays only need the structure (stored values replace every array), and zeros cost no
    compilation, whereas random initialisers compile once per shape.
    """
    import jax
    import numpy as np

    def concrete(leaf):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            n = int(np.prod(leaf.shape))
            keys = jax.random.key(0) if not leaf.shape else jax.random.split(jax.random.key(0), n)
            return keys.reshape(leaf.shape)
        return jax.device_put(np.zeros(leaf.shape, leaf.dtype))

    graphdef, state = nnx.split(abstract)
    pure = jax.tree.map(concrete, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


@register_step("zoo_model")
def _zoo_model(model: nnx.Module | None, data: dict[str, Any]) -> nnx.Module:
    from research.nn import build_model

    return zeros_like_abstract(
        nnx.eval_shape(
            lambda: build_model(
                data["name"],
                input_shape=tuple(data["input_shape"]),
                num_classes=int(data["num_classes"]),
                rngs=nnx.Rngs(int(data["seed"])),
                **_tuples(data["options"]),
            )
        )
    )


def build(recipe: Sequence[Step]) -> nnx.Module:
    """Replays ``recipe`` and returns the model (evaluation mode; values as initialised).

    Raises:
      RecipeError: an empty recipe, a malformed step, an unregistered kind (say which package
        to import), or a step whose replay fails (names the step).
    """
    if not recipe:
        raise RecipeError("the recipe is empty; its first step must be a 'zoo_model' step")
    model = None
    for i, st in enumerate(recipe):
        if not isinstance(st, dict) or not isinstance(st.get("kind"), str) or not isinstance(st.get("data"), dict):
            raise RecipeError(f"recipe step {i} is not an object with a 'kind' string and a 'data' object: {st!r:.200}")
        if st["kind"] not in STEPS:
            raise RecipeError(
                f"recipe step {i} has kind {st['kind']!r}, which is not registered;{did_you_mean(st['kind'], list_steps())}"
                f" (registered: {list_steps()}); "
                "register the package that defines it first (research.stages.load_all_stages() calls the "
                "installed stage plugins)"
            )
        fn = STEPS.get(st["kind"])
        if i == 0 and st["kind"] != "zoo_model":
            raise RecipeError(f"the first recipe step must be 'zoo_model', not {st['kind']!r}")
        try:
            model = fn(model, st["data"])
        except RecipeError:
            raise
        except Exception as e:
            raise RecipeError(f"recipe step {i} ({st['kind']!r}) failed to replay: {type(e).__name__}: {e}") from e
    model.eval()
    return model


def _describe_difference(expected: nnx.Module, rebuilt: nnx.Module) -> str:
    def shapes(m):
        from research.tree import flatten_with_paths

        return {p: tuple(getattr(x, "shape", ())) for p, x in flatten_with_paths(nnx.to_pure_dict(nnx.state(m)))}

    a, b = shapes(expected), shapes(rebuilt)
    lines = []
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a:
        lines.append(f"only in the model: {only_a[:8]}")
    if only_b:
        lines.append(f"only in the rebuilt model: {only_b[:8]}")
    differ = [f"{p} {a[p]} vs {b[p]}" for p in sorted(set(a) & set(b)) if a[p] != b[p]]
    if differ:
        lines.append(f"shapes differ: {differ[:8]}")
    if not lines:
        lines.append("same variables and shapes, different static settings (module types or attributes)")
    return "; ".join(lines)


def check(model: nnx.Module, recipe: Sequence[Step], *, where: str = "the model") -> nnx.Module:
    """Replays ``recipe`` and checks that it gives ``model``'s graph (modules, settings, shapes).

    Returns:
      The rebuilt model (its values are the replay's, not ``model``'s).

    Raises:
      RecipeError: the recipe does not rebuild ``model``; the message says what differs and that
        the stage which changed the structure must append its step to ``bundle.recipe``.
    """
    rebuilt = build(recipe)
    expected = nnx.clone(model)
    expected.eval()
    if nnx.graphdef(expected) != nnx.graphdef(rebuilt):
        kinds = [s["kind"] for s in recipe]
        raise RecipeError(
            f"the recipe {kinds} does not rebuild {where}: {_describe_difference(expected, rebuilt)}. "
            "A stage that changes the model's structure must append a recipe step to bundle.recipe "
            "(research.recipe.append with a step registered by research.recipe.register_step)"
        )
    return rebuilt
