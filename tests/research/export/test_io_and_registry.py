"""Atomic writes, the quantization registry and the optional-dependency error."""

from __future__ import annotations

import os

import pytest

from research.export import _deps
from research.export import atomic_path
from research.export import quantization_modes
from research.export import register_quantization
from research.export._io import gzip_size
from research.export._io import write_bytes_atomic


def test_atomic_write_replaces_on_success(tmp_path):
    p = tmp_path / "a.bin"
    write_bytes_atomic(p, b"old")
    write_bytes_atomic(p, b"new")
    assert p.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_partial_write_never_replaces_good_file(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"good artifact")
    with pytest.raises(OSError, match="disk full"), atomic_path(p) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")
    assert p.read_bytes() == b"good artifact"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_failed_verification_never_replaces_good_file(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"good artifact")

    def verify(path: str) -> None:
        raise ValueError(f"cannot load {path}")

    with pytest.raises(ValueError, match="cannot load"):
        write_bytes_atomic(p, b"broken", verify)
    assert p.read_bytes() == b"good artifact"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_gzip_size_shrinks_zeros(tmp_path):
    p = tmp_path / "z.bin"
    p.write_bytes(bytes(100_000))
    assert gzip_size(p) < 1_000


def test_registry_refuses_duplicates():
    assert quantization_modes()[:4] == ("fp32", "fp16", "dynamic_int8", "int8")
    with pytest.raises(ValueError, match="already registered"):
        register_quantization("int8")(lambda converter, rep: None)


def test_missing_dependency_names_install_command():
    with pytest.raises(ImportError, match=r"pip install 'slimjax\[export\]'"):
        _deps._import("slimjax_no_such_module", "tf2onnx")
