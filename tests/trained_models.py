"""Trained models that the export tests check, shipped as test data instead of trained in every run.

The int8 export tests need models with real margins, and training them was the largest cost of
the suite (ResNet-56, MobileNetV2, the ViT, ResNet-20 and the attention + GRU model: about 300 s of
CPU on a 2-core AMD EPYC). It also made their results depend on the CPU: XLA emits other code for
AVX2 than for AVX-512, so one seed trained other weights on each machine, and the int8 agreement
of a borderline model moved across its bound from one CPU to the next. The weights are therefore
trained once, by this file, and stored in ``tests/data/trained/`` as plain arrays (read with
``allow_pickle=False``) with the recipe that made them; every machine then checks the export of
the same weights.

Regenerate after changing a recipe or a model's variables (a test that loads a stale file fails
and names this command)::

    NPROC=1 python tests/trained_models.py            # every recipe (about 6 minutes on 2 cores)
    NPROC=1 python tests/trained_models.py resnet56   # one

Training itself stays tested: ``tests/research/test_train.py`` trains with :func:`train_scan`,
and ``test_recipe_trains_what_it_stored`` in ``tests/research/export/test_export_zoo.py``
retrains the cheapest recipe and finds the accuracy stored for it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import sys
from typing import Any

import numpy as np

DATA = pathlib.Path(__file__).resolve().parent / "data" / "trained"
MANIFEST = DATA / "manifest.json"
REGENERATE = "NPROC=1 python tests/trained_models.py"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a stored model was made: ``train_scan`` from ``nnx.Rngs(0)`` on a shipped data set.

    Attributes:
      model: the zoo name.
      dataset: the data set (seed 0, the default splits).
      options: the model's build options.
      steps, batch_size, seed: ``train_scan``'s arguments (Adam, learning rate 1e-2).
      flat: feed the images as vectors (a 1-D model on digits).
      int8_epsilon_steps: then (``> 0``) raise the LayerNorm epsilons to this many steps of their
        variance's int8 grid (:func:`methods.quantization.int8_norm_epsilon` on the first 256
        training inputs); the new epsilons are stored in the manifest and set again by :func:`load`.
      finetune_steps: then (``> 0``) fine-tune this many steps with :func:`research.train.finetune`
        (Adam, learning rate 1e-3, constant schedule, its default batch size and seed 0).

    The last two fields were added later: the manifest names them only when they are set, so the
    entries written before them still match their recipes.
    """

    model: str
    dataset: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    steps: int = 150
    batch_size: int = 128
    seed: int = 0
    flat: bool = False
    int8_epsilon_steps: float = 0.0
    finetune_steps: int = 0

    def as_json(self) -> dict[str, Any]:
        """The recipe as the manifest stores it (JSON types only; the later fields only when set)."""
        out = dataclasses.asdict(self)
        for name in _LATER_FIELDS:
            if out[name] == _DEFAULTS[name]:
                del out[name]
        return json.loads(json.dumps(out))


_LATER_FIELDS = ("int8_epsilon_steps", "finetune_steps")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Recipe)}


def _zoo_recipes() -> dict[str, Recipe]:
    from research.nn import TINY_OPTIONS
    from research.nn import list_models

    # Deep narrow nets need more steps for margins that survive int8: after 150 steps ResNet-56
    # (width 4) agreed 0.983 and MobileNetV2 (x0.25, symmetric Q/DQ) 0.989; after 400 both >= 0.994.
    # ResNet-20's symmetric Q/DQ file executed as written agreed 0.989 after 150 steps.
    steps = {"resnet20": 400, "resnet56": 400, "mobilenetv2": 400, "vit": 1500, "attn_gru": 1500}
    # MobileNetV2 at batch 64: over data-order seeds 0-2 its int8 files agreed >= 0.997.
    batch = {"mobilenetv2": 64}
    # ResNet-56 at width 8, not the zoo's tiniest 4: over data-order seeds 0-7 on an AVX2 EPYC, width 4
    # agreed 0.9891-1.0 (TFLite/ONNX int8) and 0.9783-1.0 (symmetric Q/DQ), width 8 >= 0.9918 and
    # >= 0.9891 (experiments/int8_zoo/seeds.py). Training it costs ~4x; stored weights make that free.
    options = {"resnet56": {"width": 8}}
    out = {}
    for name in list_models():
        if name.endswith("_family"):  # the searchable families are exported untrained in test_families.py
            continue
        out[f"zoo_{name}"] = Recipe(
            model=name,
            dataset="digits",
            options=dict(options.get(name, TINY_OPTIONS.get(name, {}))),
            steps=steps.get(name, 150),
            batch_size=batch.get(name, 128),
            flat=name == "cnn1d",
        )
    return out


