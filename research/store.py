"""A finished stage stored as data: arrays, a JSON recipe and JSON records. No pickle.

A finished stage's directory ``stages/<i>_<kind>/`` holds ``result/``::

    result/recipe.json   the structure: recipe steps that rebuild the model from the base config
    result/state.npz     the model's parameters and state (plain arrays, one per variable path)
    result/state.json    the variable paths of the arrays in state.npz (and PRNG key impls)
    result/extras.json   the stage's extras (masks, quantization parameters...) as JSON, with
    result/extras.npz    their arrays
    result/record.json   the stage's report record (metrics, tables, notes, artifacts)

``result/`` is written under a temporary name and renamed into place, so it exists only when
complete. Loading rebuilds the model from the recipe (registered replay functions only), reads
arrays with ``numpy.load(allow_pickle=False)`` and JSON with ``json.load``: nothing stored in a
run directory is ever executed. A ``result.pkl`` written by older versions is refused (never
opened) with a message saying to rerun the stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from research import recipe as recipe_lib
from research.tree import flatten_with_paths
from research.tree import map_with_paths

RESULT = "result"
LEGACY_RESULT = "result.pkl"
FORMAT_VERSION = 1


class StoreError(RuntimeError):
    """A stage result that cannot be stored or read (the message names the file and the fix)."""


@dataclasses.dataclass
class StageData:
    """What a finished stage left: its model, extras, report record and recipe."""

    model: nnx.Module
    extras: dict[str, Any]
    record: dict[str, Any]
    recipe: tuple[dict[str, Any], ...]


def result_dir(stage_dir: str | os.PathLike) -> str:
    """The ``result/`` directory of a stage directory."""
    return os.path.join(os.fspath(stage_dir), RESULT)


def check_not_legacy(stage_dir: str | os.PathLike) -> None:
    """Refuses a stage directory holding an old ``result.pkl`` (never opened).

    Raises:
      StoreError: ``result.pkl`` exists and ``result/`` does not.
    """
    legacy = os.path.join(os.fspath(stage_dir), LEGACY_RESULT)
    if os.path.exists(legacy) and not os.path.isdir(result_dir(stage_dir)):
        raise StoreError(
            f"{legacy} is a pickle written by an older slimjax; it is not loaded, because opening a pickle "
            f"can run code. Rerun this stage: delete {os.fspath(stage_dir)} (or the whole run directory) and "
            "run again, or use a new --workdir"
        )


def is_finished(stage_dir: str | os.PathLike) -> bool:
    """Whether ``stage_dir`` holds a complete stored result.

    Raises:
      StoreError: the directory holds a legacy ``result.pkl`` instead (see :func:`check_not_legacy`).
    """
    check_not_legacy(stage_dir)
    return os.path.isfile(os.path.join(result_dir(stage_dir), "recipe.json"))


# ----------------------------------------------------------------------------- arrays


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _plain(x: Any) -> tuple[np.ndarray, str | None]:
    """A numpy array for ``x`` and the PRNG implementation name when ``x`` is a typed key."""
    if _is_key(x):
        return np.asarray(jax.random.key_data(x)), str(jax.random.key_impl(x))
    arr = np.asarray(x)
    if arr.dtype.hasobject:
        raise TypeError(f"an array of Python objects ({arr.dtype}) is not data")
    return arr, None


def _save_npz(path: str, arrays: list[np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, **{f"a{i}": a for i, a in enumerate(arrays)})


def _load_npz(path: str, count: int) -> list[np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return [np.asarray(z[f"a{i}"]) for i in range(count)]
    except FileNotFoundError:
        raise StoreError(f"{path} is missing; the stage result is incomplete, rerun the stage") from None
    except Exception as e:  # truncated or altered file; allow_pickle=False refuses object arrays
        raise StoreError(f"{path} cannot be read ({type(e).__name__}: {e}); rerun the stage") from None


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise StoreError(f"{path} is missing; the stage result is incomplete, rerun the stage") from None
    except json.JSONDecodeError as e:
        raise StoreError(f"{path} is not valid JSON ({e}); rerun the stage") from None


def _write_json(path: str, obj: Any, **kw: Any) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(obj, indent=1, **kw) + "\n")


# ----------------------------------------------------------------------------- extras as data


def encode(obj: Any, arrays: list[np.ndarray], where: str = "extras") -> Any:
    """``obj`` as JSON with its arrays appended to ``arrays`` (referenced by index).

    Dicts, lists, tuples, strings, numbers, booleans, ``None`` and arrays (numpy, JAX, typed
    PRNG keys) are data; anything else is refused.

    Raises:
      StoreError: a value that is not data (names where it is and its type).
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, float)) and not isinstance(obj, (np.generic,)):
        return obj
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise StoreError(f"{where} has a key {k!r} of type {type(k).__name__}; keys must be strings or ints")
            items.append([k, encode(v, arrays, f"{where}[{k!r}]")])
        return {"dict": items}
    if isinstance(obj, (list, tuple)):
        return {
            "list" if isinstance(obj, list) else "tuple": [
                encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(obj)
            ]
        }
    if isinstance(obj, (np.ndarray, np.generic, jax.Array)):
        try:
            arr, impl = _plain(obj)
        except TypeError as e:
            raise StoreError(f"{where}: {e}") from None
        arrays.append(arr)
        out: dict[str, Any] = {"array": len(arrays) - 1}
        if isinstance(obj, np.generic):
            out["scalar"] = True
        if impl is not None:
            out["key_impl"] = impl
        return out
    raise StoreError(
        f"{where} holds a {type(obj).__module__}.{type(obj).__name__}, which cannot be stored as data; "
        "a stage's extras must be arrays, numbers, strings, None, lists, tuples and dicts"
    )


