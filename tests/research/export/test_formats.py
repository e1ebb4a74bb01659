"""The export format registry: conformance of every registered format, and a format added in a temporary module.

The conformance test iterates :data:`research.export.formats.EXPORT_FORMATS` when it runs (not a
list written here): every registered format that can run on this machine exports an MLP and its
artifacts agree with JAX, both as ``export`` ran them and reloaded through the format's ``load``;
a format that cannot run is refused before anything is converted, naming why. The temporary-module
test registers an ``npz`` format (weights in a ``.npz`` file, run by numpy) without editing any
other file and finds it used by ``export(formats=...)``, by ``ExportStage`` validation (an unknown
name refused with a did-you-mean before anything trains) and by the conformance check.
"""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
import zipfile

import numpy as np
import pytest
from flax import nnx

from research import config as C
from research import metrics
from research import run as run_lib
from research.export import EXPORT_FORMATS
from research.export import export
from research.export import formats as formats_lib
from research.export import get_format
from research.export import register_quantization
from research.export._io import check_export_set
from research.export.deploy import DEPLOY_HOOKS
from research.export.deploy import register_deploy_hook
from research.export.onnx_export import register_onnx_quantization
from research.export.stage import ExportStage
from research.registry import DuplicateNameError
from research.stages import TrainStage
from tests.research.export.export_test_models import SmallMLP


def runnable_formats() -> tuple[list[str], dict[str, str]]:
    """What the conformance test covers: the registered formats that can run here (with their
    requirements), and why each other registered format cannot."""
    ok, why = [], {}
    for name in formats_lib.format_names():
        fmt = get_format(name)
        reason = fmt.unavailable() or next(
            (f"needs {r!r}: {get_format(r).unavailable()}" for r in fmt.requires if get_format(r).unavailable()), None
        )
        if reason:
            why[name] = reason
        else:
            ok.append(name)
    return ok, why


def assert_conforms(name: str, report, model, x: np.ndarray) -> None:
    """Format ``name``'s fp32 artifacts in ``report`` agree with JAX, as run and as reloaded by its ``load``."""
    arts = [a for a in report.artifacts if a.format == name]
    assert arts, f"format {name!r} produced no artifact: {[a.name for a in report.artifacts]}"
    ref = np.asarray(model(x), np.float64)
    for a in arts:
        assert os.path.exists(a.path) and os.path.getsize(a.path) == a.size_bytes > 0, a
        assert a.latency_ms > 0 and a.runtime, a
        if a.quantize != "fp32":
            continue
        # Float32 runtimes reorder sums; 1e-5 of the output scale is the bound used for every fp32 artifact.
        assert a.max_rel_diff <= 1e-5 and a.top1_agreement == 1.0, a
        y = np.asarray(get_format(name).load(a.path)(x), np.float64)
        np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))


@pytest.fixture(scope="module")
def mlp_and_x(digits):
    # Untrained: fp32 parity needs no margins, and no training step is compiled.
    x = digits.x_test.reshape(len(digits.x_test), -1)[:24].astype(np.float32)
    return SmallMLP(16, rngs=nnx.Rngs(0)), x


def test_every_registered_format_that_runs_here_exports_the_mlp(mlp_and_x, tmp_path):
    model, x = mlp_and_x
    ok, why = runnable_formats()
    assert {"stablehlo", "tflite", "onnx"} <= set(ok), why  # the export extras are installed (conftest)
    rep = export(model, x[:8], formats=ok, out_dir=tmp_path / "all", eval_data=x, latency_repeats=1)
    for name in ok:
        assert_conforms(name, rep, model, x)
    assert set(check_export_set(tmp_path / "all")["formats"]) == set(ok)
    for name, reason in why.items():  # e.g. tensorrt without a GPU: refused up front, with the reason
        fmt = get_format(name)
        with pytest.raises(ImportError) as err:
            export(model, x[:8], formats=(*fmt.requires, name), out_dir=tmp_path / name)
        assert "cannot run here" in str(err.value) and reason.split(";")[0] in str(err.value)
        assert not (tmp_path / name).exists()