def recipes() -> dict[str, Recipe]:
    """Every stored model's recipe, by file name (``zoo_<model>``: digits; ``mnist1d_attn_gru``)."""
    out = _zoo_recipes()
    # The attention + GRU model at its default size on MNIST-1D (tests/research/test_sequence_models.py).
    out["mnist1d_attn_gru"] = Recipe(model="attn_gru", dataset="mnist1d", steps=1500)
    # The same, prepared for a full-int8 export (epsilon floor of 5 grid steps, 300 fine-tuning
    # steps: experiments/int8_seq/README.md). Stored rather than fine-tuned in the test, because
    # the fine-tuned weights follow the CPU's rounding and the int8 agreement follows the weights:
    # fine-tuned with XLA's LLVM optimisations off, the ONNX int8 file agreed 0.984 (bound 0.985),
    # with them 0.986.
    out["mnist1d_attn_gru_int8"] = dataclasses.replace(
        out["mnist1d_attn_gru"], int8_epsilon_steps=5.0, finetune_steps=300
    )
    return out


def inputs(recipe: Recipe, x: np.ndarray) -> np.ndarray:
    """``x`` as the recipe's model takes it."""
    return x.reshape(len(x), -1) if recipe.flat else x


def _build(recipe: Recipe, ds):
    from flax import nnx

    from research.nn import build_model

    shape = inputs(recipe, ds.x_train[:1]).shape[1:]
    return build_model(recipe.model, input_shape=shape, num_classes=ds.num_classes, rngs=nnx.Rngs(0), **recipe.options)


def _variables(model) -> list[tuple[str, Any]]:
    from flax import nnx

    from research.tree import flatten_with_paths

    return flatten_with_paths(nnx.state(model))


def accuracy(model, recipe: Recipe, ds) -> float:
    """Test-split top-1 accuracy of ``model`` (evaluation mode)."""
    model.eval()
    return float(np.mean(np.asarray(model(inputs(recipe, ds.x_test))).argmax(-1) == ds.y_test))


def train(recipe: Recipe, ds):
    """A model trained by ``recipe`` on ``ds`` (what the stored file holds, up to the CPU's rounding)."""
    from research.train import train_scan

    model = _build(recipe, ds)
    x = inputs(recipe, ds.x_train)
    train_scan(model, x, ds.y_train, steps=recipe.steps, batch_size=recipe.batch_size, seed=recipe.seed)
    if recipe.int8_epsilon_steps > 0:
        from methods.quantization import int8_norm_epsilon

        model, _ = int8_norm_epsilon(model, x[:256], steps=recipe.int8_epsilon_steps)
    if recipe.finetune_steps > 0:
        import tempfile

        from research.train import finetune

        with tempfile.TemporaryDirectory() as workdir:
            model, _ = finetune(
                model,
                ds,
                workdir=workdir,
                steps=recipe.finetune_steps,
                learning_rate=1e-3,
                schedule="constant",
                progress=False,
                checkpoint_every=0,
                eval_every=0,
                log_every=0,
            )
    return model


def norm_epsilons(model) -> dict[str, float]:
    """``{module path: epsilon}`` of every ``nnx.LayerNorm``/``nnx.RMSNorm`` in ``model``."""
    from flax import nnx

    from research.nn import iter_modules

    return {path: float(m.epsilon) for path, m in iter_modules(model) if isinstance(m, (nnx.LayerNorm, nnx.RMSNorm))}


def _read_manifest() -> dict[str, Any]:
    if not MANIFEST.exists():
        return {}
    return json.loads(MANIFEST.read_text())


class StaleTrainedModel(RuntimeError):
    """A stored model that does not match its recipe or its model's variables any more."""


