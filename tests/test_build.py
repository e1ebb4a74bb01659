"""BUILD is honest: every module and test file in a target, real first-party deps, tests that run.

* Every module is in the ``py_library`` of its package; every test file has a ``py_test``.
* Every ``py_test`` runs pytest through ``tests/pytest_main.py`` with its file as the argument
  (a ``py_test`` whose ``main`` is a test file without ``__main__`` would run nothing and pass).
* The ``deps`` of every target are exactly the first-party libraries its files import (read
  from the source with ``ast``, function-local imports included), and the graph has no cycle.
  Third-party packages come from the Python environment (``pip install -e '.[test]'``).
"""

from __future__ import annotations

import ast
import functools
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = {".git", "__pycache__", ".pytest_cache", "runs", ".ruff_cache"}
SHIM = "tests/pytest_main.py"
SUPPORT = "tests_support"  # conftest.py and test helpers; every py_test depends on it


def _py_files(top: str) -> list[str]:
    out = []
    for d, dirs, files in os.walk(os.path.join(ROOT, top)):
        dirs[:] = [x for x in dirs if x not in SKIP and not x.endswith(".egg-info")]
        out += [os.path.relpath(os.path.join(d, f), ROOT) for f in files if f.endswith(".py")]
    return sorted(out)


def _list(body: str, field: str) -> list[str] | None:
    m = re.search(rf"\b{field} = \[(.*?)\]", body, re.S)
    return re.findall(r'"([^"]+)"', m.group(1)) if m else None


def _targets() -> dict[str, dict]:
    """``name -> {kind, srcs, deps, main, args}`` of every rule in BUILD."""
    text = open(os.path.join(ROOT, "BUILD")).read()
    targets = {}
    for m in re.finditer(r"^(py_library|py_test)\((.*?)\n\)", text, re.S | re.M):
        body = m.group(2)
        name = re.search(r'name = "([^"]+)"', body).group(1)
        assert name not in targets, f"duplicate target name {name!r} in BUILD"
        main = re.search(r'main = "([^"]+)"', body)
        targets[name] = {
            "kind": m.group(1),
            "srcs": [f for f in _list(body, "srcs") or [] if f.endswith(".py")],
            "deps": sorted(d.lstrip(":") for d in _list(body, "deps") or []),
            "main": main.group(1) if main else None,
            "args": _list(body, "args") or [],
        }
    return targets


def _module_name(path: str) -> str:
    mod = path[:-3].replace("/", ".")
    return mod[: -len(".__init__")] if mod.endswith(".__init__") else mod


