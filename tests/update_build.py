"""Rewrites BUILD from the source tree: ``python tests/update_build.py`` (then review ``git diff BUILD``).

Keeps each module in the library BUILD already puts it in and adds new modules to the library of
their package (a new package gets a new ``py_library`` named after its path); adds a ``py_test``
for every new test file and drops targets of deleted files; recomputes every target's ``deps``
from its imports. ``tests/test_build.py`` checks the result.
"""

from __future__ import annotations

import os
import re
import sys

from test_build import IN_PARENT_LIBRARY
from test_build import ROOT
from test_build import SHIM
from test_build import SUPPORT
from test_build import _first_party_deps
from test_build import _owners
from test_build import _py_files
from test_build import _targets

HEADER_END = "\npy_library("


def _library_of(path: str) -> str:
    top = path.split("/")[0]
    if top in ("configs", "experiments"):
        return top
    name = os.path.dirname(path).replace("/", "_")
    return IN_PARENT_LIBRARY.get(name, name)


def _fmt(key: str, items: list[str]) -> list[str]:
    if not items:
        return []
    if len(items) == 1 or (len(items) == 2 and sum(len(i) for i in items) < 80):
        return [f"    {key} = [" + ", ".join(f'"{i}"' for i in items) + "],"]
    return [f"    {key} = ["] + [f'        "{i}",' for i in items] + ["    ],"]


def _order(name: str) -> tuple[int, str]:
    fixed = {"research": 0, "research_cli": 1, "methods": 3, "configs": 5, "experiments": 6, SUPPORT: 7}
    if name in fixed:
        return fixed[name], name
    return (2 if name.startswith("research") else 4), name


def render() -> str:
    """The BUILD text for the current tree."""
    old = _targets()
    libs = {n: [f for f in t["srcs"] if os.path.exists(os.path.join(ROOT, f))] for n, t in old.items()}
    libs = {n: fs for n, fs in libs.items() if old[n]["kind"] == "py_library"}
    listed = {f for fs in libs.values() for f in fs}
    for top in ("research", "methods", "configs", "experiments"):
        for f in _py_files(top):
            if f not in listed:
                libs.setdefault(_library_of(f), []).append(f)
    helpers = [f for f in _py_files("tests") if not os.path.basename(f).startswith("test_")]
    libs[SUPPORT] = sorted(set(libs.get(SUPPORT, [])) | set(helpers))
    libs = {n: fs for n, fs in libs.items() if fs}
    targets = {}
    for name in sorted(libs, key=_order):
        srcs = sorted(set(libs[name]))
        targets[name] = {"kind": "py_library", "srcs": srcs, "deps": [], "main": None, "args": []}
    for f in _py_files("tests"):
        if os.path.basename(f).startswith("test_"):
            name = f[:-3].replace("/", "_")
            targets[name] = {"kind": "py_test", "srcs": [f, SHIM], "deps": [], "main": SHIM, "args": [f]}
    owners = _owners(targets)
    text = open(os.path.join(ROOT, "BUILD")).read()
    out = [text.split(HEADER_END)[0].rstrip("\n"), ""]
    for name, t in targets.items():
        lines = [f"{t['kind']}(", f'    name = "{name}",']
        if name == SUPPORT:
            lines.append("    testonly = True,")
        lines += _fmt("srcs", t["srcs"])
        if name == SUPPORT:  # tests/trained_models.py reads the stored trained models
            lines.append('    data = glob(["tests/data/**"]),')
        if t["kind"] == "py_test":
            lines.append(f'    main = "{SHIM}",')
            lines += _fmt("args", t["args"])
            source = open(os.path.join(ROOT, t["srcs"][0])).read()
            data = [d for d in ("configs", "experiments") if re.search(rf'["/]{d}["/]|\b{d}\.', source)]
            if data:
                lines.append("    data = glob([" + ", ".join(f'"{d}/**"' for d in data) + "]),")
        lines += _fmt("deps", [f":{d}" for d in _first_party_deps(name, targets, owners)])
        out += [*lines, ")", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def main() -> int:
    """Writes BUILD; prints whether it changed."""
    path = os.path.join(ROOT, "BUILD")
    new = render()
    changed = new != open(path).read()
    if changed:
        with open(path + ".tmp", "w") as f:
            f.write(new)
        os.replace(path + ".tmp", path)
    print(f"{path}: {'rewritten, review git diff BUILD' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
