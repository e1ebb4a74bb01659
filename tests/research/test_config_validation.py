"""Every config field is validated before anything trains, with its dotted key in the message.

The walk below takes every field of every registered stage config (and of Config, ModelConfig
and DataConfig), gives it bad values (a value of the wrong type, the values its declared check
must refuse, and hand-written cross-field cases), and requires a ConfigError naming the key
both for a Python-built config and for the same value given as ``--set``. Runs go through
``research.run.run`` with every stage's run function and ``finetune`` replaced by functions
that fail the test if called, so "before anything trains" is checked, not assumed.
"""

import dataclasses
import importlib
import os
import subprocess
import sys
import time
import types
import typing

import pytest

import methods
from methods.decomposition import DecompositionRule
from methods.decomposition import ModelBudget
from methods.pruning import SparsityRule
from methods.quantization import QuantRule
from research import cli
from research import config as C
from research import run as run_lib
from research import stages as stages_lib
from research.stages import TrainStage

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
run_lib.register_all_stages()
KINDS = stages_lib.list_stages()

# Fields whose values are checked by a cross-field ``check`` hook (or, for paths into the model,
# when the stage runs); each has hand-written bad values in CROSS below.
CROSS_CHECKED = {
    ("DistillStage", "teacher"),
    ("DistillStage", "student_options"),
    ("DistillStage", "hints"),  # module paths: checked against the student when the stage runs
    ("DistillStage", "attention"),  # same
    ("KDTermConfig", "options"),  # the term is built from them
    ("ModelConfig", "options"),
    ("DataConfig", "options"),
}

# (class name, field overrides, the key the error must name)
CROSS = [
    ("TrainStage", {"steps": 10, "warmup_steps": 11}, "train.warmup_steps"),
    ("PruneStage", {"train": None, "schedule": "polynomial"}, "prune.train"),
    ("PruneStage", {"train": None, "schedule": "one_shot", "scorer": "saliency"}, "prune.scorer"),
    ("PruneStage", {"pattern": "nm", "n": 4, "m": 4}, "prune.n"),
    ("DistillStage", {"teacher": "no_such_stage"}, "distill.teacher"),
    ("DistillStage", {"teacher": ""}, "distill.teacher"),
    ("DistillStage", {"student_options": {"widths": [4]}}, "distill.student_options"),
    ("DistillStage", {"student_model": "mlp", "student_options": {"depth": 3}}, "distill.student_options"),
    ("DistillStage", {"hints": (("a",),)}, "distill.hints"),
    ("DistillStage", {"attention": "layers/0"}, "distill.attention"),
    ("DistillStage", {"terms": ()}, "distill.terms"),
    ("DistillStage", {"alpha": 0.5, "hard_weight": 0.3}, "distill.terms/hard_weight"),
    ("KDTermConfig", {"name": "hinton", "options": {"temperature": 0.0}}, "distill.terms.0.options"),
    ("KDTermConfig", {"name": "hinton", "options": {"temprature": 2.0}}, "distill.terms.0.options"),
    ("KDTermConfig", {"name": "fitnets"}, "distill.terms.0.options"),
    ("DecomposeStage", {"budget_param_ratio": 0.5, "budget_flop_ratio": 0.5}, "decompose.budget_param_ratio"),
    ("ExportStage", {"formats": ()}, "export.formats"),
    ("ExportStage", {"formats": ("tflite",), "quantize": ("int8_qdq_symmetric",)}, "export.quantize.0"),
]
TOP_CROSS = [
    ({"model": C.ModelConfig(name="mlp", options={"depth": 3})}, "model.options"),
    ({"data": C.DataConfig(name="digits", options={"num_samples": 10})}, "data.options"),
    ({"stages": ()}, "no stages"),
]


@pytest.fixture(autouse=True)
def nothing_trains(monkeypatch):
    """Every stage's run function and ``finetune`` fail the test if anything reaches them."""

    def trained(*args, **kwargs):
        raise AssertionError("a stage ran: validation let a bad value through")

    for kind in KINDS:
        cls, _ = stages_lib.get_stage(kind)
        monkeypatch.setattr(stages_lib.STAGES, "_entries", {**stages_lib.STAGES._entries, kind: (cls, trained)})
    for module in ("research.train", *(f"methods.{p}.stage" for p in methods.PACKAGES)):
        if hasattr(importlib.import_module(module), "finetune"):
            monkeypatch.setattr(f"{module}.finetune", trained)
    monkeypatch.setattr(run_lib, "build_bundle", trained)


