"""Run directories hold data only: nothing in them is unpickled or executed, and they rebuild exactly."""

import json
import os
import pathlib
import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from methods.distillation.stage import DistillStage
from methods.distillation.stage import resolve_teacher
from methods.pruning import PruneStage
from methods.quantization import QuantizeStage
from research import cli
from research import config as C
from research import recipe as recipe_lib
from research import run as run_lib
from research import store
from research.stages import Bundle
from research.stages import TrainStage

ROOT = pathlib.Path(__file__).resolve().parents[2]


class _Payload:
    """Unpickling this object would create the file ``marker`` (what a crafted pickle can do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _plant_pickle(stage_dir, marker):
    os.makedirs(stage_dir, exist_ok=True)
    with open(os.path.join(stage_dir, "result.pkl"), "wb") as f:
        pickle.dump({"model": _Payload(marker), "extras": {}, "record": {}}, f)
    # check the payload really runs when unpickled, so the tests below can fail
    probe = os.path.join(os.path.dirname(marker), "probe")
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert os.path.exists(probe)
    os.remove(probe)


def _config(**prune):
    train = TrainStage(steps=4, batch_size=32, checkpoint_every=2, eval_every=0, log_every=1)
    return C.Config(
        name="store",
        seed=0,
        model=C.ModelConfig(name="mlp", options={"widths": (16,)}),
        data=C.DataConfig(name="digits", limit=200),
        latency_batch_size=1,
        stages=(
            train,
            PruneStage(
                channel_ratio=0.5, sparsity=0.5, train=TrainStage(steps=2, batch_size=32, eval_every=0), **prune
            ),
            QuantizeStage(bits=8, calibration_examples=32),
        ),
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run (train, prune with channel removal and masks, PTQ) and the in-memory model
    of every stage as it was saved."""
    workdir = tmp_path_factory.mktemp("run")
    saved = {}
    real = store.save_stage

    def spy(stage_dir, **kw):
        saved[os.path.basename(stage_dir)] = nnx.clone(kw["model"])
        return real(stage_dir, **kw)

    store.save_stage = spy
    try:
        report = run_lib.run(_config(), str(workdir), progress=False, echo=False)
    finally:
        store.save_stage = real
    return workdir, report, saved


def _out(model, x):
    model = nnx.clone(model)
    model.eval()
    return np.asarray(model(jnp.asarray(x)))


def test_run_directory_holds_data_files_only(finished):
    workdir, _, _ = finished
    result = workdir / "stages" / "1_prune" / "result"
    names = sorted(os.listdir(result))
    assert names == ["extras.json", "extras.npz", "recipe.json", "record.json", "state.json", "state.npz"]
    steps = json.loads((result / "recipe.json").read_text())["steps"]
    assert [s["kind"] for s in steps] == ["zoo_model", "remove_channels"]
    final = json.loads((workdir / "stages" / "2_quantize" / "result" / "recipe.json").read_text())["steps"]
    assert [s["kind"] for s in final] == ["zoo_model", "remove_channels", "quantize_model", "quant_static"]
    assert steps[0]["data"]["options"] == {"widths": [16]}
    assert not list(workdir.rglob("*.pkl"))


def test_resume_load_run_and_teacher_run_give_the_in_memory_outputs(finished, capsys):
    workdir, report, saved = finished
    x = run_lib.load_data(_config()).x_test[:32]
    for label, model in saved.items():
        got = run_lib.load_stage(str(workdir), label).model
        np.testing.assert_array_equal(_out(got, x), _out(model, x), err_msg=label)
    # load_run (what `slimjax export RUN_DIR` uses): the final model and its masks
    _, model, extras = run_lib.load_run(str(workdir))
    np.testing.assert_array_equal(_out(model, x), _out(saved["2_quantize"], x))
    masks = [m for m in jax.tree.leaves(extras["masks"]) if m is not None]
    assert masks and all(np.asarray(m).dtype == bool for m in masks)
    assert set(extras["quant_params"]["layers"]) == {"layers/0", "head"}
    # teacher_run: a distillation teacher from the finished run directory
    teacher = resolve_teacher(Bundle(model=model, dataset=None), DistillStage(teacher_run=str(workdir)))
    np.testing.assert_array_equal(_out(teacher, x), _out(saved["2_quantize"], x))
    # resume: a rerun loads both stages and reports the same records
    again = run_lib.run(_config(), str(workdir), progress=False, echo=True)
    assert "finished earlier" in capsys.readouterr().err
    assert [s["metrics"] for s in again["stages"]] == [s["metrics"] for s in report["stages"]]