NPZ_MODULE = '''
"""A format added without editing slimjax: the MLP's Linear weights in an .npz file, run by numpy."""

import numpy as np
from flax import nnx

from research.export._io import atomic_path
from research.export.formats import ExportFormat
from research.export.formats import Produced
from research.export.formats import register_format


class NumpyMLP:
    def __init__(self, path):
        with np.load(path) as z:
            self.layers = [(z[f"w{i}"], z[f"b{i}"]) for i in range(len(z.files) // 2)]

    def __call__(self, x):
        h = np.asarray(x, np.float32).reshape(len(x), -1)
        for i, (w, b) in enumerate(self.layers):
            h = h @ w + b
            h = np.maximum(h, 0) if i < len(self.layers) - 1 else h
        return h


def _save(path, arrays, compressed=False):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        (np.savez_compressed if compressed else np.savez)(f, **arrays)


@register_format
class NpzFormat(ExportFormat):
    name = "npz"
    runtime_name = "numpy"
    extension = ".npz"

    def produce(self, job, q):
        linears = [m for _, m in nnx.iter_graph(job.convert_model) if isinstance(m, nnx.Linear)]
        arrays = {}
        for i, m in enumerate(linears):
            arrays[f"w{i}"], arrays[f"b{i}"] = np.asarray(m.kernel[...]), np.asarray(m.bias[...])
        path = job.path(f"{job.name}_{q}.npz")
        _save(path, arrays, **job.options_of("npz"))
        return [Produced(name=f"npz_{q}", quantize=q, path=path, runtime="numpy", run=self.load(path))]

    def load(self, path, num_threads=1):
        return NumpyMLP(path)


@register_format
class Npz16Format(ExportFormat):
    """Builds on the npz artifact (so requires it): the same weights in float16, for quantize="fp16"."""

    name = "npz16"
    runtime_name = "numpy16"
    requires = {"npz": "halves the npz weights"}
    converted_from = "npz"
    extension = ".npz"

    def modes(self):
        return ("fp16",)

    def produce(self, job, q):
        with np.load(job.written("npz")["fp32"].path) as z:
            arrays = {k: z[k].astype(np.float16) for k in z.files}
        path = job.path(f"{job.name}_{q}.npz")
        _save(path, arrays)
        return [Produced(name=f"npz16_{q}", quantize=q, path=path, runtime="numpy", run=self.load(path))]

    def load(self, path, num_threads=1):
        return NumpyMLP(path)


@register_format
class NpzGpuFormat(ExportFormat):
    name = "npz_gpu"

    def unavailable(self):
        return "no accelerator here; pip install slimjax-npz-gpu on a machine with one"
'''

TEMP_FORMATS = ("npz", "npz16", "npz_gpu")