@functools.cache
def _imports(path: str) -> frozenset[str]:
    """Every module name ``path`` imports (``from a import b`` gives ``a`` and ``a.b``)."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read(), path)
    package = _module_name(path) if path.endswith("__init__.py") else _module_name(path).rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return frozenset(out)


def _owners(targets: dict[str, dict]) -> dict[str, str]:
    return {_module_name(f): name for name, t in targets.items() if t["kind"] == "py_library" for f in t["srcs"]}


def _first_party_deps(name: str, targets: dict[str, dict], owners: dict[str, str]) -> list[str]:
    """The libraries the files of target ``name`` import (itself excluded)."""
    found = set()
    for f in targets[name]["srcs"]:
        for mod in _imports(f):
            while mod and mod not in owners:
                mod = mod.rpartition(".")[0]
            if mod and owners[mod] != name:
                found.add(owners[mod])
    if targets[name]["kind"] == "py_test":
        found.add(SUPPORT)
    return sorted(found)


# Subpackages listed in their parent package's library instead of their own: the population
# executor (research/population) runs pipelines through research.run and is chosen by
# research.executors, so the two form one layer (two libraries would be a dependency cycle).
IN_PARENT_LIBRARY = {"research_population": "research", "research_distributed": "research"}


def test_every_module_is_in_a_py_library_of_its_package():
    libs = {name: t["srcs"] for name, t in _targets().items() if t["kind"] == "py_library"}
    listed = {f for files in libs.values() for f in files}
    missing = [
        f for top in ("research", "methods", "configs", "experiments") for f in _py_files(top) if f not in listed
    ]
    assert not missing, f"modules missing from BUILD (add them to the py_library of their package): {missing}"
    for top in ("research", "methods"):
        for f in _py_files(top):
            if f.endswith("__init__.py"):
                pkg = os.path.dirname(f).replace("/", "_")
                if pkg in IN_PARENT_LIBRARY:  # one library with its parent: they import each other
                    parent = IN_PARENT_LIBRARY[pkg]
                    pkg_files = [g for g in _py_files(os.path.dirname(f)) if os.path.dirname(g) == os.path.dirname(f)]
                    assert set(pkg_files) <= set(libs[parent]), f"{os.path.dirname(f)} belongs in py_library {parent}"
                    continue
                assert pkg in libs, f"package {os.path.dirname(f)} has no py_library named {pkg!r} in BUILD"
                assert f in libs[pkg]


def test_every_test_file_has_a_py_test_that_runs_it_under_pytest():
    targets = _targets()
    tests = {t["srcs"][0]: (name, t) for name, t in targets.items() if t["kind"] == "py_test"}
    support = targets[SUPPORT]["srcs"]
    for f in _py_files("tests"):
        if os.path.basename(f).startswith("test_"):
            assert f in tests, f"test file {f} has no py_test in BUILD"
            name, t = tests[f]
            expected = f'srcs = ["{f}", "{SHIM}"], main = "{SHIM}", args = ["{f}"]'
            assert t["srcs"] == [f, SHIM] and t["main"] == SHIM and t["args"] == [f], (
                f"py_test {name} must run its file under pytest: {expected}"
            )
        else:
            assert f in support, f"test helper {f} is missing from BUILD's {SUPPORT} library"


def test_the_pytest_shim_fails_a_file_that_collects_nothing():
    import subprocess
    import sys

    empty = os.path.join(ROOT, "tests", "pytest_main.py")  # a file with no test in it
    proc = subprocess.run([sys.executable, SHIM, empty], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stdout
    proc = subprocess.run([sys.executable, SHIM], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "test file" in proc.stderr, proc.stderr


def test_build_names_only_existing_files():
    for name, t in _targets().items():
        for f in t["srcs"]:
            assert os.path.exists(os.path.join(ROOT, f)), f"BUILD target {name} names missing file {f}"


def test_deps_are_exactly_the_first_party_imports():
    targets = _targets()
    owners = _owners(targets)
    wrong = []
    for name, t in targets.items():
        expected = _first_party_deps(name, targets, owners)
        if t["deps"] != expected:
            missing = sorted(set(expected) - set(t["deps"]))
            extra = sorted(set(t["deps"]) - set(expected))
            deps = ", ".join(f'":{d}"' for d in expected)
            wrong.append(f"{name}: add {missing}, remove {extra} -> deps = [{deps}]")
    assert not wrong, "BUILD deps differ from the imports:\n" + "\n".join(wrong)


def test_dependency_graph_is_acyclic_and_layered():
    targets = _targets()
    deps = {name: t["deps"] for name, t in targets.items()}
    state: dict[str, int] = {}

    def visit(name: str, stack: list[str]) -> None:
        if state.get(name) == 1:
            raise AssertionError(f"dependency cycle in BUILD: {' -> '.join([*stack, name])}")
        if state.get(name) == 2:
            return
        state[name] = 1
        for d in deps[name]:
            assert d in deps, f"{name} depends on unknown target :{d}"
            visit(d, [*stack, name])
        state[name] = 2

    for name in deps:
        visit(name, [])
    for name, t in targets.items():
        if name.startswith("research"):
            assert not [d for d in t["deps"] if d.startswith("methods")], f"{name} (core) depends on methods"
    automl = {m for f in targets["research_automl"]["srcs"] for m in _imports(f)}
    assert not {m for m in automl if m.split(".")[0] == "flax"}, "research/automl must stay pure JAX + numpy"