@pytest.mark.parametrize("entry", ["run", "load_run", "teacher_run", "cli run", "cli export"])
def test_a_planted_pickle_is_never_opened(entry, tmp_path, capsys):
    marker = tmp_path / "executed"
    workdir = tmp_path / "run"
    cfg = _config()
    os.makedirs(workdir)
    (workdir / "config.json").write_text(C.to_json(cfg) + "\n")
    (workdir / "report.json").write_text(json.dumps({"stages": [{"label": "0_train", "metrics": {}}]}))
    _plant_pickle(workdir / "stages" / "0_train", str(marker))
    if entry.startswith("cli"):
        cfg_file = tmp_path / "cfg.py"
        cfg_file.write_text(
            "from tests.research.test_store import _config\n\ndef get_config(arg=None):\n    return _config()\n"
        )
        argv = ["run", str(cfg_file), "--workdir", str(workdir), "--no-progress"]
        assert cli.main(argv if entry == "cli run" else ["export", str(workdir), "--to", "stablehlo"]) == 2
        assert "is a pickle written by an older slimjax" in capsys.readouterr().err
        assert not marker.exists()
        return
    with pytest.raises(store.StoreError, match="result.pkl is a pickle written by an older slimjax.*Rerun"):
        if entry == "run":
            run_lib.run(cfg, str(workdir), progress=False, echo=False)
        elif entry == "load_run":
            run_lib.load_run(str(workdir))
        else:
            resolve_teacher(Bundle(model=None, dataset=None), DistillStage(teacher_run=str(workdir)))
    assert not marker.exists()


def test_arrays_are_read_without_pickle(tmp_path):
    """An object array planted in state.npz is refused by numpy (allow_pickle=False), not unpickled."""
    marker = tmp_path / "executed"
    stage = tmp_path / "s"
    rdir = stage / "result"
    os.makedirs(rdir)
    step = recipe_lib.zoo_step("mlp", {"widths": (4,)}, (3,), 2, 0)
    (rdir / "recipe.json").write_text(json.dumps({"version": 1, "steps": [step]}))
    paths = ["head/bias"]
    (rdir / "state.json").write_text(json.dumps({"paths": paths, "key_impls": {}}))
    arr = np.empty((1,), dtype=object)
    arr[0] = _Payload(str(marker))
    with open(rdir / "state.npz", "wb") as f:
        np.savez(f, a0=arr)
    with pytest.raises(store.StoreError, match="state.npz cannot be read"):
        store.load_model(stage)
    assert not marker.exists()


def test_extras_round_trip_as_data_and_refuse_objects(tmp_path):
    extras = {
        "masks": {"layers": {0: {"kernel": jnp.ones((2, 3), bool), "bias": None}}, "head": ("a", 1, 2.5, True)},
        "scalar": np.float32(1.5),
        "key": jax.random.key(3),
        "list": [np.arange(3, dtype=np.int8), {"nested": "x"}],
    }
    arrays = []
    enc = store.encode(extras, arrays)
    back = store.decode(json.loads(json.dumps(enc)), arrays)
    assert back["masks"]["layers"][0]["bias"] is None and back["masks"]["head"] == ("a", 1, 2.5, True)
    assert np.asarray(back["masks"]["layers"][0]["kernel"]).dtype == bool
    assert back["scalar"] == np.float32(1.5) and back["scalar"].dtype == np.float32
    assert np.array_equal(jax.random.key_data(back["key"]), jax.random.key_data(extras["key"]))
    assert back["list"][0].dtype == np.int8 and back["list"][1] == {"nested": "x"}
    with pytest.raises(store.StoreError, match=r"bundle.extras\['fn'\] holds a builtins.function"):
        store.encode({"fn": lambda: 0}, [], "bundle.extras")
    with pytest.raises(store.StoreError, match=r"extras\['m'\]\[1\] holds"):
        store.encode({"m": [1, object()]}, [])