@pytest.fixture
def npz_module(tmp_path, monkeypatch):
    """Imports the npz format module from a temporary directory; unregisters it afterwards."""
    (tmp_path / "slimjax_test_npz_format.py").write_text(textwrap.dedent(NPZ_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("slimjax_test_npz_format")
    yield module
    for name in TEMP_FORMATS:
        EXPORT_FORMATS.unregister(name)
    sys.modules.pop("slimjax_test_npz_format", None)


def test_a_format_in_a_temporary_module_is_used_by_export(npz_module, mlp_and_x, tmp_path):
    model, x = mlp_and_x
    rep = export(
        model,
        x[:8],
        formats=("npz16", "npz"),
        out_dir=tmp_path / "out",
        quantize="fp16",
        eval_data=x,
        latency_repeats=1,
    )
    # Produced in dependency order (npz before npz16, which reads its file), whatever the request's order;
    # each format writes the variants it declares (npz: fp32; npz16: fp16).
    assert [a.name for a in rep.artifacts] == ["npz_fp32", "npz16_fp16"]
    assert rep["npz_fp32"].max_rel_diff <= 1e-6 and rep["npz_fp32"].top1_agreement == 1.0
    assert 0 < rep["npz16_fp16"].max_rel_diff <= 1e-2  # float16 weights: close, not equal
    assert set(check_export_set(tmp_path / "out")["files"]) == {"model_fp32.npz", "model_fp16.npz"}
    # Options reach the format that reads them; options for a format not requested are refused.
    rep = export(model, x[:8], formats=("npz",), out_dir=tmp_path / "z", format_options={"npz": {"compressed": True}})
    with zipfile.ZipFile(rep["npz_fp32"].path) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_DEFLATED}
    with pytest.raises(ValueError, match=r"format_options names \['tflite'\]"):
        export(model, x[:8], formats=("npz",), out_dir=tmp_path / "x", format_options={"tflite": {}})
    with pytest.raises(ValueError, match="'npz16' halves the npz weights; add 'npz' to formats"):
        export(model, x[:8], formats=("npz16",), quantize="fp16", out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="did you mean 'npz'"):
        export(model, x[:8], formats=("npzz",), out_dir=tmp_path / "x")
    with pytest.raises(ImportError, match="'npz_gpu' cannot run here: no accelerator here; pip install"):
        export(model, x[:8], formats=("npz_gpu",), out_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()  # refused before anything was converted or written
    # The runtime registry follows: artifact_latency can time the new format's files.
    from research.export import artifact_latency

    assert artifact_latency(rep["npz_fp32"].path, "numpy", sample=x[:1], batch=2, repeats=2) > 0


def _config(export_stage):
    return C.Config(
        name="npz",
        model=C.ModelConfig(name="mlp"),
        data=C.DataConfig(name="digits"),
        stages=(TrainStage(steps=2), export_stage),
    )


def test_a_format_in_a_temporary_module_is_validated_before_training(npz_module, tmp_path, monkeypatch):
    C.validate(_config(ExportStage(formats=("stablehlo", "npz"))))

    def trained(*args, **kwargs):
        raise AssertionError("the run started: the export stage's formats were not validated first")

    monkeypatch.setattr(run_lib, "build_bundle", trained)
    for stage, match in [
        (ExportStage(formats=("npzz",)), r"stages\.export\.formats\.0.*did you mean 'npz'"),
        (ExportStage(formats=("tflite", "npz16")), r"stages\.export\.formats\.1.*add 'npz' to formats"),
        (ExportStage(formats=("npz_gpu",)), r"stages\.export\.formats\.0.*cannot run here: no accelerator"),
        (ExportStage(formats=("npz",), quantize=("int8",)), r"stages\.export\.quantize\.0.*add 'tflite' to formats"),
    ]:
        with pytest.raises(C.ConfigError, match=match):
            run_lib.run(_config(stage), str(tmp_path / "run"), progress=False, echo=False)
        assert not (tmp_path / "run" / "stages").exists()


def test_a_format_in_a_temporary_module_is_covered_by_the_conformance_check(npz_module, mlp_and_x, tmp_path):
    ok, why = runnable_formats()
    assert {"npz", "npz16"} <= set(ok) and "npz_gpu" in why
    model, x = mlp_and_x
    rep = export(model, x[:8], formats=("npz",), out_dir=tmp_path, eval_data=x, latency_repeats=1)
    assert_conforms("npz", rep, model, x)


def test_mode_registries_refuse_a_second_definition_but_take_the_same_one_again():
    def configure(converter, rep):
        del converter, rep

    with pytest.raises(DuplicateNameError, match="already registered"):
        register_quantization("int8")(configure)
    with pytest.raises(DuplicateNameError, match="already registered"):
        register_onnx_quantization("int8_qdq_symmetric")(lambda fp32, out, cal: None)
    try:
        register_deploy_hook("test_formats_hook")(configure)
        register_deploy_hook("test_formats_hook")(configure)  # a re-run cell: the same function again
        with pytest.raises(DuplicateNameError):
            register_deploy_hook("test_formats_hook")(lambda model: None)
    finally:
        DEPLOY_HOOKS.unregister("test_formats_hook")
    with pytest.raises(ValueError, match="did you mean 'int8'"):
        export(SmallMLP(4, rngs=nnx.Rngs(0)), np.ones((2, 64), np.float32), formats=("tflite",), quantize="int9")


def test_one_timer():
    from research.export import fusion
    from research.export import latency
    from research.export import tensorrt
    from research.export import tvm

    for module in (latency, fusion, tvm, tensorrt):
        assert module.median_ms is metrics.median_ms, module
    assert len(metrics.timings(lambda: None, repeats=4, warmup=0)) == 4
    with pytest.raises(ValueError, match="repeats=0 must be at least 1"):
        metrics.median_ms(lambda: None, repeats=0)


def test_export_run_refuses_a_mistyped_format_before_loading_the_run(tmp_path):
    from research.export import export_run

    with pytest.raises(ValueError, match="did you mean 'tflite'"):
        export_run(str(tmp_path / "no_run_here"), formats=("stablehlo", "tflitee"))


def test_slimjax_export_names_a_mistyped_format_in_one_line(tmp_path, capsys):
    from research import cli

    (tmp_path / "run").mkdir()
    code = cli.main(["export", str(tmp_path / "run"), "--to", "stablehlo,tflitee"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("slimjax: export error: ") and "did you mean 'tflite'" in err, err
    assert len(err.strip().splitlines()) == 1, err
