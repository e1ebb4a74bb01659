"""Apache TVM (Relax) as an export format: the ONNX artifact compiled for the host CPU.

``export(..., formats=("onnx", "tvm"))`` imports each ONNX file it wrote with
``tvm.relax.frontend.onnx.from_onnx``, compiles it with ``tvm.compile`` for ``llvm`` with the
host CPU's ``mcpu`` (LLVM's ``getHostCPUName``, e.g. ``znver4``) and saves a shared library
(``{name}_{variant}_tvm.so``) that :class:`TVMRunner` loads into Relax's virtual machine.
The batch dimension stays symbolic (Relax compiles shape-generic kernels), so one library serves
every batch size, as the ONNX file does.

int8: the Q/DQ ONNX files import as ``relax.quantize``/``relax.dequantize`` around float
operators, so TVM computes in float32 on values rounded to the int8 grid (fake quantization):
agreement with the int8 ONNX file, but no int8 arithmetic and no speed-up from it. The export
report records this in ``extra["int8_compute"]``.

Default CPU pipeline: ``LegalizeOps`` lowers every operator to a TIR loop nest, ``FuseOps`` /
``FuseTIR`` merge injective and reduction-epilogue ops into their producer (conv + bias + ReLU
become one kernel), and nothing is scheduled: loops run as written, single-threaded. Tuning with
MetaSchedule (``tuning_trials > 0``) searches schedules (tiling, vectorisation, parallel loops);
it needs static shapes, so a tuned library is compiled for one batch size (``tuning_batch``).

TVM is optional: ``pip install 'slimjax[tvm]'`` (tested with apache-tvm 0.27.0.post1, numpy 2.4).
A C compiler (``cc``) must be on ``PATH``: TVM links the library with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from research.export import formats as formats_lib
from research.export.formats import ExportFormat
from research.export.formats import ExportJob
from research.export.formats import Produced
from research.export.formats import register_format
from research.metrics import median_ms

TESTED_VERSION = "0.27.0.post1"
INSTALL_HINT = "pip install 'slimjax[tvm]'"
SUFFIX = "_tvm.so"


def tvm_module() -> ModuleType:
    """Returns the ``tvm`` module, or raises an ``ImportError`` that says how to install it."""
    try:
        return importlib.import_module("tvm")
    except ImportError as err:
        raise ImportError(
            f"formats=('tvm',) needs Apache TVM (tested: apache-tvm=={TESTED_VERSION}) but importing 'tvm' "
            f"failed: {err}. Install it with `{INSTALL_HINT}`, or drop 'tvm' from formats."
        ) from err


def available() -> bool:
    """Whether TVM imports (the ``tvm`` format and the TVM rows of the fusion report need it)."""
    try:
        tvm_module()
    except ImportError:
        return False
    return True


def host_cpu() -> str:
    """LLVM's name for the host CPU (e.g. ``"znver4"``, ``"skylake-avx512"``), ``"generic"`` if unknown."""
    tvm = tvm_module()
    try:
        return str(tvm.target.codegen.llvm_get_system_cpu()) or "generic"
    except Exception:  # noqa: BLE001 - an LLVM build without host detection
        return "generic"


