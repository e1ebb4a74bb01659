"""The stage layer: one fine-tune spelling (old spellings warn for one release), stage kinds
registered through the ``slimjax.stages`` entry points (the core never imports ``methods``), and
stage configs that load and check their values without JAX."""

import ast
import dataclasses
import importlib
import importlib.metadata
import json
import pathlib
import subprocess
import sys
import textwrap
from typing import ClassVar

import pytest

import methods
from methods.decomposition import DecomposeStage
from methods.nas import NASStage
from methods.pruning import PruneStage
from methods.quantization import names as quant_names
from research import config as C
from research import stages as S
from research.stages import TrainStage

ROOT = pathlib.Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- one spelling


def test_old_prune_keywords_warn_and_build_the_new_config():
    with pytest.warns(DeprecationWarning, match=r"PruneStage\(steps=\.\.\.\) is deprecated.*stages.prune.train.steps"):
        old = PruneStage(sparsity=0.5, steps=7, learning_rate=0.5, batch_size=16, optimizer="sgd", checkpoint_every=0)
    new = PruneStage(
        sparsity=0.5,
        train=dataclasses.replace(
            PruneStage().train, steps=7, learning_rate=0.5, batch_size=16, optimizer="sgd", checkpoint_every=0
        ),
    )
    assert old == new
    with pytest.warns(DeprecationWarning):
        assert PruneStage(schedule="one_shot", steps=0, learning_rate=0.1).train is None  # steps=0: no fine-tuning
    with pytest.warns(DeprecationWarning):  # merged into a schedule given under the new name
        assert PruneStage(train=TrainStage(steps=3), learning_rate=0.5).train == TrainStage(steps=3, learning_rate=0.5)


@pytest.mark.parametrize("cls", [DecomposeStage, NASStage])
def test_old_finetune_keyword_warns_and_is_train(cls):
    schedule = TrainStage(steps=3, learning_rate=0.01)
    with pytest.warns(DeprecationWarning, match=rf"{cls.__name__}\(finetune=\.\.\.\).*stages.{cls.kind}.train"):
        assert cls(finetune=schedule) == cls(train=schedule)
    with pytest.raises(TypeError, match="not both"), pytest.warns(DeprecationWarning):
        cls(finetune=schedule, train=schedule)


def _config():
    return C.Config(
        name="spell",
        stages=(TrainStage(steps=4), PruneStage(), DecomposeStage(), NASStage()),
    )


@pytest.mark.parametrize(
    "old, new",
    [
        ("stages.prune.steps=9", "stages.prune.train.steps=9"),
        ("stages.prune.learning_rate=0.5", "stages.prune.train.learning_rate=0.5"),
        ("stages.prune.batch_size=8", "stages.prune.train.batch_size=8"),
        ("stages.prune.optimizer=sgd", "stages.prune.train.optimizer=sgd"),
        ("stages.prune.checkpoint_every=0", "stages.prune.train.checkpoint_every=0"),
        ("stages.prune.steps=0", "stages.prune.train=None"),
        ("stages.decompose.finetune.steps=5", "stages.decompose.train.steps=5"),
        ("stages.decompose.finetune=None", "stages.decompose.train=None"),
        ("stages.nas.finetune.learning_rate=0.1", "stages.nas.train.learning_rate=0.1"),
    ],
)
def test_old_override_keys_warn_naming_the_new_key(old, new):
    key = old.partition("=")[0]
    with pytest.warns(DeprecationWarning, match=rf"override key '{key}' is deprecated.*use 'stages\.\w+\.train"):
        got = C.apply_overrides(_config(), [old])
    assert got == C.apply_overrides(_config(), [new])
    C.check_values(got)


def test_every_method_stage_that_fine_tunes_spells_it_train():
    S.load_all_stages()
    for kind in S.list_stages():
        cls, _ = S.get_stage(kind)
        names = {f.name for f in dataclasses.fields(cls)}
        assert "finetune" not in names, kind
        fine_tunes = [f.name for f in dataclasses.fields(cls) if "TrainStage" in str(f.type)]
        assert fine_tunes in ([], ["train"]), (kind, fine_tunes)
        for old, new in cls.renamed.items():  # every old spelling names an existing place
            assert old not in names and new.partition(".")[0] in names, (kind, old, new)