def test_recipe_errors_name_the_problem():
    with pytest.raises(recipe_lib.RecipeError, match="'nope' is not registered"):
        recipe_lib.step("nope")
    with pytest.raises(recipe_lib.RecipeError, match="not plain JSON"):
        recipe_lib.step("zoo_model", name=object())
    with pytest.raises(recipe_lib.RecipeError, match="kind 'bogus', which is not registered"):
        recipe_lib.build([recipe_lib.zoo_step("mlp", {}, (4,), 2, 0), {"kind": "bogus", "data": {}}])
    with pytest.raises(recipe_lib.RecipeError, match="first recipe step must be 'zoo_model'"):
        recipe_lib.build([recipe_lib.step("remove_channels", leaves=[])])
    with pytest.raises(ValueError, match="already registered"):
        recipe_lib.register_step("zoo_model")(lambda m, d: m)


# Whatever reads a run directory must never unpickle: no pickle-family import or call anywhere in
# the package sources, and every numpy load refuses pickles.
_FORBIDDEN = re.compile(
    r"\b(import pickle|from pickle|cloudpickle|dill\b|pickle\.loads?\(|joblib\.load|allow_pickle=True)"
)


def test_no_code_path_unpickles():
    offenders = []
    for top in ("research", "methods", "experiments", "configs"):
        for path in sorted((ROOT / top).rglob("*.py")):
            text = path.read_text()
            for i, line in enumerate(text.splitlines(), 1):
                if _FORBIDDEN.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
                if re.search(r"\bnp\.load\(", line) and "allow_pickle=False" not in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{i}: np.load without allow_pickle=False")
    assert not offenders, offenders


def test_a_recipe_is_replayed_once_per_process_and_a_model_that_differs_is_still_refused(tmp_path, monkeypatch):
    from research.nn import build_model

    monkeypatch.setattr(store, "_REBUILT", {})
    builds = []
    real_build = recipe_lib.build
    monkeypatch.setattr(recipe_lib, "build", lambda recipe: builds.append(1) or real_build(recipe))
    recipe = (recipe_lib.zoo_step("mlp", {"widths": (4,)}, (3,), 2, 0),)

    def model(widths=(4,), seed=0):
        return build_model("mlp", input_shape=(3,), num_classes=2, rngs=nnx.Rngs(seed), widths=widths)

    for i in range(3):  # a sweep's trials: other values, the same recipe and graph
        store.save_stage(tmp_path / f"t{i}", model=model(seed=i), extras={}, record={}, recipe=recipe)
    assert len(builds) == 1
    loaded, _ = store.load_model(tmp_path / "t2")
    np.testing.assert_array_equal(
        nnx.state(loaded)["head"]["kernel"][...], nnx.state(model(seed=2))["head"]["kernel"][...]
    )
    # other widths and another depth are refused after the replay was kept
    with pytest.raises(recipe_lib.RecipeError, match="different variables or shapes|does not rebuild"):
        store.save_stage(tmp_path / "wide", model=model(widths=(5,)), extras={}, record={}, recipe=recipe)
    with pytest.raises(recipe_lib.RecipeError, match="does not rebuild"):
        store.save_stage(tmp_path / "deep", model=model(widths=(4, 4)), extras={}, record={}, recipe=recipe)
    assert not os.path.exists(tmp_path / "wide" / "result") and not os.path.exists(tmp_path / "deep" / "result")