def decode(obj: Any, arrays: Sequence[np.ndarray]) -> Any:
    """The inverse of :func:`encode`.

    Raises:
      StoreError: a malformed object (unknown tag, bad array index).
    """
    if obj is None or isinstance(obj, (bool, str, int, float)):
        return obj
    if isinstance(obj, dict) and len(obj) >= 1:
        if "dict" in obj:
            return {k: decode(v, arrays) for k, v in obj["dict"]}
        if "list" in obj:
            return [decode(v, arrays) for v in obj["list"]]
        if "tuple" in obj:
            return tuple(decode(v, arrays) for v in obj["tuple"])
        if "array" in obj:
            i = obj["array"]
            if not isinstance(i, int) or not 0 <= i < len(arrays):
                raise StoreError(f"array reference {i!r} is out of range (0..{len(arrays) - 1})")
            arr = arrays[i]
            if "key_impl" in obj:
                return jax.random.wrap_key_data(arr, impl=obj["key_impl"])
            return arr[()] if obj.get("scalar") else arr
    raise StoreError(f"malformed stored value {obj!r:.200}")


# ----------------------------------------------------------------------------- save / load


def _model_arrays(model: nnx.Module) -> tuple[list[str], list[np.ndarray], dict[str, str]]:
    flat = flatten_with_paths(nnx.to_pure_dict(nnx.state(model)))
    paths, arrays, keys = [], [], {}
    for path, leaf in flat:
        arr, impl = _plain(leaf)
        paths.append(path)
        arrays.append(arr)
        if impl is not None:
            keys[path] = impl
    return paths, arrays, keys


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.generic, jax.Array)) and np.ndim(x) == 0:
        return np.asarray(x).item()
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    return str(x)


_REBUILT: dict[str, tuple[Any, list[str], list[tuple[int, ...]]]] = {}  # recipe -> graph, paths, shapes
_REBUILT_KEPT = 64


def _rebuilt_layout(model: nnx.Module, recipe: Sequence[dict[str, Any]], where: str) -> tuple[list, list]:
    """The variable paths and shapes of the model ``recipe`` rebuilds, after checking that it
    rebuilds ``model``'s graph (:func:`research.recipe.check`). A recipe is replayed once per
    process: later stages with the same recipe and graph (a sweep's trials) compare graphs only
    (a LeNet-5 replay takes ~20 ms, the comparison ~1 ms)."""
    key = json.dumps(list(recipe), sort_keys=True, default=str)
    expected = nnx.clone(model)
    expected.eval()
    graph = nnx.graphdef(expected)
    kept = _REBUILT.get(key)
    if kept is not None and kept[0] == graph:
        return kept[1], kept[2]
    rpaths, rarrays, _ = _model_arrays(recipe_lib.check(model, recipe, where=where))
    rshapes = [a.shape for a in rarrays]
    if len(_REBUILT) >= _REBUILT_KEPT:
        _REBUILT.clear()
    _REBUILT[key] = (graph, rpaths, rshapes)
    return rpaths, rshapes