def test_moved_helpers_still_resolve_with_a_warning():
    from research import metrics
    from research import train

    for name, module in [("measure", metrics), ("accuracy", metrics), ("make_optimizer", train)]:
        with pytest.warns(DeprecationWarning, match=rf"research.stages.{name} moved to {module.__name__}.{name}"):
            assert getattr(S, name) is getattr(module, name)
    with pytest.warns(DeprecationWarning, match="workdir=, seed=, progress="):
        assert callable(S.finetune)
    with pytest.raises(AttributeError):
        S.no_such_helper  # noqa: B018


# ----------------------------------------------------------------------------- entry points


def _import_targets(path: pathlib.Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            out += [a.value for a in node.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return out


def test_the_core_never_imports_methods():
    bad = [
        f"{p.relative_to(ROOT)}: {t}"
        for p in sorted((ROOT / "research").rglob("*.py"))
        for t in _import_targets(p)
        if t == "methods" or t.startswith("methods.")
    ]
    assert not bad, bad


def test_the_distribution_registers_methods_through_the_entry_point_group():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=S.ENTRY_POINT_GROUP)}
    assert eps.get("methods") == "methods:register_stages", eps
    methods.register_stages()
    assert {"prune", "distill", "decompose", "quantize", "qat", "nas"} <= set(S.list_stages())
    # and what the method modules register besides stages (the packages load lazily)
    from research import recipe
    from research.export import deploy

    assert "methods.quantization" in deploy.deploy_hooks()
    assert {"remove_channels", "factorize", "fold_batchnorm", "quantize_model", "quant_static"} <= set(
        recipe.list_steps()
    )


calls = []


def _plugin_ok():
    calls.append("ok")


def _plugin_broken():
    raise RuntimeError("cannot import torch")


def _ep(name, target):
    return importlib.metadata.EntryPoint(name=name, value=f"{__name__}:{target}", group=S.ENTRY_POINT_GROUP)


