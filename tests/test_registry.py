"""research.registry: duplicate refusal, idempotent re-registration, did-you-mean errors, declared
(lazy) entries, and the declared names of every registry a config names equal to the registered ones."""

import json
import pathlib
import subprocess
import sys
import textwrap

import pytest

from research.registry import DuplicateNameError
from research.registry import LazyTargetError
from research.registry import Registry
from research.registry import UnknownNameError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _make():
    reg = Registry("widget", hint="register one with @WIDGETS.register('name')")

    @reg.register("alpha")
    def alpha():
        return 1

    reg.register("beta", lambda: 2)
    return reg, alpha


def test_register_get_and_list():
    reg, alpha = _make()
    assert reg.get("alpha") is alpha
    assert reg.names() == ["alpha", "beta"]
    assert list(reg) == ["alpha", "beta"] and len(reg) == 2 and "beta" in reg and "gamma" not in reg
    assert [n for n, _ in reg.items()] == ["alpha", "beta"]


def test_unknown_name_suggests_the_closest_and_lists_all():
    reg, _ = _make()
    with pytest.raises(UnknownNameError) as e:
        reg.get("alpah")
    msg = str(e.value)
    assert "unknown widget 'alpah'" in msg and "did you mean 'alpha'?" in msg
    assert "['alpha', 'beta']" in msg and "@WIDGETS.register" in msg
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)
    with pytest.raises(UnknownNameError, match="unknown widget 'zzz'; registered"):
        reg.get("zzz")


def test_a_different_implementation_under_a_taken_name_is_refused():
    reg, _ = _make()

    def other():
        return 3

    with pytest.raises(DuplicateNameError, match="widget 'alpha' is already registered.*replace=True"):
        reg.register("alpha", other)
    assert reg.get("alpha")() == 1
    reg.register("alpha", other, replace=True)
    assert reg.get("alpha") is other


def test_the_same_definition_again_is_not_an_error():
    reg, alpha = _make()
    reg.register("alpha", alpha)  # the same object
    namespace: dict = {}
    src = "def alpha():\n    return 10\n"
    exec(compile(src, "<cell>", "exec"), {"__name__": __name__}, namespace)  # a re-run notebook cell
    namespace["alpha"].__qualname__ = alpha.__qualname__
    reg.register("alpha", namespace["alpha"])
    assert reg.get("alpha")() == 10


def test_bad_names_and_unregister():
    reg, _ = _make()
    with pytest.raises(ValueError, match="non-empty string"):
        reg.register("", lambda: 0)
    reg.unregister("beta")
    assert reg.names() == ["alpha"]