def _wrong_type(annotation):
    """A value of the wrong type for ``annotation`` (None if every value is allowed)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "bogus_choice"
    if origin in (typing.Union, types.UnionType):
        return _wrong_type(next(a for a in args if a is not type(None)))
    if annotation is bool:
        return "yes"
    if annotation in (int, float):
        return "x"
    if annotation is str:
        return 3
    if annotation is typing.Any:
        return None
    return 3  # tuples, mappings and nested dataclasses


def _base(stage=None):
    stages = (TrainStage(steps=2),) if stage is None or stage.kind == "train" else (TrainStage(steps=2), stage)
    if stage is not None and stage.kind == "train":
        stages = (stage,)
    return C.Config(name="walk", model=C.ModelConfig(name="mlp"), data=C.DataConfig(name="digits"), stages=stages)


def _stage_key(config, stage):
    return C.stage_key(config.stages, config.stages.index(stage))


def _refused(config, key, tmp_path):
    """``run`` refuses ``config`` with a ConfigError naming ``key``, before any stage runs."""
    with pytest.raises(C.ConfigError) as e:
        run_lib.run(config, str(tmp_path / "run"), progress=False, echo=False)
    assert key in str(e.value), f"{key!r} not named in: {e.value}"
    assert not (tmp_path / "run" / "stages").exists()


def _refused_as_override(config, key, value):
    """``--set key=repr(value)`` is refused with a ConfigError naming ``key``."""
    with pytest.raises(C.ConfigError) as e:
        C.validate(C.apply_overrides(config, [f"{key}={value!r}"]))
    assert key in str(e.value), f"{key!r} not named in: {e.value}"


def _bad_values(cls, field, hints):
    out = []
    wrong = _wrong_type(hints[field.name])
    if wrong is not None:
        out.append(wrong)
    check = getattr(cls, "checks", {}).get(field.name)
    if check is not None:
        out += list(check.bad_values())
    return out


def _needs_own_check(cls, field, hints):
    """Whether the field's type alone does not say which values are good."""
    ann = hints[field.name]
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        ann = next(a for a in args if a is not type(None))  # X | None: as X (None = unset)
        origin, args = typing.get_origin(ann), typing.get_args(ann)
    if ann is bool or origin is typing.Literal:
        return False
    if dataclasses.is_dataclass(ann) or (
        args and all(dataclasses.is_dataclass(a) for a in args if a is not type(None))
    ):
        return False  # nested configs: walked on their own
    if origin is tuple and args and dataclasses.is_dataclass(args[0]):
        return False  # rules: they validate their numbers at construction
    return (cls.__name__, field.name) not in CROSS_CHECKED


def _walk(cls, default, key_prefix, make_config, tmp_path, n_checked):
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if _needs_own_check(cls, field, hints):
            assert field.name in getattr(cls, "checks", {}), (
                f"{cls.__name__}.{field.name} has no declared check: add one to {cls.__name__}.checks "
                "(or a cross-field check and a CROSS case in this test)"
            )
        key = f"{key_prefix}.{field.name}" if key_prefix else field.name
        for bad in _bad_values(cls, field, hints):
            config = make_config(dataclasses.replace(default, **{field.name: bad}))
            _refused(config, key, tmp_path)
            if not dataclasses.is_dataclass(bad):
                _refused_as_override(make_config(default), key, bad)
            n_checked.append(key)
        value = getattr(default, field.name)
        if dataclasses.is_dataclass(value):  # e.g. DistillStage.train: walk it under its own key
            _walk(
                type(value),
                value,
                key,
                lambda v, f=field.name: make_config(dataclasses.replace(default, **{f: v})),
                tmp_path,
                n_checked,
            )
        elif (
            isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]) and hasattr(value[0], "checks")
        ):  # e.g. DistillStage.terms: walk the first item under key.0 (rules check at construction instead)
            _walk(
                type(value[0]),
                value[0],
                f"{key}.0",
                lambda v, f=field.name, rest=value[1:]: make_config(dataclasses.replace(default, **{f: (v, *rest)})),
                tmp_path,
                n_checked,
            )


