"""The stored trained models (tests/trained_models.py): complete, loadable, refused when stale."""

from __future__ import annotations

import json

import numpy as np
import pytest
import trained_models as T

from research.data import load_dataset


@pytest.fixture(scope="module")
def datasets():
    return {name: load_dataset(name, seed=0) for name in {r.dataset for r in T.recipes().values()}}


def test_every_recipe_has_its_file_and_nothing_else_is_stored():
    manifest = json.loads(T.MANIFEST.read_text())
    assert sorted(manifest) == sorted(T.recipes())
    assert sorted(p.stem for p in T.DATA.glob("*.npz")) == sorted(T.recipes())
    # Loading each is the export tests' fixtures (tests/research/export/test_export_zoo.py,
    # tests/research/test_sequence_models.py); here: every one was stored trained.
    assert all(entry["test_accuracy"] >= 0.9 for entry in manifest.values()), manifest


def test_a_changed_recipe_is_refused_naming_the_command(monkeypatch, datasets):
    table = T.recipes()
    changed = dict(table, zoo_mlp=T.Recipe(**{**table["zoo_mlp"].as_json(), "steps": 151}))
    monkeypatch.setattr(T, "recipes", lambda: changed)
    with pytest.raises(
        T.StaleTrainedModel, match=r"made by recipe .*'steps': 150.*python tests/trained_models.py zoo_mlp"
    ):
        T.load("zoo_mlp", datasets["digits"])


def test_arrays_that_do_not_fit_the_model_are_refused(monkeypatch, datasets):
    table = T.recipes()
    wider = T.Recipe(**{**table["zoo_mlp"].as_json(), "options": {"widths": [33]}})
    build = T._build
    monkeypatch.setattr(T, "_build", lambda recipe, ds: build(wider, ds))
    with pytest.raises(
        T.StaleTrainedModel,
        match=r"zoo_mlp.npz: head/kernel is float32\[32, 10\], the model's float32\[33, 10\]; remake",
    ):
        T.load("zoo_mlp", datasets["digits"])


def test_unknown_key_lists_the_recipes(datasets):
    with pytest.raises(KeyError, match="zoo_resnet56"):
        T.load("zoo_resnet57", datasets["digits"])


def test_recipe_trains_what_it_stored_and_saving_round_trips(tmp_path, monkeypatch, datasets):
    """The cheapest recipe retrained here reaches the stored accuracy (other weights on another CPU,
    so within a few test images), and save + load gives back the same function."""
    ds = datasets["digits"]
    recipe = T.recipes()["zoo_mlp"]
    _, stored_accuracy = T.load("zoo_mlp", ds)
    model = T.train(recipe, ds)
    acc = T.accuracy(model, recipe, ds)
    assert abs(acc - stored_accuracy) <= 0.03, (acc, stored_accuracy)
    monkeypatch.setattr(T, "DATA", tmp_path)
    monkeypatch.setattr(T, "MANIFEST", tmp_path / "manifest.json")
    T.save("zoo_mlp", model, acc)
    entry = json.loads((tmp_path / "manifest.json").read_text())["zoo_mlp"]
    assert entry["recipe"] == recipe.as_json() and entry["test_accuracy"] == round(acc, 6)
    loaded, loaded_accuracy = T.load("zoo_mlp", ds)
    x = ds.x_test[:32]
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    assert loaded_accuracy == round(acc, 6)