def test_plugins_are_called_once_and_a_broken_one_is_named(monkeypatch):
    monkeypatch.setattr(S, "_plugins", None)
    monkeypatch.setattr(S, "_entry_points", lambda: [_ep("mine", "_plugin_ok")])
    calls.clear()
    assert S.load_stage_plugins() == {"mine": f"{__name__}:_plugin_ok"}
    S.load_stage_plugins()
    assert calls == ["ok"]
    monkeypatch.setattr(S, "_entry_points", lambda: [_ep("broken", "_plugin_broken")])
    with pytest.raises(ImportError, match=r"stage plugin 'broken' .*slimjax.stages.*RuntimeError: cannot import torch"):
        S.load_stage_plugins(reload=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _UnregisteredStage(S.StageConfig):
    kind: ClassVar[str] = "not_installed_kind"


def test_without_plugins_an_unknown_kind_says_how_to_install_them(monkeypatch):
    monkeypatch.setattr(S, "_plugins", None)
    monkeypatch.setattr(S, "_entry_points", list)
    config = C.Config(stages=(TrainStage(steps=2), _UnregisteredStage()))
    with pytest.raises(C.ConfigError, match=r"not_installed_kind.*slimjax.stages.*pip install -e \.") as e:
        C.validate(config)
    assert "stages.1" in str(e.value)
    with pytest.raises(KeyError, match=r"pip install -e \."):
        S.get_stage("not_installed_kind")


def test_every_public_name_of_the_method_packages_resolves():
    for package in methods.PACKAGES:
        module = importlib.import_module(f"methods.{package}")
        for name in module.__all__:
            assert getattr(module, name) is not None, f"methods.{package}.{name}"


# ----------------------------------------------------------------------------- without JAX

CONFIG = textwrap.dedent(
    """
    from methods.decomposition import DecomposeStage, DecompositionRule
    from methods.distillation import DistillStage
    from methods.nas import NASStage
    from methods.pruning import ChannelRule, PruneStage, SparsityRule
    from methods.quantization import QATStage
    from methods.quantization import QuantizeStage, QuantRule
    from research.config import Config, DataConfig, ModelConfig
    from research.export import ExportStage
    from research.stages import TrainStage

    RULES = (ChannelRule(pattern="conv", ratio=0.5),)  # built here, used by a test of its own

    def get_config(arg=None):
        return Config(name="light", model=ModelConfig(name="lenet5"), data=DataConfig(name="digits"),
                      stages=(TrainStage(steps=4),
                              PruneStage(sparsity=0.5, train=TrainStage(steps=2),
                                         rules=(SparsityRule(pattern="kernel$", sparsity=0.5),)),
                              DistillStage(teacher="train", train=TrainStage(steps=2)),
                              QuantizeStage(bits=8, rules=(QuantRule(pattern=".*", bits=8),)), QATStage(bits=4),
                              DecomposeStage(rules=(DecompositionRule(pattern="conv", rank=2),)), NASStage(),
                              ExportStage(formats=("tflite",))))
    """
)

#: A config whose fine-tuning teacher names a KD term that is not registered.
BAD_KD_TERM = textwrap.dedent(
    """
    from research.config import Config
    from research.stages import TrainStage
    from research.teacher import KDTermConfig, TeacherConfig

    def get_config(arg=None):
        teacher = TeacherConfig(stage="train", terms=(KDTermConfig(name="hintn"),))
        return Config(stages=(TrainStage(steps=2), TrainStage(steps=2, teacher=teacher)))
    """
)

#: A config whose rule refuses its value when the config file builds it.
BAD_RULE = textwrap.dedent(
    """
    from methods.decomposition import DecomposeStage, DecompositionRule
    from research.config import Config

    def get_config(arg=None):
        return Config(stages=(DecomposeStage(rules=(DecompositionRule(pattern="conv", energy=1.5),)),))
    """
)

PROBE = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from research import cli, config as C

    job = json.loads(sys.argv[1])
    config = C.load_config(job["config"])
    errors = []
    for override in job["overrides"]:
        try:
            C.check_values(C.apply_overrides(config, [override]))
        except C.ConfigError as e:
            errors.append(str(e))
    runs = []
    for argv in job["cli"]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli.main(argv)
        runs.append([code, err.getvalue()])
    heavy = sorted(m for m in ("jax", "flax", "optax", "tensorflow") if m in sys.modules)
    print(json.dumps({"errors": errors, "cli": runs, "heavy": heavy}))
    """
)

#: Overrides with a bad value (a range, a typo of a registered name) and the first words of the
#: error: each is refused by check_values, before JAX loads.
BAD_OVERRIDES = {
    "stages.prune.train.learning_rate=-1": "stages.prune.train.learning_rate=-1.0 must be > 0",
    "stages.quantize.bits=9": "stages.quantize.bits=9 is outside",
    "stages.qat.train.warmup_steps=-2": "stages.qat.train.warmup_steps=-2 must be >= 0",
    "stages.nas.trials=1": "stages.nas.trials=1 must be >= 2",
    "data.val_fraction=1.5": "data.val_fraction=1.5 is outside",
    "latency_batch_size=0": "latency_batch_size=0 must be >= 1",
    "stages.export.eval_examples=0": "stages.export.eval_examples=0 must be >= 1",
    # registry names: declared in research.names / methods.<package>.names
    "stages.quantize.observer=bogus": "stages.quantize.observer='bogus' is not registered (observer)",
    "stages.qat.weight_observer=mse_": "stages.qat.weight_observer='mse_' is not registered (observer); did you mean 'mse'?",
    "stages.quantize.method=lsqq": "stages.quantize.method='lsqq' is not registered (quantization method); did you",
    'stages.export.formats=["tflit"]': "stages.export.formats.0='tflit' is not registered (export format); did you mean 'tflite'?",
    'stages.export.quantize=["int9"]': "stages.export.quantize.0='int9' is not registered (export quantization mode)",
    "stages.prune.scorer=magnitud": "stages.prune.scorer='magnitud' is not registered (pruning scorer); did you mean",
    "stages.prune.channel_score=l3": "stages.prune.channel_score='l3' is not registered (channel score)",
    "stages.nas.sampler=tpee": "stages.nas.sampler='tpee' is not registered (sampler); did you mean 'tpe'?",
    "model.name=lenet": "model.name='lenet' is not registered (model); did you mean",
    "data.name=digit": "data.name='digit' is not registered (data set); did you mean 'digits'?",
    "model.options.width=3": "model.options ['width'] are not options of model 'lenet5'; valid keys: []",
    "data.options.num_sample=5": "data.options ['num_sample'] are not options of data set 'digits'; valid keys: []",
    "stages.distill.student_model=lenet": "stages.distill.student_model='lenet' is not registered (model); did you",
    # rules a config builds (their classes load without JAX)
    "stages.prune.rules=[1]": "stages.prune.rules.0=1 is not a SparsityRule",
    "stages.quantize.rules=['x']": "stages.quantize.rules.0='x' is not a QuantRule",
    "stages.decompose.rules=[]": "stages.decompose.rules is empty",
}


def test_config_values_and_names_are_checked_without_importing_jax(tmp_path):
    """Bad values, registry-name typos (observer, export format, scorer, channel score, sampler,
    model, data set...), bad rules and bad sweep grid values are config errors before
    jax/flax/optax/tensorflow load.
    KD term names of a teacher and the distill stage's student model included."""
    cfg = tmp_path / "light.py"
    cfg.write_text(CONFIG)
    bad_rule = tmp_path / "bad_rule.py"
    bad_rule.write_text(BAD_RULE)
    bad_kd = tmp_path / "bad_kd.py"
    bad_kd.write_text(BAD_KD_TERM)
    run = ["run", str(cfg), "--workdir", str(tmp_path / "run")]
    job = {
        "config": str(cfg),
        "overrides": list(BAD_OVERRIDES),
        "cli": [
            [*run, "--set", "stages.prune.steps=-1"],
            [*run, "--set", "stages.quantize.observer=bogus"],
            [*run, "--set", 'stages.export.formats=["tflit"]'],
            ["run", str(bad_rule), "--workdir", str(tmp_path / "run")],
            ["sweep", str(cfg), "--grid", "stages.quantize.observer=mse,bogus", "--workdir", str(tmp_path / "run")],
            ["run", str(bad_kd), "--workdir", str(tmp_path / "run")],
        ],
    }
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(job)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [], result
    assert len(result["errors"]) == len(BAD_OVERRIDES), result["errors"]
    for (override, expected), got in zip(BAD_OVERRIDES.items(), result["errors"], strict=True):
        assert got.startswith(expected), (override, got)
    (
        (code, err),
        (code_obs, err_obs),
        (code_fmt, err_fmt),
        (code_rule, err_rule),
        (code_grid, err_grid),
        (code_kd, err_kd),
    ) = result["cli"]
    assert code == 2, err
    assert err.splitlines() == [
        "slimjax: warning: override key 'stages.prune.steps' is deprecated and will be removed in the next "
        "release; use 'stages.prune.train.steps'",
        "slimjax: config error: stages.prune.train.steps=-1 must be >= 1",
    ], err
    assert code_obs == 2 and err_obs.splitlines() == [
        "slimjax: config error: stages.quantize.observer='bogus' is not registered (observer); "
        "choose from ['minmax', 'moving_average', 'mse', 'percentile']"
    ], err_obs
    assert code_fmt == 2 and err_fmt.startswith(
        "slimjax: config error: stages.export.formats.0='tflit' is not registered (export format); "
        "did you mean 'tflite'?"
    ), err_fmt
    assert code_rule == 2 and len(err_rule.splitlines()) == 1, err_rule
    assert "DecompositionRule(pattern='conv').energy=1.5 must be a number in (0, 1]" in err_rule, err_rule
    assert code_grid == 2 and err_grid.startswith(
        "slimjax: config error: --grid stages.quantize.observer='bogus': stages.quantize.observer='bogus' is not "
        "registered (observer)"
    ), err_grid
    assert code_kd == 2 and err_kd.startswith(
        "slimjax: config error: stages.1.teacher.terms.0.name='hintn' is not registered (KD term); "
        "did you mean 'hinton'?"
    ), err_kd
    assert not (tmp_path / "run").exists()


#: Checks that still import a method's module (so run after JAX loads): none. A new
#: OneOf(list_x) would land here; use Registered(REGISTRY) with the registry's names declared.
CHECKED_AFTER_JAX: set[tuple[str, str]] = set()


def _config_classes(obj, seen):
    """The dataclass types of ``obj`` and of every dataclass nested in its fields (tuples too)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type) and type(obj) not in seen:
        seen.add(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            for item in value if isinstance(value, (list, tuple)) else (value,):
                _config_classes(item, seen)
    return seen


def test_every_declared_check_of_every_config_class_runs_before_jax():
    """A field check that needs an import (a registry read through a callable, a rule class
    imported when checked) waits for JAX: every stage's checks, nested ones included, are
    checkable before it except the listed ones (a new OneOf(list_x) would fail here: use
    Registered(REGISTRY) with the registry's names declared)."""
    S.load_all_stages()
    classes = _config_classes(C.Config(), set())
    for kind in S.list_stages():
        classes |= _config_classes(S.get_stage(kind)[0](), set())
    late = {(cls.__name__, f) for cls in classes for f, c in getattr(cls, "checks", {}).items() if c.needs_imports()}
    assert late == CHECKED_AFTER_JAX, late


@dataclasses.dataclass(frozen=True, kw_only=True)
class _PluginStage(S.StageConfig):
    kind: ClassVar[str] = "plugin_named"
    checks: ClassVar[dict] = {"observer": C.Registered(quant_names.OBSERVERS)}
    observer: str = "minmax"


def _plugin_module(tmp_path, monkeypatch, declare: bool):
    """A stage plugin ``lazyreg_plugin_mod`` whose entry point module declares its names or not."""
    body = "def register():\n    pass\n"
    if declare:
        body += "def declare_names():\n    from methods.quantization import names\n    names.OBSERVERS.register_lazy('plugin_obs', 'lazyreg_plugin_obs:Obs')\n"
    (tmp_path / "lazyreg_plugin_mod.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lazyreg_plugin_mod", raising=False)
    ep = importlib.metadata.EntryPoint(name="mine", value="lazyreg_plugin_mod:register", group=S.ENTRY_POINT_GROUP)
    monkeypatch.setattr(S, "_entry_points", lambda: [ep])


@pytest.mark.parametrize("declare", [True, False])
def test_an_unknown_name_waits_for_a_plugin_that_declares_nothing(tmp_path, monkeypatch, declare):
    """A stage plugin may register names when it loads: unless its entry point's module declares
    them (``declare_names``), an unknown name is left to validate() instead of being refused early."""
    _plugin_module(tmp_path, monkeypatch, declare)
    try:
        assert C.declare_plugin_names() is declare
        config = C.Config(stages=(TrainStage(steps=2), _PluginStage(observer="plugin_obs")))
        if declare:
            C.check_values(config)  # declared by the plugin, known before it loads
            with pytest.raises(
                C.ConfigError, match=r"'plugin_ob' is not registered \(observer\); did you mean 'plugin_obs'"
            ):
                C.check_values(C.Config(stages=(_PluginStage(observer="plugin_ob"),)))
        else:
            C.check_values(config)  # unknown before the plugin loads: not refused yet
            with pytest.raises(C.ConfigError, match=r"'plugin_obs' is not registered \(observer\)"):
                C.validate_fields(config.stages[1], "stages.plugin_named")  # after the imports it is
    finally:
        quant_names.OBSERVERS.unregister("plugin_obs")


def test_fake_quant_layers_bring_their_deploy_hook():
    code = (
        "from methods.quantization import QuantLinear\n"
        "from research.export import deploy\n"
        "assert 'methods.quantization' in deploy.deploy_hooks(), deploy.deploy_hooks()\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