@pytest.mark.parametrize("kind", KINDS)
def test_every_stage_field_refuses_bad_values_before_training(kind, tmp_path):
    cls, _ = stages_lib.get_stage(kind)
    default = cls()
    C.validate(_base(default))  # the defaults are valid
    prefix = _stage_key(_base(default), default)
    checked = []
    _walk(cls, default, prefix, _base, tmp_path, checked)
    assert len(checked) >= len(dataclasses.fields(cls))
    for name, overrides, key in CROSS:
        if name == cls.__name__:
            _refused(_base(cls(**overrides)), key, tmp_path)
        for f in dataclasses.fields(cls):  # items of tuple fields (KD terms): the stage holding one
            ann = typing.get_type_hints(cls)[f.name]
            item_cls = typing.get_args(ann) if typing.get_origin(ann) is tuple else ()
            if item_cls and getattr(item_cls[0], "__name__", None) == name:
                _refused(_base(dataclasses.replace(default, **{f.name: (item_cls[0](**overrides),)})), key, tmp_path)


@pytest.mark.parametrize("which", ["Config", "ModelConfig", "DataConfig"])
def test_every_top_level_field_refuses_bad_values_before_training(which, tmp_path):
    base = _base()
    C.validate(base)
    checked = []
    if which == "Config":
        hints = typing.get_type_hints(C.Config)
        for field in dataclasses.fields(C.Config):
            if field.name in ("model", "data"):
                continue  # walked below
            if _needs_own_check(C.Config, field, hints) and field.name != "stages":
                assert field.name in C.Config.checks, f"Config.{field.name} has no declared check"
            for bad in _bad_values(C.Config, field, hints):
                _refused(dataclasses.replace(base, **{field.name: bad}), field.name, tmp_path)
                _refused_as_override(base, field.name, bad)
                checked.append(field.name)
        for overrides, key in TOP_CROSS:
            _refused(dataclasses.replace(base, **overrides), key, tmp_path)
    else:
        attr = "model" if which == "ModelConfig" else "data"
        cls = type(getattr(base, attr))
        _walk(cls, getattr(base, attr), attr, lambda v: dataclasses.replace(base, **{attr: v}), tmp_path, checked)
    assert checked


@pytest.mark.parametrize(
    "override, message",
    [
        ("stages.prune.train.learning_rate=-1", "stages.prune.train.learning_rate=-1.0 must be > 0"),
        ("stages.quantize.observer=bogus", "stages.quantize.observer='bogus' is not registered (observer)"),
        ("latency_batch_size=0", "latency_batch_size=0 must be >= 1"),
        ("data.val_fraction=1.5", "data.val_fraction=1.5 is outside [0, 1)"),
        ("stages.quantize.bits=9", "stages.quantize.bits=9 is outside [2, 8]"),
        ("stages.export.source=later", "stages.export.source='later' names no earlier stage"),
    ],
)
def test_issue_probes_fail_in_the_cli_before_training(override, message, tmp_path, capsys):
    workdir = tmp_path / "run"
    code = cli.main(["run", "configs/quickstart.py:smoke", "--workdir", str(workdir), "--set", override])
    err = capsys.readouterr().err
    assert code == 2 and f"slimjax: config error: {message}" in err, err
    assert len(err.strip().splitlines()) == 1 and not workdir.exists()