def load(key: str, ds):
    """The stored model ``key`` (evaluation mode) and the test accuracy recorded when it was made.

    Args:
      key: a name from :func:`recipes` (``zoo_resnet56``...).
      ds: the recipe's data set (for the input shape and the class count).

    Raises:
      KeyError: ``key`` is not a recipe (the message lists them).
      StaleTrainedModel: the file is missing, was made by another recipe, or its arrays do not fit
        the model's variables (names, shapes, dtypes); the message names the command that remakes it.
    """
    from flax import nnx

    table = recipes()
    if key not in table:
        raise KeyError(f"no stored model {key!r}; the recipes are {sorted(table)}")
    recipe = table[key]
    path = DATA / f"{key}.npz"
    entry = _read_manifest().get(key)
    fix = f"remake it: {REGENERATE} {key}"
    if entry is None or not path.exists():
        raise StaleTrainedModel(f"{path} (or its entry in {MANIFEST.name}) is missing; {fix}")
    if entry["recipe"] != recipe.as_json():
        raise StaleTrainedModel(
            f"{path} was made by recipe {entry['recipe']}, but the recipe is now {recipe.as_json()}; {fix}"
        )
    model = _build(recipe, ds)
    want = _variables(model)
    with np.load(path, allow_pickle=False) as z:
        stored = {k: np.asarray(z[k]) for k in z.files}
    names = [n for n, _ in want]
    if sorted(stored) != sorted(names):
        missing, extra = sorted(set(names) - set(stored)), sorted(set(stored) - set(names))
        raise StaleTrainedModel(
            f"{path} does not fit {recipe.model}'s variables (missing {missing}, extra {extra}); {fix}"
        )
    for n, leaf in want:
        if stored[n].shape != np.shape(leaf) or stored[n].dtype != np.asarray(leaf).dtype:
            raise StaleTrainedModel(
                f"{path}: {n} is {stored[n].dtype}{list(stored[n].shape)}, the model's "
                f"{np.asarray(leaf).dtype}{list(np.shape(leaf))}; {fix}"
            )
    import jax

    state = nnx.state(model)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    assert len(leaves) == len(names)
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, [stored[n] for n in names]))
    if recipe.int8_epsilon_steps > 0:
        from research.nn import get_module

        for path, eps in entry["norm_epsilons"].items():
            get_module(model, path).epsilon = float(eps)
    model.eval()
    return model, float(entry["test_accuracy"])


def save(key: str, model, test_accuracy: float) -> pathlib.Path:
    """Stores ``model``'s variables as ``tests/data/trained/<key>.npz`` and its manifest entry."""
    import flax
    import jax

    from research.export.cpu import cpu_int8

    DATA.mkdir(parents=True, exist_ok=True)
    path = DATA / f"{key}.npz"
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **{n: np.asarray(v) for n, v in _variables(model)})
    os.replace(tmp, path)
    manifest = _read_manifest()
    manifest[key] = {
        "recipe": recipes()[key].as_json(),
        "test_accuracy": round(test_accuracy, 6),
        "made_with": f"jax {jax.__version__}, flax {flax.__version__}, Python {platform.python_version()}",
        "cpu": str(cpu_int8()),
        "xla_threads": os.environ.get("NPROC", "all cores"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    if recipes()[key].int8_epsilon_steps > 0:  # static settings, not variables: rebuilt by load()
        manifest[key]["norm_epsilons"] = norm_epsilons(model)
    MANIFEST.write_text(json.dumps(dict(sorted(manifest.items())), indent=1) + "\n")
    return path


def main(argv: list[str]) -> int:
    from research.data import load_dataset

    table = recipes()
    keys = [k if k in table else f"zoo_{k}" for k in argv] or sorted(table)
    unknown = [k for k in keys if k not in table]
    if unknown:
        print(f"unknown recipe(s) {unknown}; the recipes are {sorted(table)}", file=sys.stderr)
        return 2
    for key in keys:
        recipe = table[key]
        ds = load_dataset(recipe.dataset, seed=0)
        model = train(recipe, ds)
        acc = accuracy(model, recipe, ds)
        path = save(key, model, acc)
        print(f"{key:24s} test accuracy {acc:.4f}  {path.stat().st_size / 1024:7.1f} KiB  {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    sys.exit(main(sys.argv[1:]))