def host_target(mcpu: str | None = None) -> Any:
    """A ``tvm.target.Target`` for this CPU: ``llvm`` with ``mcpu`` (detected when None).

    Args:
      mcpu: an LLVM CPU name; None detects the host's (left out when LLVM says ``generic``).
    """
    tvm = tvm_module()
    cpu = host_cpu() if mcpu is None else mcpu
    spec: dict[str, Any] = {"kind": "llvm"}
    if cpu and cpu != "generic":
        spec["mcpu"] = cpu
    # MetaSchedule sizes its parallel loops by the physical cores (required when tuning).
    spec["num-cores"] = max(
        1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    return tvm.target.Target(spec)


def import_onnx(model: Any) -> Any:
    """Imports an ONNX model (``onnx.ModelProto`` or path) as a Relax ``IRModule`` with weights inlined."""
    tvm_module()
    import onnx  # noqa: PLC0415 (optional dependency)
    from tvm.relax.frontend.onnx import from_onnx  # noqa: PLC0415

    proto = onnx.load(os.fspath(model)) if isinstance(model, str | os.PathLike) else model
    return from_onnx(proto, keep_params_in_input=False)


def batch_var(mod: Any) -> str | None:
    """Name of the symbolic leading dimension of ``main``'s first input, None when it is static."""
    dim = _leading_dim(mod)
    return None if dim is None or isinstance(dim, int) else str(dim.name)


def bind_batch(mod: Any, batch: int) -> Any:
    """Returns ``mod`` with its symbolic batch dimension fixed to ``batch`` (unchanged if static)."""
    from tvm import relax  # noqa: PLC0415

    var = batch_var(mod)
    if var is None:
        return mod
    return relax.transform.BindSymbolicVars({var: int(batch)}, "main")(mod)


def _passes(target: Any, fuse: bool) -> Any:
    """The CPU pipeline of ``tvm.compile`` (``relax.backend.cpu_generic``), FuseOps/FuseTIR optional."""
    tvm = tvm_module()
    from tvm import relax  # noqa: PLC0415
    from tvm.relax.backend.cpu_generic import pipeline as cpu  # noqa: PLC0415

    legalize = [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
    ]
    if fuse:
        legalize += [relax.transform.FuseOps(), relax.transform.FuseTIR()]

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            seq = tvm.transform.Sequential(
                cpu.library_dispatch_passes(target)
                + legalize
                + cpu.dataflow_lower_passes(target)
                + cpu.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompileInfo:
    """How a TVM library was built.

    Attributes:
      target: the target's JSON form (kind, mcpu).
      fused: whether FuseOps/FuseTIR ran.
      tuning_trials: MetaSchedule trials (0: untuned).
      batch: the fixed batch size, or None for a variable batch.
      compile_s: wall time of import + compilation (+ tuning).
      tvm_version: ``tvm.__version__``.
    """

    target: str
    fused: bool
    tuning_trials: int
    batch: int | None
    compile_s: float
    tvm_version: str


def compile_onnx(
    model: Any,
    *,
    target: Any = None,
    fuse: bool = True,
    tuning_trials: int = 0,
    tuning_batch: int = 1,
    work_dir: str | os.PathLike | None = None,
    measure_timeout_s: float = 120.0,
) -> tuple[Any, CompileInfo]:
    """Compiles an ONNX model with TVM Relax for the host CPU.

    Args:
      model: ``onnx.ModelProto`` or path of an ``.onnx`` file.
      target: a ``tvm.target.Target``; default :func:`host_target`.
      fuse: run FuseOps/FuseTIR (the default pipeline); False compiles one kernel per operator.
      tuning_trials: MetaSchedule trials over all tasks (0: no tuning). Tuning needs static shapes:
        the batch is fixed to ``tuning_batch``.
      tuning_batch: the batch size a tuned library is compiled for.
      work_dir: MetaSchedule's database directory (default: a temporary directory).
      measure_timeout_s: MetaSchedule's per-candidate build and run timeout (its default, 30 s,
        killed every candidate build on a loaded 2-core machine).

    Returns:
      ``(executable, info)``; ``executable.export_library(path)`` saves it.

    Raises:
      ValueError: negative ``tuning_trials``, or tuning with ``fuse=False``.
      ImportError: TVM is not installed.
    """
    tvm = tvm_module()
    if tuning_trials < 0:
        raise ValueError(f"tuning_trials={tuning_trials} must be >= 0 (0 compiles without tuning)")
    if tuning_trials and not fuse:
        raise ValueError("tuning_trials > 0 tunes the fused pipeline; pass fuse=True or tuning_trials=0")
    target = host_target() if target is None else target
    t0 = time.perf_counter()
    mod = import_onnx(model)
    batch = None if batch_var(mod) is not None else _static_batch(mod)
    if tuning_trials:
        mod = bind_batch(mod, tuning_batch)
        batch = tuning_batch
        with contextlib.ExitStack() as stack:
            wd = os.fspath(work_dir) if work_dir is not None else stack.enter_context(tempfile.TemporaryDirectory())
            mod = _tune(mod, target, wd, int(tuning_trials), measure_timeout_s)
        ex = tvm.compile(mod, target=target)
    else:
        ex = tvm.compile(mod, target=target, relax_pipeline=_passes(target, fuse))
    info = CompileInfo(
        target=str(target),
        fused=fuse,
        tuning_trials=int(tuning_trials),
        batch=batch,
        compile_s=time.perf_counter() - t0,
        tvm_version=tvm.__version__,
    )
    return ex, info


def _tune(mod: Any, target: Any, work_dir: str, trials: int, timeout_s: float) -> Any:
    """MetaSchedule-tunes a static-shape Relax module and applies the best schedules found."""
    tvm = tvm_module()
    from tvm import relax  # noqa: PLC0415
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    with target:
        mod = tvm.transform.Sequential(
            [
                relax.transform.DecomposeOpsForInference(),
                relax.transform.CanonicalizeBindings(),
                relax.get_pipeline("zero"),
            ]
        )(mod)
    try:
        import xgboost  # noqa: F401, PLC0415

        cost_model = "xgb"
    except ImportError:  # MetaSchedule's default cost model needs xgboost; random search works without
        cost_model = "random"
    ms.relax_integration.tune_relax(
        mod=mod,
        params={},
        target=target,
        work_dir=work_dir,
        max_trials_global=trials,
        num_trials_per_iter=min(64, trials),
        builder=ms.builder.LocalBuilder(max_workers=1, timeout_sec=timeout_s),
        runner=ms.runner.LocalRunner(timeout_sec=timeout_s),
        cost_model=cost_model,
    )
    with target:
        return relax.transform.MetaScheduleApplyDatabase(work_dir)(mod)


def set_num_threads(num_threads: int) -> None:
    """Sets the size of TVM's (process-wide) CPU thread pool."""
    tvm_module()
    import tvm_ffi  # noqa: PLC0415

    if num_threads < 1:
        raise ValueError(f"num_threads={num_threads} must be >= 1")
    # Affinity mode 1 ("big" cores: every core on a homogeneous CPU), num_threads workers.
    tvm_ffi.get_global_func("runtime.config_threadpool")(1, int(num_threads))


class TVMRunner:
    """Runs a TVM library (``*_tvm.so``) in Relax's virtual machine on the CPU.

    Args:
      path: the library written by :func:`export_tvm` (or ``Executable.export_library``).
      num_threads: size of TVM's thread pool (process-wide; only tuned kernels use threads).
    """

    def __init__(self, path: str | os.PathLike, num_threads: int = 1):
        tvm = tvm_module()
        from tvm import relax  # noqa: PLC0415

        set_num_threads(num_threads)
        self._lib = tvm.runtime.load_module(os.fspath(path))
        self._dev = tvm.cpu()
        self._vm = relax.VirtualMachine(self._lib, self._dev)
        self._main = self._vm["main"]
        self._tensor = tvm.runtime.tensor

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = self._main(self._tensor(np.ascontiguousarray(x, dtype=np.float32), self._dev))
        if not hasattr(out, "numpy"):  # a tuple of outputs: the first is the model's
            out = out[0]
        return out.numpy()


@contextlib.contextmanager
def _atomic_library(path: str) -> Iterator[str]:
    """Yields a temporary ``.so`` path in ``path``'s directory; moves it onto ``path`` on success."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        tmp = os.path.join(tmp_dir, os.path.basename(path))
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def export_tvm(
    onnx_model: Any,
    path: str | os.PathLike,
    *,
    verify_input: np.ndarray | None = None,
    target: Any = None,
    fuse: bool = True,
    tuning_trials: int = 0,
    tuning_batch: int = 1,
    work_dir: str | os.PathLike | None = None,
    measure_timeout_s: float = 120.0,
) -> CompileInfo:
    """Compiles an ONNX model with TVM and writes the library to ``path`` atomically.

    The library is written to a temporary file next to ``path``, loaded into a Relax VM and run on
    ``verify_input`` (when given), and only then moved onto ``path``: a failed compilation or
    load never replaces a good library.

    Args:
      onnx_model: ``onnx.ModelProto`` or path of an ``.onnx`` file.
      path: destination, e.g. ``export/model_fp32_tvm.so``.
      verify_input: an input to run the written library on before it is moved into place.
      target, fuse, tuning_trials, tuning_batch, work_dir, measure_timeout_s: as :func:`compile_onnx`.

    Returns:
      The :class:`CompileInfo`.

    Example:
      >>> info = export_tvm("export/model_fp32.onnx", "export/model_fp32_tvm.so")  # doctest: +SKIP
      >>> TVMRunner("export/model_fp32_tvm.so")(x)  # doctest: +SKIP
    """
    ex, info = compile_onnx(
        onnx_model,
        target=target,
        fuse=fuse,
        tuning_trials=tuning_trials,
        tuning_batch=tuning_batch,
        work_dir=work_dir,
        measure_timeout_s=measure_timeout_s,
    )
    with _atomic_library(os.fspath(path)) as tmp:
        ex.export_library(tmp)
        if verify_input is not None:
            x = verify_input if info.batch is None else np.resize(verify_input, (info.batch, *verify_input.shape[1:]))
            TVMRunner(tmp)(x)
    return info


def int8_compute(mod: Any) -> dict[str, Any]:
    """Operators of an imported Relax module by name, and whether any conv/matmul takes int8 inputs.

    Returns:
      ``{"ops": {op: count}, "int8_matmul_or_conv": int, "float_matmul_or_conv": int}``.
    """
    from tvm import relax  # noqa: PLC0415

    ops: Counter = Counter()
    heavy = {"int8": 0, "float": 0}
    for binding in _bindings(mod["main"]):
        value = binding.value
        if isinstance(value, relax.Call) and isinstance(value.op, tvm_module().ir.Op):
            name = str(value.op.name)
            ops[name] += 1
            if name in ("relax.nn.conv2d", "relax.nn.conv1d", "relax.matmul"):
                dtypes = {str(getattr(a.ty, "dtype", "")) for a in value.args}
                heavy["int8" if dtypes & {"int8", "uint8"} else "float"] += 1
    return {
        "ops": dict(ops),
        "int8_matmul_or_conv": heavy["int8"],
        "float_matmul_or_conv": heavy["float"],
    }


def _leading_dim(mod: Any) -> Any:
    """The first input's leading dimension: an int, a symbolic ``tirx.Var``, or None (unknown)."""
    from tvm import tirx  # noqa: PLC0415

    shape = getattr(mod["main"].params[0].ty, "shape", None)  # TVM 0.27: a Var's type is ``.ty``
    values = getattr(shape, "values", None)
    if not values:
        return None
    dim = values[0]
    return dim if isinstance(dim, tirx.Var) else int(dim)


def _static_batch(mod: Any) -> int | None:
    dim = _leading_dim(mod)
    return dim if isinstance(dim, int) else None


def _bindings(func: Any) -> Iterator[Any]:
    for block in func.body.blocks:
        yield from block.bindings


class FixedBatchRunner:
    """Runs a library compiled for one batch size on any batch: rows in chunks, the last padded.

    Args:
      runner: the fixed-batch callable (e.g. a :class:`TVMRunner` of a tuned library).
      batch: the batch size it was compiled for.
    """

    def __init__(self, runner: Any, batch: int):
        self._run, self._batch = runner, int(batch)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if len(x) == self._batch:
            return self._run(x)
        outs = []
        for i in range(0, len(x), self._batch):
            chunk = x[i : i + self._batch]
            pad = self._batch - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            outs.append(self._run(chunk)[: self._batch - pad])
        return np.concatenate(outs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TVMArtifact:
    """A compiled TVM library ready for :func:`research.export.export` to check and report.

    Attributes:
      name: artifact id (``tvm_fp32``, ``tvm_int8``, ``tvm_fp32_tuned``).
      quantize: the variant of the ONNX file it was compiled from.
      path: the library.
      runtime: ``"TVM <version> Relax VM (<target>)"``.
      runner: ``x -> y`` on numpy arrays.
      extra: compile facts (target, fused, trials, batch, compile seconds), int8 compute, tuning
        speed-up.
    """

    name: str
    quantize: str
    path: str
    runtime: str
    runner: Any
    extra: dict[str, Any]


def _runtime_name(target: Any) -> str:
    return f"TVM {tvm_module().__version__} Relax VM ({target.attrs.get('mcpu', 'llvm')})"


def build_variant(
    q: str,
    onnx_path: str,
    out_dir: str,
    name: str,
    sample: np.ndarray,
    *,
    target: Any = None,
    num_threads: int = 1,
    tuning_trials: int = 0,
    latency_repeats: int = 30,
) -> tuple[list[TVMArtifact], list[str]]:
    """Compiles one ONNX artifact of an export (variant ``q``) into ``{name}_{q}_tvm.so``.

    The float32 file must compile (an error propagates); a quantized (Q/DQ) file is attempted and
    a failure is returned as a note with TVM's exact error. With ``tuning_trials``, the float32
    file is also tuned with MetaSchedule at the sample's batch size (``{name}_fp32_tuned_tvm.so``)
    and its ``extra["speedup_vs_untuned"]`` is measured against the untuned library side by side.

    Args:
      q: the variant of the ONNX file.
      onnx_path: the ONNX file.
      out_dir: where the libraries go.
      name: file name stem.
      sample: the input the libraries are verified and timed on.
      target: the ``tvm.target.Target`` (default: :func:`host_target`).
      num_threads: TVM thread pool size.
      tuning_trials: MetaSchedule trials for the tuned float32 library (0: none).
      latency_repeats: timed calls for the tuning speed-up.

    Returns:
      ``(artifacts, notes)``.
    """
    target = host_target() if target is None else target
    runtime = _runtime_name(target)
    path = os.path.join(out_dir, f"{name}_{q}{SUFFIX}")
    try:
        info = export_tvm(onnx_path, path, verify_input=sample, target=target)
    except Exception as err:
        if q == "fp32":
            raise
        return [], [f"tvm_{q}: TVM could not compile {os.path.basename(onnx_path)}: {type(err).__name__}: {err}"]
    extra: dict[str, Any] = {"compile": dataclasses.asdict(info), "variable_batch": info.batch is None}
    if q != "fp32":
        extra["int8_compute"] = int8_compute(import_onnx(onnx_path))
    untuned = TVMRunner(path, num_threads)
    artifacts = [TVMArtifact(name=f"tvm_{q}", quantize=q, path=path, runtime=runtime, runner=untuned, extra=extra)]
    if q == "fp32" and tuning_trials:
        batch = int(sample.shape[0])
        tuned_path = os.path.join(out_dir, f"{name}_fp32_tuned{SUFFIX}")
        tuned_info = export_tvm(
            onnx_path, tuned_path, verify_input=sample, target=target, tuning_trials=tuning_trials, tuning_batch=batch
        )
        tuned = FixedBatchRunner(TVMRunner(tuned_path, num_threads), batch)
        t_untuned = median_ms(lambda: untuned(sample), latency_repeats)
        t_tuned = median_ms(lambda: tuned(sample), latency_repeats)
        artifacts.append(
            TVMArtifact(
                name="tvm_fp32_tuned",
                quantize="fp32",
                path=tuned_path,
                runtime=runtime,
                runner=tuned,
                extra={
                    "compile": dataclasses.asdict(tuned_info),
                    "variable_batch": False,
                    "untuned_ms": t_untuned,
                    "tuned_ms": t_tuned,
                    "speedup_vs_untuned": t_untuned / t_tuned if t_tuned > 0 else float("nan"),
                },
            )
        )
    return artifacts, []


def build_artifacts(
    onnx_files: list[tuple[str, str]],
    out_dir: str,
    name: str,
    sample: np.ndarray,
    *,
    num_threads: int = 1,
    tuning_trials: int = 0,
    latency_repeats: int = 30,
) -> tuple[list[TVMArtifact], list[str]]:
    """Compiles every ONNX artifact of an export with TVM: :func:`build_variant` per ``(variant, path)``."""
    target = host_target()
    artifacts: list[TVMArtifact] = []
    notes: list[str] = []
    for q, onnx_path in onnx_files:
        built, why = build_variant(
            q,
            onnx_path,
            out_dir,
            name,
            sample,
            target=target,
            num_threads=num_threads,
            tuning_trials=tuning_trials,
            latency_repeats=latency_repeats,
        )
        artifacts += built
        notes += why
    return artifacts, notes


@register_format
class TVMFormat(ExportFormat):
    """``model_{mode}_tvm.so``: each ONNX artifact of the export compiled by Apache TVM (Relax) for this CPU.

    Writes the variants the ONNX format writes; a quantized file TVM cannot compile becomes a note.
    ``tvm_tuning_trials`` adds ``tvm_fp32_tuned`` (MetaSchedule, fixed batch).
    """

    name = "tvm"
    requires = {"onnx": "compiles the ONNX artifacts"}
    converted_from = "onnx"
    extension = SUFFIX

    def _onnx(self) -> ExportFormat:
        return formats_lib.get_format("onnx")

    def modes(self) -> tuple[str, ...]:
        return self._onnx().modes()

    def needs_calibration(self, mode: str) -> bool:
        return self._onnx().needs_calibration(mode)

    def variants(self, requested: Sequence[str]) -> tuple[str, ...]:
        return self._onnx().variants(requested)

    def unavailable(self) -> str | None:
        return formats_lib.module_available("tvm", INSTALL_HINT)

    def label(self, job: ExportJob, q: str) -> str:
        return f"{job.name}_{q}{SUFFIX} (tvm_{q}, compiled from {job.name}_{q}.onnx)"

    def produce(self, job: ExportJob, q: str) -> list[Produced]:
        source = job.written("onnx").get(q)
        if source is None:
            return []
        built, notes = build_variant(
            q,
            source.path,
            job.stage,
            job.name,
            job.sample,
            target=job.memo(("tvm", "target"), host_target),
            num_threads=job.num_threads,
            tuning_trials=job.tvm_tuning_trials,
            latency_repeats=job.latency_repeats,
        )
        job.notes.extend(notes)
        return [
            Produced(name=t.name, quantize=t.quantize, path=t.path, runtime=t.runtime, run=t.runner, extra=t.extra)
            for t in built
        ]

    def load(self, path: str, num_threads: int = 1) -> TVMRunner:
        """A runner for a ``*_tvm.so`` library, or for an ``.onnx`` file (compiled first, into a temporary directory)."""
        if path.endswith(".onnx"):
            lib = os.path.join(tempfile.mkdtemp(prefix="slimjax_tvm_"), f"model{SUFFIX}")
            export_tvm(path, lib)
            path = lib
        return TVMRunner(path, num_threads=num_threads)