def save_stage(
    stage_dir: str | os.PathLike,
    *,
    model: nnx.Module,
    extras: dict[str, Any],
    record: dict[str, Any],
    recipe: Sequence[dict[str, Any]],
) -> str:
    """Stores a finished stage in ``stage_dir/result/`` (atomically) and returns that path.

    The recipe is checked first: it must rebuild ``model``'s exact graph, and the model's arrays
    must load into the rebuilt model.

    Raises:
      research.recipe.RecipeError: the recipe does not rebuild the model.
      StoreError: an extra that is not data (names the key).
    """
    stage_dir = os.fspath(stage_dir)
    where = f"the model of {os.path.basename(stage_dir) or stage_dir}"
    rpaths, rshapes = _rebuilt_layout(model, recipe, where)
    paths, arrays, keys = _model_arrays(model)
    if rpaths != paths or rshapes != [a.shape for a in arrays]:
        raise recipe_lib.RecipeError(f"the recipe rebuilds {where} with different variables or shapes")
    extra_arrays: list[np.ndarray] = []
    extras_json = {k: encode(v, extra_arrays, f"bundle.extras[{k!r}]") for k, v in extras.items()}
    final = result_dir(stage_dir)
    tmp = final + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    _save_npz(os.path.join(tmp, "state.npz"), arrays)
    _write_json(
        os.path.join(tmp, "state.json"),
        {"version": FORMAT_VERSION, "paths": paths, "dtypes": [str(a.dtype) for a in arrays], "key_impls": keys},
    )
    _save_npz(os.path.join(tmp, "extras.npz"), extra_arrays)
    _write_json(os.path.join(tmp, "extras.json"), {"count": len(extra_arrays), "extras": extras_json})
    _write_json(os.path.join(tmp, "record.json"), record, default=_jsonable)
    _write_json(os.path.join(tmp, "recipe.json"), {"version": FORMAT_VERSION, "steps": list(recipe)})
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_model(stage_dir: str | os.PathLike) -> tuple[nnx.Module, tuple[dict[str, Any], ...]]:
    """``(model, recipe)`` of a finished stage: the recipe replayed, then the stored arrays loaded.

    Raises:
      StoreError: missing, legacy or unreadable files; arrays that do not fit the rebuilt model.
      research.recipe.RecipeError: a recipe that cannot be replayed.
    """
    stage_dir = os.fspath(stage_dir)
    check_not_legacy(stage_dir)
    rdir = result_dir(stage_dir)
    if not os.path.isdir(rdir):
        raise StoreError(f"{stage_dir} has no finished stage result ({rdir} is missing); run the stage first")
    rec = _read_json(os.path.join(rdir, "recipe.json"))
    if not isinstance(rec, dict) or not isinstance(rec.get("steps"), list):
        raise StoreError(f"{os.path.join(rdir, 'recipe.json')} has no 'steps' list; rerun the stage")
    recipe = tuple(rec["steps"])
    model = recipe_lib.build(recipe)
    meta = _read_json(os.path.join(rdir, "state.json"))
    paths = meta.get("paths", []) if isinstance(meta, dict) else []
    arrays = dict(zip(paths, _load_npz(os.path.join(rdir, "state.npz"), len(paths)), strict=True))
    keys = meta.get("key_impls", {})
    state = nnx.state(model)
    pure = nnx.to_pure_dict(state)
    want = dict(flatten_with_paths(pure))
    if set(want) != set(arrays):
        raise StoreError(
            f"{rdir}/state.npz does not fit the model its recipe rebuilds: missing {sorted(set(want) - set(arrays))[:8]}, "
            f"unexpected {sorted(set(arrays) - set(want))[:8]}; rerun the stage"
        )

    def value(path, leaf):
        arr = arrays[path]
        if path in keys:
            return jax.random.wrap_key_data(arr, impl=keys[path])
        ref = np.asarray(leaf)
        if arr.shape != ref.shape or arr.dtype != ref.dtype:
            raise StoreError(
                f"{rdir}/state.npz: {path} is {arr.dtype}{list(arr.shape)} but the rebuilt model needs "
                f"{ref.dtype}{list(ref.shape)}; rerun the stage"
            )
        return jax.device_put(arr)  # a transfer (jnp.asarray compiles a program per shape)

    nnx.replace_by_pure_dict(state, map_with_paths(value, pure))
    nnx.update(model, state)
    model.eval()
    return model, recipe


def load_stage(stage_dir: str | os.PathLike) -> StageData:
    """Everything a finished stage stored: model, extras, record, recipe.

    Raises:
      StoreError: missing, legacy or unreadable files (the message names the file).
    """
    model, recipe = load_model(stage_dir)
    rdir = result_dir(stage_dir)
    ex = _read_json(os.path.join(rdir, "extras.json"))
    extra_arrays = _load_npz(os.path.join(rdir, "extras.npz"), int(ex["count"]))
    extras = {k: decode(v, extra_arrays) for k, v in ex["extras"].items()}
    record = _read_json(os.path.join(rdir, "record.json"))
    return StageData(model=model, extras=extras, record=record, recipe=recipe)
