"""BUILD must name every module and every test file (and nothing that does not exist)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = {".git", "__pycache__", ".pytest_cache", "runs", ".ruff_cache"}


def _py_files(top):
    out = []
    for d, dirs, files in os.walk(os.path.join(ROOT, top)):
        dirs[:] = [x for x in dirs if x not in SKIP and not x.endswith(".egg-info")]
        out += [os.path.relpath(os.path.join(d, f), ROOT) for f in files if f.endswith(".py")]
    return sorted(out)


def _targets():
    text = open(os.path.join(ROOT, "BUILD")).read()
    targets = []
    for m in re.finditer(r"(py_library|py_test)\((.*?)\n\)", text, re.S):
        body = m.group(2)
        name = re.search(r'name = "([^"]+)"', body).group(1)
        srcs = re.search(r"srcs = \[(.*?)\]", body, re.S)
        files = re.findall(r'"([^"]+\.py)"', srcs.group(1)) if srcs else []
        targets.append((m.group(1), name, files))
    return targets


def test_every_module_is_in_a_py_library_of_its_package():
    libs = {name: files for kind, name, files in _targets() if kind == "py_library"}
    listed = {f for files in libs.values() for f in files}
    missing = [
        f for top in ("research", "methods", "configs", "experiments") for f in _py_files(top) if f not in listed
    ]
    assert not missing, f"modules missing from BUILD (add them to the py_library of their package): {missing}"
    for top in ("research", "methods"):
        for f in _py_files(top):
            if f.endswith("__init__.py"):
                pkg = os.path.dirname(f).replace("/", "_")
                assert pkg in libs, f"package {os.path.dirname(f)} has no py_library named {pkg!r} in BUILD"
                assert f in libs[pkg]


def test_every_test_file_has_a_py_test():
    tests = {files[0] for kind, _, files in _targets() if kind == "py_test"}
    support = {f for kind, name, files in _targets() if name == "tests_support" for f in files}
    for f in _py_files("tests"):
        if os.path.basename(f).startswith("test_"):
            assert f in tests, f"test file {f} has no py_test in BUILD"
        else:
            assert f in support, f"test helper {f} is missing from BUILD's tests_support library"


def test_build_names_only_existing_files_and_unique_targets():
    targets = _targets()
    names = [n for _, n, _ in targets]
    assert len(names) == len(set(names)), "duplicate target names in BUILD"
    for _, name, files in targets:
        for f in files:
            assert os.path.exists(os.path.join(ROOT, f)), f"BUILD target {name} names missing file {f}"