# ----------------------------------------------------------------------------- declared (lazy) entries


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A module ``lazyreg_plugin_<n>`` on sys.path defining ``fn`` (and ``Cls``); removed afterwards."""
    made = []

    def make(source="def fn():\n    return 'fn'\n\nclass Cls:\n    pass\n"):
        name = f"lazyreg_plugin_{len(made)}"
        (tmp_path / f"{name}.py").write_text(source)
        made.append(name)
        return name

    monkeypatch.syspath_prepend(str(tmp_path))
    yield make
    for name in made:
        sys.modules.pop(name, None)


def test_a_declared_name_is_listed_and_suggested_without_importing(plugin):
    mod = plugin()
    reg = Registry("widget")
    reg.register_lazy("lazy_one", f"{mod}:fn")
    assert reg.names() == ["lazy_one"] and "lazy_one" in reg and len(reg) == 1
    with pytest.raises(UnknownNameError, match=r"did you mean 'lazy_one'\?"):
        reg.get("lazy_on")
    assert reg.pending() == {"lazy_one": f"{mod}:fn"} and reg.loaded("lazy_one") is None
    assert mod not in sys.modules
    fn = reg.get("lazy_one")  # first use imports
    assert mod in sys.modules and fn() == "fn" and reg.get("lazy_one") is fn
    assert reg.loaded("lazy_one") is fn and reg.pending() == {}
    assert reg.declared() == {"lazy_one": f"{mod}:fn"}


def test_the_module_registering_on_import_fulfils_its_declaration(plugin):
    reg = Registry("widget")
    sys.modules["lazyreg_registry_under_test"] = type(sys)("lazyreg_registry_under_test")
    sys.modules["lazyreg_registry_under_test"].REG = reg
    try:
        mod = plugin(
            "from lazyreg_registry_under_test import REG\n\n"
            "class Record:\n    def __init__(self, fn):\n        self.fn = fn\n\n"
            "def fn():\n    return 1\n\n"
            "REG.register('wrapped', Record(fn))\n"  # a record (no definition site) from the declared module
            "REG.register('plain', fn)\n"
        )
        reg.register_lazy("wrapped", f"{mod}:fn")
        reg.register_lazy("plain", f"{mod}:fn")
        assert type(reg.get("wrapped")).__name__ == "Record"  # what the import registered, not the bare attr
        assert reg.get("plain") is sys.modules[mod].fn
        reg.register_lazy("plain", f"{mod}:fn")  # declaring it again after the import: a no-op
    finally:
        del sys.modules["lazyreg_registry_under_test"]


def test_a_declared_name_refuses_other_definitions_and_other_targets(plugin):
    mod = plugin()
    reg = Registry("widget")
    reg.register_lazy("w", f"{mod}:fn")
    reg.register_lazy("w", f"{mod}:fn")  # the same declaration again (a module imported twice)

    def other():
        return 0

    with pytest.raises(DuplicateNameError, match=rf"widget 'w' is declared for {mod}:fn.*replace=True"):
        reg.register("w", other)
    with pytest.raises(DuplicateNameError, match=rf"widget 'w' is already declared for {mod}:fn, not {mod}:Cls"):
        reg.register_lazy("w", f"{mod}:Cls")
    assert reg.get("w")() == "fn"
    reg.register("x", other)
    with pytest.raises(DuplicateNameError, match=r"widget 'x' is already registered \(by .*other\)"):
        reg.register_lazy("x", f"{mod}:fn")
    reg.register("w", other, replace=True)  # on purpose
    assert reg.get("w") is other


def test_an_override_of_a_declared_name_survives_the_declared_module_loading(plugin):
    reg = Registry("widget")
    sys.modules["lazyreg_registry_under_test"] = type(sys)("lazyreg_registry_under_test")
    sys.modules["lazyreg_registry_under_test"].REG = reg
    try:
        mod = plugin("from lazyreg_registry_under_test import REG\n\n@REG.register('w')\ndef fn():\n    return 1\n")
        reg.register_lazy("w", f"{mod}:fn")

        def mine():
            return 2

        reg.register("w", mine, replace=True)  # before the declared module is imported
        __import__(mod)  # it registers its own 'w': the override stays
        assert reg.get("w") is mine
    finally:
        del sys.modules["lazyreg_registry_under_test"]


def test_a_declared_target_that_is_missing_names_module_and_attribute(plugin):
    mod = plugin()
    reg = Registry("widget")
    reg.register_lazy("gone", "lazyreg_no_such_module:fn")
    reg.register_lazy("typo", f"{mod}:fnn")
    with pytest.raises(LazyTargetError, match=r"widget 'gone' is declared as lazyreg_no_such_module:fn, but importing"):
        reg.get("gone")
    with pytest.raises(LazyTargetError, match=rf"'typo' is declared as {mod}:fnn, but {mod} has no attribute 'fnn'"):
        reg.get("typo")
    assert isinstance(LazyTargetError("x"), ImportError)
    broken = plugin("raise RuntimeError('broken module')\n")
    reg.register_lazy("broken", f"{broken}:fn")
    with pytest.raises(RuntimeError, match="broken module") as e:
        reg.get("broken")
    assert "declared as widget 'broken'" in "".join(e.value.__notes__) and broken in "".join(e.value.__notes__)
    for bad in ("no_colon", "a.b:", ":attr", "a b:c", "a:b:c"):
        with pytest.raises(ValueError, match="must be 'package.module:attr'"):
            reg.register_lazy("bad", bad)
    reg.unregister("gone")
    assert "gone" not in reg and "gone" not in reg.declared()


# ----------------------------------------------------------------------------- declared == registered

CONFORMANCE = textwrap.dedent(
    """
    import importlib, json
    import methods
    from research import names, stages
    from research.export import formats

    methods.register_stages()
    stages.load_all_stages()
    for package in ("research.nn", "research.data", "research.automl"):
        importlib.import_module(package)
    registries = dict(names.registries())
    for module in methods.NAMES_MODULES:
        registries.update(importlib.import_module(module).registries())
    out = {}
    for key, reg in registries.items():
        for target in reg.declared().values():  # every declared module, even one its package does not import
            importlib.import_module(target.partition(":")[0])
        pending = reg.pending()
        wrong = {}
        for name, target in reg.declared().items():
            if name in pending:
                continue
            entry = reg.get(name)
            candidates = [entry, getattr(entry, "fn", None), entry[0] if isinstance(entry, tuple) else None, type(entry)]
            sites = [f"{c.__module__}:{c.__qualname__}" for c in candidates if hasattr(c, "__qualname__")]
            if target not in sites:
                wrong[name] = sites[:1]
        out[key] = {"what": reg.what, "names": reg.names(), "declared": sorted(reg.declared()), "pending": pending,
                    "wrong": wrong}
    print(json.dumps({"registries": out, "modes": sorted(formats.quantize_modes()),
                      "declared_modes": sorted(names.EXPORT_QUANTIZE_MODES)}))
    """
)


def test_declared_names_equal_the_registered_ones():
    """Every registry a config names: importing every real module registers exactly the declared
    names (so research.names / methods.<package>.names cannot drift from the registrations)."""
    proc = subprocess.run(
        [sys.executable, "-c", CONFORMANCE], cwd=ROOT, capture_output=True, text=True, check=False, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    problems = []
    for key, r in got["registries"].items():
        undeclared = sorted(set(r["names"]) - set(r["declared"]))
        if undeclared:
            problems.append(f"{key} ({r['what']}): registered but not declared {undeclared}: add register_lazy lines")
        if r["pending"]:
            problems.append(f"{key} ({r['what']}): declared but never registered {r['pending']}")
        if r["wrong"]:
            problems.append(f"{key} ({r['what']}): declared targets are not what got registered {r['wrong']}")
    if got["modes"] != got["declared_modes"]:
        problems.append(
            f"research.names.EXPORT_QUANTIZE_MODES {got['declared_modes']} != quantize_modes() {got['modes']}"
        )
    assert not problems, "\n".join(problems)
    assert len(got["registries"]) == 10, sorted(got["registries"])


def test_option_keys_read_from_source_equal_the_signatures():
    """model/data option keys read with ast from a declared entry's module (what check_values uses
    before JAX) equal those of the imported constructor / loader, for every declared entry."""
    from research import names
    from research.data import dataset_options
    from research.nn import model_kwargs

    for registry, read, real in (
        (names.MODELS, names.model_option_names, lambda n: sorted(model_kwargs(n))),
        (names.DATASETS, names.dataset_option_names, dataset_options),
    ):
        fresh = Registry(registry.what)
        for name, target in registry.declared().items():
            fresh.register_lazy(name, target)
        for name in fresh.names():
            ast_params = names.declared_parameters(fresh, name)
            assert ast_params is not None, name
            kinds = {p.name: p.kind for p in ast_params}
            real_names = real(name)
            assert read(name) == real_names, name  # the loaded entry, inspected
            if registry is names.MODELS:
                from_ast = sorted(n for n, k in kinds.items() if k == k.KEYWORD_ONLY and n != "rngs")
            else:
                from_ast = sorted(n for n, k in kinds.items() if n != "seed" and k == k.POSITIONAL_OR_KEYWORD)
            assert from_ast == real_names, (name, from_ast, real_names)


def test_declared_parameters_without_a_readable_def_is_none(tmp_path, monkeypatch):
    """A target that is not a top-level def, or a module that is missing, gives None (validate decides)."""
    from research import names

    (tmp_path / "optmod.py").write_text("def f(a, *, x=1, rngs):\n    pass\nG = f\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    r = Registry("t")
    r.register_lazy("f", "optmod:f")
    r.register_lazy("g", "optmod:G")
    r.register_lazy("h", "no_such_module_xyz:f")
    assert [p.name for p in names.declared_parameters(r, "f")] == ["a", "x", "rngs"]
    assert names.declared_parameters(r, "g") is None
    assert names.declared_parameters(r, "h") is None
    assert names.declared_parameters(r, "unknown") is None
    assert "optmod" not in __import__("sys").modules
