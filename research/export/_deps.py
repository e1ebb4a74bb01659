"""Lazy imports of the optional export dependencies.

TensorFlow, tf2onnx, onnx, onnxruntime and the LiteRT interpreter are heavy and optional: the
rest of slimjax must import without them. Every function here imports on first use and turns a
missing package into an ``ImportError`` that says how to install it.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

INSTALL_HINT = "pip install 'slimjax[export]'"

# Tested together on Python 3.11 with jax 0.10.2 / flax 0.12.8 / numpy 2.4 / protobuf 7.
TESTED_VERSIONS = {
    "tensorflow-cpu": "2.21.0",
    "tf2onnx": "1.17.0",
    "onnx": "1.23.2",
    "onnxruntime": "1.32.0",
    "ai-edge-litert": "2.3.0",
}


def _import(module: str, dist: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"research.export needs the optional package {dist!r} (tested: "
            f"{dist}=={TESTED_VERSIONS.get(dist, '?')}) but importing {module!r} failed: {err}. "
            f"Install the export extras with `{INSTALL_HINT}`."
        ) from err


def tensorflow() -> ModuleType:
    """Returns the ``tensorflow`` module (quietened), or raises an ``ImportError`` with a fix."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tf = _import("tensorflow", "tensorflow-cpu")
    return tf


def jax2tf() -> ModuleType:
    """Returns ``jax.experimental.jax2tf`` (needs TensorFlow)."""
    tensorflow()
    return _import("jax.experimental.jax2tf", "tensorflow-cpu")


def tf2onnx() -> ModuleType:
    """Returns ``tf2onnx`` with its ``convert`` submodule loaded."""
    tensorflow()
    mod = _import("tf2onnx", "tf2onnx")
    _import("tf2onnx.convert", "tf2onnx")
    return mod


def onnx() -> ModuleType:
    """Returns the ``onnx`` module."""
    return _import("onnx", "onnx")


def onnxruntime() -> ModuleType:
    """Returns the ``onnxruntime`` module."""
    return _import("onnxruntime", "onnxruntime")


def tflite_interpreter_class() -> type:
    """Returns the TFLite interpreter class TF 2.21 recommends.

    TensorFlow 2.21 deprecates ``tf.lite.Interpreter`` in favour of LiteRT's
    ``ai_edge_litert.interpreter.Interpreter`` (same runtime, same kernels). LiteRT is used when
    installed; otherwise the TensorFlow copy is used.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        return tensorflow().lite.Interpreter