def test_python_built_configs_are_type_checked():
    with pytest.raises(C.ConfigError, match=r"stages.train.steps='10' must be an int"):
        C.validate(_base(TrainStage(steps="10")))
    with pytest.raises(C.ConfigError, match=r"stages.train.optimizer='lion' must be one of"):
        C.validate(_base(TrainStage(optimizer="lion")))
    with pytest.raises(C.ConfigError, match=r"stages.1.steps=0 must be >= 1"):  # two trains: by index
        C.validate(dataclasses.replace(_base(), stages=(TrainStage(steps=2), TrainStage(steps=0))))
    with pytest.raises(C.ConfigError, match="expected a research.config.Config"):
        C.validate({"stages": []})


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: DecompositionRule(pattern="fc", energy=1.5), r"DecompositionRule\(pattern='fc'\).energy=1.5"),
        (lambda: DecompositionRule(energy=-0.1), r"energy=-0.1 must be a number in \(0, 1\]"),
        (lambda: DecompositionRule(rank=0), r"rank=0 must be an int >= 1"),
        (lambda: DecompositionRule(rank=-3), r"rank=-3 must be an int >= 1"),
        (lambda: DecompositionRule(method="tucker2", rank=(4, 0)), r"rank=\(4, 0\)"),
        (lambda: DecompositionRule(rank=2.5), r"rank=2.5"),
        (lambda: DecompositionRule(param_ratio=5), r"param_ratio=5 must be a number in \(0, 1\]"),
        (lambda: DecompositionRule(flop_ratio=0), r"flop_ratio=0 must be"),
        (lambda: DecompositionRule(n_iter_max=0), r"n_iter_max=0 must be an int >= 1"),
        (lambda: DecompositionRule(vbmf="yes"), r"vbmf='yes' must be True or False"),
        (lambda: ModelBudget(param_ratio=2.0), r"ModelBudget.param_ratio=2.0 must be a number in \(0, 1\]"),
        (lambda: SparsityRule(pattern="k", sparsity=1.0), r"SparsityRule\(pattern='k'\).sparsity=1.0 is outside"),
        (lambda: QuantRule(pattern="fc", bits=9), r"QuantRule\(pattern='fc'\).bits: bits=9 is outside 2..8"),
        (lambda: QuantRule(act_bits=1), r"QuantRule\(pattern='.\*'\).act_bits: bits=1"),
        (lambda: SparsityRule(pattern=3), r"rule pattern 3 must be a string"),
    ],
)
def test_rules_validate_their_numbers_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_rule_fields_set_from_the_command_line_name_their_key():
    from methods.pruning import PruneStage

    cfg = _base(PruneStage(rules=(SparsityRule(pattern="kernel$"),)))
    with pytest.raises(C.ConfigError, match=r"stages.prune.rules.0.sparsity=2.*is outside \[0, 1\)"):
        C.apply_overrides(cfg, ["stages.prune.rules.0.sparsity=2"])
    with pytest.raises(C.ConfigError, match=r"stages.prune.rules.0.sparsity='x' must be a float"):
        C.apply_overrides(cfg, ["stages.prune.rules.0.sparsity=x"])
    assert C.apply_overrides(cfg, ["stages.prune.rules.0.sparsity=0.5"]).stages[1].rules[0].sparsity == 0.5


def test_a_list_of_unquoted_strings_from_the_command_line_gets_the_quoted_form():
    from research.export import ExportStage

    cfg = _base(ExportStage())
    with pytest.raises(C.ConfigError) as e:
        C.apply_overrides(cfg, ["stages.export.formats=[stablehlo, onnx]"])
    assert """--set 'stages.export.formats=["stablehlo", "onnx"]'""" in str(e.value)
    assert C.apply_overrides(cfg, ['stages.export.formats=["stablehlo", "onnx"]']).stages[1].formats == (
        "stablehlo",
        "onnx",
    )
    with pytest.raises(C.ConfigError, match=r"must be a list/tuple, e.g. \[1, 2\]$"):
        C._check_type(3, tuple[int, ...], "k")  # pylint: disable=protected-access


@pytest.mark.parametrize(
    "source, message",
    [
        ("def get_config(arg=None)\n    return 1\n", r"bad.py:1: syntax error: expected ':'"),
        ("import no_such_module_here\n", r"bad.py: loading it raised ModuleNotFoundError: .*no_such_module_here.*:1\)"),
        ("x = 1\n", r"has no get_config"),
        ("def get_config(arg=None):\n    return {}['k']\n", r"get_config\(None\) raised KeyError: 'k' \(.*bad.py:2\)"),
        ("def get_config(arg=None):\n    return 3\n", r"get_config returned int"),
    ],
)
def test_config_file_errors_are_one_config_error(source, message, tmp_path, capsys):
    path = tmp_path / "bad.py"
    path.write_text(source)
    with pytest.raises(C.ConfigError, match=message):
        C.load_config(str(path))
    assert cli.main(["run", str(path), "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimjax: config error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_cli_error_for_a_missing_config_comes_before_heavy_imports(tmp_path):
    # `python -m research.cli run missing.py`: exit 2 with the message, and (from -X importtime)
    # no JAX, Flax, TensorFlow or methods import. The time is printed (-s shows it), not
    # asserted: it depends on the machine.
    missing = str(tmp_path / "missing.py")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "research.cli", "run", missing],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - t0
    print(f"python -m research.cli run missing.py: exit {proc.returncode} after {seconds:.2f} s")
    lines = proc.stderr.strip().splitlines()
    imported = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    errors = [line for line in lines if not line.startswith("import time:")]
    assert proc.returncode == 2
    assert errors == [
        f"slimjax: config error: config file {missing!r} does not exist (give a path like configs/quickstart.py)"
    ]
    assert "research.config" in imported  # the CLI ran its config loader
    assert not {m.split(".")[0] for m in imported} & {"jax", "flax", "tensorflow", "methods", "numpy"}
