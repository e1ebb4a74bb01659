"""What each compiler fuses: operator counts before and after fusion, fused patterns, latency off/on.

``fusion_report(model, sample)`` compiles one model with every runtime slimjax deploys to and
reads the result back:

* **XLA** (``jax.jit``): instructions of the unoptimised HLO module against kernels of the
  optimised entry computation (``jax.jit(f).lower(x).compile().as_text()``), each ``fusion``
  counting as one kernel; a fusion holding two or more operations is a fused pattern, named by
  its kind and operations (``kLoop: multiply+maximum``). Off: the ``fusion`` pass disabled
  (``xla_disable_hlo_passes``); the CPU backend then still wraps single elementwise ops in
  one-op loop fusions, which are not counted as patterns.
* **TFLite** (LiteRT): StableHLO operations of the lowered JAX function (what the converter
  reads) against the flatbuffer's operators; patterns are operators with a fused activation
  (``CONV_2D+RELU``) and elementwise ``MUL``/``ADD``/``SUB``s removed by folding them into a
  convolution or fully connected layer (BatchNorm scale and shift). The converter's fusions
  cannot be switched off; "off" is the interpreter without its default XNNPACK delegate.
* **onnxruntime**: nodes of the optimised model onnxruntime saves
  (``SessionOptions.optimized_model_filepath``) at ``ORT_DISABLE_ALL`` against
  ``ORT_ENABLE_ALL``; patterns are the fused node types (``FusedConv(Relu)``) and operator types
  that disappear (``BatchNormalization`` folded into the convolution).
* **TVM** (Relax): one TIR function per operator after ``LegalizeOps`` against the calls left in
  ``main`` after ``FuseOps``/``FuseTIR``; patterns are the fused primitive functions
  (``conv2d+add+relu``). Off: the same pipeline without ``FuseOps``/``FuseTIR``.

A runtime that is not installed, or fails on the model, gets a row with the exact reason.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from research.export import _deps
from research.export._trace import inference_fn
from research.metrics import median_ms

RUNTIMES = ("xla", "tflite", "onnxruntime", "tvm")

# Instructions that are not computation: bookkeeping, layout no-ops and calls that XLA inlines.
_HLO_TRIVIAL = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "call", "copy-start", "copy-done"}
# Inside a fusion, operations that only shape a constant operand are not a fused op of their own.
_FUSED_TRIVIAL = _HLO_TRIVIAL | {"broadcast", "iota"}
_HLO_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*[^=]*?\s([a-z][a-z0-9\-]*)\(", re.M)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuntimeFusion:
    """One runtime's fusion figures.

    Attributes:
      runtime: ``"xla"``, ``"tflite"``, ``"onnxruntime"`` or ``"tvm"``.
      ops_before: operators before the runtime's fusion (see the module docstring for what is
        counted per runtime); None when the runtime could not be run.
      ops_after: operators (kernels) after fusion.
      patterns: fused pattern -> how many times it occurs.
      latency_on_ms: median latency with the runtime's default (fusing) settings.
      latency_off_ms: median latency with fusion off (``off_means`` says what that is), None
        where the runtime has no switch.
      off_means: what "off" switches, or why there is no off measurement.
      counted: what ``ops_before`` / ``ops_after`` count.
      error: why the runtime has no figures (not installed, failed on the model), else None.
    """

    runtime: str
    ops_before: int | None = None
    ops_after: int | None = None
    patterns: dict[str, int] = dataclasses.field(default_factory=dict)
    latency_on_ms: float | None = None
    latency_off_ms: float | None = None
    off_means: str = ""
    counted: str = ""
    error: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class FusionReport:
    """Per-runtime fusion figures for one model at one batch size.

    Attributes:
      batch: batch size of the sample the latencies were measured on.
      num_threads: threads given to each runtime.
      runtimes: one :class:`RuntimeFusion` per runtime asked for.
    """

    batch: int
    num_threads: int
    runtimes: tuple[RuntimeFusion, ...]

    def __getitem__(self, runtime: str) -> RuntimeFusion:
        for r in self.runtimes:
            if r.runtime == runtime:
                return r
        raise KeyError(f"no runtime {runtime!r}; have {[r.runtime for r in self.runtimes]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``"table"`` holds :meth:`table`."""
        return {**dataclasses.asdict(self), "table": self.table()}

    def table(self) -> str:
        """A printable table: one row per runtime, then its fused patterns."""
        head = ("runtime", "ops before", "after", "latency off ms", "on ms", "off/on", "fused patterns")
        rows = []
        notes = []
        for r in self.runtimes:
            if r.error:
                rows.append((r.runtime, "-", "-", "-", "-", "-", f"not measured: {r.error}"))
                continue
            ratio = (
                f"{r.latency_off_ms / r.latency_on_ms:.2f}x"
                if r.latency_off_ms is not None and r.latency_on_ms
                else "-"
            )
            pats = ", ".join(f"{k} x{v}" for k, v in sorted(r.patterns.items(), key=lambda kv: (-kv[1], kv[0])))
            rows.append(
                (
                    r.runtime,
                    str(r.ops_before),
                    str(r.ops_after),
                    "-" if r.latency_off_ms is None else f"{r.latency_off_ms:.3f}",
                    "-" if r.latency_on_ms is None else f"{r.latency_on_ms:.3f}",
                    ratio,
                    pats or "(none)",
                )
            )
            notes.append(f"{r.runtime}: counts {r.counted}; off = {r.off_means}")
        widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head) - 1)]
        lines = [
            "  ".join([*(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)), row[-1]]) for row in [head, *rows]
        ]
        lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 14)
        foot = f"fusion at batch {self.batch}, {self.num_threads} thread(s)"
        return "\n".join([f"{foot}:", *lines, *notes])


# --------------------------------------------------------------------------------------- XLA


def _hlo_computations(text: str) -> dict[str, tuple[bool, list[str]]]:
    """Splits HLO text into computations: name -> (is_entry, opcodes)."""
    comps: dict[str, tuple[bool, list[str]]] = {}
    name, entry, ops = None, False, []
    for line in text.splitlines():
        head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            name, entry, ops = head.group(2), bool(head.group(1)), []
            continue
        if line.startswith("}") and name is not None:
            comps[name] = (entry, ops)
            name = None
            continue
        if name is not None:
            m = _HLO_INSTR.match(line)
            if m:
                ops.append(m.group(1))
    return comps


def hlo_fusion(unoptimized: str, optimized: str) -> tuple[int, int, dict[str, int]]:
    """Counts XLA's fusion from HLO text.

    Args:
      unoptimized: ``jax.jit(f).lower(x).as_text(dialect="hlo")``.
      optimized: ``jax.jit(f).lower(x).compile().as_text()``.

    Returns:
      ``(ops_before, kernels_after, patterns)``: non-trivial instructions in every computation
      of the unoptimised module; non-trivial instructions of the optimised entry computation
      (a fusion is one); and, per fusion holding at least two operations, ``"kind: op+op"``.
    """
    before = sum(sum(op not in _HLO_TRIVIAL for op in ops) for _, ops in _hlo_computations(unoptimized).values())
    comps = _hlo_computations(optimized)
    entry_lines = optimized[optimized.index("\nENTRY") :].split("\n}")[0].splitlines()
    after = 0
    patterns: Counter = Counter()
    for line in entry_lines[1:]:
        m = _HLO_INSTR.match(line)
        if not m or m.group(1) in _HLO_TRIVIAL:
            continue
        after += 1
        if m.group(1) != "fusion":
            continue
        called = re.search(r"calls=%?([\w.\-]+)", line)
        kind = re.search(r"kind=(k\w+)", line)
        custom = re.search(r'"kind":"(__\w+)"', line)
        ops = [op for op in comps.get(called.group(1) if called else "", (False, []))[1] if op not in _FUSED_TRIVIAL]
        if len(ops) >= 2:
            label = custom.group(1) if custom else (kind.group(1) if kind else "fusion")
            patterns[f"{label}: {'+'.join(ops)}"] += 1
    return before, after, dict(patterns)


def _xla(fn: Callable[..., Any], x: np.ndarray, repeats: int) -> RuntimeFusion:
    lowered = jax.jit(fn).lower(x)
    on = lowered.compile()
    off = lowered.compile(compiler_options={"xla_disable_hlo_passes": "fusion"})
    before, after, patterns = hlo_fusion(lowered.as_text(dialect="hlo"), on.as_text())
    return RuntimeFusion(
        runtime="xla",
        ops_before=before,
        ops_after=after,
        patterns=patterns,
        latency_on_ms=median_ms(lambda: on(x).block_until_ready(), repeats),
        latency_off_ms=median_ms(lambda: off(x).block_until_ready(), repeats),
        off_means="XLA's `fusion` pass disabled (xla_disable_hlo_passes=fusion)",
        counted="HLO instructions of the unoptimised module / kernels of the optimised entry computation",
    )


# ------------------------------------------------------------------------------------ TFLite

_STABLEHLO_OP = re.compile(r"=\s*\"?(stablehlo\.[a-z_]+|chlo\.[a-z_]+)")
_STABLEHLO_SKIP = {"stablehlo.constant"}
_TFLITE_ELEMENTWISE = {"MUL", "ADD", "SUB"}
_STABLEHLO_ELEMENTWISE = {"stablehlo.multiply", "stablehlo.add", "stablehlo.subtract"}


def stablehlo_op_counts(fn: Callable[..., Any], x: np.ndarray) -> Counter:
    """StableHLO operations of ``jax.jit(fn).lower(x)`` (constants left out), counted."""
    text = jax.jit(fn).lower(x).as_text()
    return Counter(m for m in _STABLEHLO_OP.findall(text) if m not in _STABLEHLO_SKIP)


def tflite_fused_ops(blob: bytes) -> tuple[Counter, Counter]:
    """A flatbuffer's operators, counted, and its fused activations (``"CONV_2D+RELU"``), counted."""
    _deps.tensorflow()
    from tensorflow.lite.python import schema_py_generated as schema  # noqa: PLC0415
    from tensorflow.lite.tools import flatbuffer_utils  # noqa: PLC0415

    from research.export import tflite  # noqa: PLC0415

    m = flatbuffer_utils.convert_bytearray_to_object(bytearray(blob))
    names = tflite._op_names()  # noqa: SLF001 (same package)
    acts = {v: k for k, v in vars(schema.ActivationFunctionType).items() if not k.startswith("_")}
    ops, fused = Counter(), Counter()
    for op in m.subgraphs[0].operators:
        name = tflite._op_name(m, op, names)  # noqa: SLF001
        ops[name] += 1
        act = getattr(op.builtinOptions, "fusedActivationFunction", 0) if op.builtinOptions is not None else 0
        if act:
            fused[f"{name}+{acts.get(act, act)}"] += 1
    return ops, fused


def _tflite(fn: Callable[..., Any], x: np.ndarray, blob: bytes, num_threads: int, repeats: int) -> RuntimeFusion:
    from research.export import tflite  # noqa: PLC0415

    before = stablehlo_op_counts(fn, x)
    ops, fused = tflite_fused_ops(blob)
    patterns: dict[str, int] = dict(fused)
    elementwise_before = sum(before[k] for k in _STABLEHLO_ELEMENTWISE)
    elementwise_after = sum(ops[k] for k in _TFLITE_ELEMENTWISE)
    folded = elementwise_before - elementwise_after
    if folded > 0:
        patterns["MUL/ADD/SUB folded into weights or bias (BatchNorm, bias add)"] = folded
    on = tflite.TFLiteRunner(blob, num_threads=num_threads)
    off = _tflite_without_delegates(blob, num_threads)
    return RuntimeFusion(
        runtime="tflite",
        ops_before=sum(before.values()),
        ops_after=sum(ops.values()),
        patterns=patterns,
        latency_on_ms=median_ms(lambda: on(x), repeats),
        latency_off_ms=None if off is None else median_ms(lambda: off(x), repeats),
        off_means=(
            "LiteRT's builtin kernels without the default XNNPACK delegate (XNNPACK packs and fuses further); the "
            "converter's own fusions have no switch"
        ),
        counted="StableHLO operations the converter reads (constants left out) / flatbuffer operators",
    )


def _tflite_without_delegates(blob: bytes, num_threads: int) -> Callable[[np.ndarray], np.ndarray] | None:
    cls = _deps.tflite_interpreter_class()
    module = __import__(cls.__module__, fromlist=["OpResolverType"])
    resolver = getattr(module, "OpResolverType", None)
    if resolver is None:
        return None
    interp = cls(
        model_content=bytes(blob),
        num_threads=num_threads,
        experimental_op_resolver_type=resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    state: dict[str, Any] = {"shape": None}

    def run(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=inp["dtype"])
        if state["shape"] != x.shape:
            interp.resize_tensor_input(inp["index"], list(x.shape), strict=False)
            interp.allocate_tensors()
            state["shape"] = x.shape
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        return interp.get_tensor(out["index"])

    return run


# ------------------------------------------------------------------------------- onnxruntime


def ort_fusion(onnx_path: str | os.PathLike, num_threads: int = 1) -> tuple[int, int, dict[str, int], Any, Any]:
    """Counts onnxruntime's graph fusion on an ONNX file.

    Returns:
      ``(nodes_disable_all, nodes_enable_all, patterns, session_off, session_on)``: node counts of
      the optimised models onnxruntime saves at ``ORT_DISABLE_ALL`` and ``ORT_ENABLE_ALL``;
      patterns: fused node types (with their activation, ``FusedConv(Relu)``) and operator types
      that are gone after optimisation (``"BatchNormalization removed"``); both sessions.
    """
    ort = _deps.onnxruntime()
    onnx = _deps.onnx()
    levels = {
        "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "on": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    graphs, sessions = {}, {}
    with tempfile.TemporaryDirectory() as d:
        for key, level in levels.items():
            opts = ort.SessionOptions()
            opts.graph_optimization_level = level
            opts.intra_op_num_threads = num_threads
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3  # the ENABLE_ALL model is hardware-specific: known, not worth a warning
            opts.optimized_model_filepath = os.path.join(d, f"{key}.onnx")
            sessions[key] = ort.InferenceSession(
                os.fspath(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
            graphs[key] = onnx.load(opts.optimized_model_filepath).graph
    count = {k: Counter(_ort_key(n) for n in g.node) for k, g in graphs.items()}
    patterns: Counter = Counter()
    for node in graphs["on"].node:
        act = next((a.s.decode() for a in node.attribute if a.name == "activation"), None)
        if _ort_key(node) not in count["off"] or act:
            patterns[f"{_ort_key(node)}({act})" if act else _ort_key(node)] += 1
    for op, n in count["off"].items():
        gone = n - count["on"].get(op, 0)
        if gone > 0:
            patterns[f"{op} removed"] += gone
    return sum(count["off"].values()), sum(count["on"].values()), dict(patterns), sessions["off"], sessions["on"]


def _ort_key(node: Any) -> str:
    """``op_type``, prefixed with its domain outside the default ONNX domain (``com.microsoft.nchwc.Conv``)."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def _ort(onnx_path: str, x: np.ndarray, num_threads: int, repeats: int) -> RuntimeFusion:
    before, after, patterns, off, on = ort_fusion(onnx_path, num_threads)
    name = on.get_inputs()[0].name
    feed = {name: np.ascontiguousarray(x, np.float32)}
    return RuntimeFusion(
        runtime="onnxruntime",
        ops_before=before,
        ops_after=after,
        patterns=patterns,
        latency_on_ms=median_ms(lambda: on.run(None, feed), repeats),
        latency_off_ms=median_ms(lambda: off.run(None, feed), repeats),
        off_means="graph_optimization_level=ORT_DISABLE_ALL (on: ORT_ENABLE_ALL)",
        counted="nodes of the model saved at ORT_DISABLE_ALL / at ORT_ENABLE_ALL",
    )


# --------------------------------------------------------------------------------------- TVM


def tvm_fusion(onnx_model: Any) -> tuple[int, int, dict[str, int]]:
    """Counts TVM Relax's fusion on an ONNX model (``onnx.ModelProto`` or path).

    Returns:
      ``(ops_before, calls_after, patterns)``: ``call_tir``s in ``main`` after ``LegalizeOps``
      (one per operator), calls left in ``main`` after ``FuseOps``/``FuseTIR``, and the fused
      primitive functions by pattern (``"conv2d+add+relu"``).
    """
    from research.export import tvm as tvm_lib  # noqa: PLC0415

    tvm = tvm_lib.tvm_module()
    from tvm import relax  # noqa: PLC0415

    mod = tvm_lib.import_onnx(onnx_model)
    with tvm_lib.host_target():
        legal = tvm.transform.Sequential(
            [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant()]
        )(mod)
        fused = relax.transform.FuseOps()(legal)
        fused_functions = {
            gv.name_hint: f
            for gv, f in fused.functions.items()
            if isinstance(f, relax.Function) and f.attrs is not None and "Primitive" in f.attrs
        }
    before = len(_main_calls(legal))
    calls = _main_calls(fused)
    patterns: Counter = Counter()
    for callee in calls:
        if callee in fused_functions:
            inner = _calls_in(fused_functions[callee])
            patterns["+".join(_op_of(legal, c) for c in inner)] += 1
    return before, len(calls), dict(patterns)


def _op_of(mod: Any, name: str) -> str:
    """TIR function name without LegalizeOps' numeric suffix (``add3`` -> ``add``)."""
    del mod
    return re.sub(r"\d+$", "", name)


def _main_calls(mod: Any) -> list[str]:
    return _calls_in(mod["main"])


def _calls_in(func: Any) -> list[str]:
    """Names of the functions a Relax function calls (``call_tir`` targets and direct calls)."""
    from tvm import relax  # noqa: PLC0415

    out = []
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if not isinstance(value, relax.Call):
                continue
            if isinstance(value.op, relax.GlobalVar):
                out.append(value.op.name_hint)
            elif getattr(value.op, "name", "") == "relax.call_tir" and isinstance(value.args[0], relax.GlobalVar):
                out.append(value.args[0].name_hint)
    return out


def _tvm(onnx_path: str, x: np.ndarray, num_threads: int, repeats: int, work_dir: str) -> RuntimeFusion:
    from research.export import tvm as tvm_lib  # noqa: PLC0415

    before, after, patterns = tvm_fusion(onnx_path)
    latency = {}
    for fuse in (True, False):
        path = os.path.join(work_dir, f"fusion_{'on' if fuse else 'off'}_tvm.so")
        tvm_lib.export_tvm(onnx_path, path, fuse=fuse, verify_input=x)
        runner = tvm_lib.TVMRunner(path, num_threads=num_threads)
        latency[fuse] = median_ms(lambda runner=runner: runner(x), repeats)
    return RuntimeFusion(
        runtime="tvm",
        ops_before=before,
        ops_after=after,
        patterns=patterns,
        latency_on_ms=latency[True],
        latency_off_ms=latency[False],
        off_means="TVM's CPU pipeline without FuseOps/FuseTIR (untuned kernels both ways)",
        counted="TIR functions called by main after LegalizeOps / calls after FuseOps",
    )


# ----------------------------------------------------------------------------------- entry


def fusion_report(
    model: Any,
    sample: np.ndarray | jax.Array,
    *,
    runtimes: Sequence[str] = RUNTIMES,
    tflite_path: str | os.PathLike | None = None,
    onnx_path: str | os.PathLike | None = None,
    num_threads: int = 1,
    latency_repeats: int = 20,
) -> FusionReport:
    """Per runtime: operator counts before and after fusion, the fused patterns, latency off/on.

    Args:
      model: a ``flax.nnx.Module`` (eval mode is used) or a JAX function ``x -> y``.
      sample: the input batch; latencies are measured on it.
      runtimes: any of ``"xla"``, ``"tflite"``, ``"onnxruntime"``, ``"tvm"``.
      tflite_path: the float32 TFLite file to read (default: converted here from ``model``).
      onnx_path: the float32 ONNX file for onnxruntime and TVM (default: converted here from the
        TFLite file, as :func:`research.export.export` does).
      num_threads: threads for each runtime.
      latency_repeats: timed calls per latency (median reported).

    Returns:
      A :class:`FusionReport`; a runtime that is not installed or fails carries its error.

    Raises:
      ValueError: an unknown runtime.

    Example:
      >>> rep = fusion_report(model, x_test[:1])  # doctest: +SKIP
      >>> print(rep.table())  # doctest: +SKIP
    """
    runtimes = tuple(runtimes)
    bad = [r for r in runtimes if r not in RUNTIMES]
    if bad or not runtimes:
        raise ValueError(f"runtimes={runtimes!r} contains {bad}; choose from {RUNTIMES}")
    x = np.asarray(sample)
    fn = inference_fn(model)
    rows: list[RuntimeFusion] = []
    with tempfile.TemporaryDirectory() as work:
        blob: bytes | None = None

        def tflite_blob() -> bytes:
            nonlocal blob
            if blob is None:
                if tflite_path is not None:
                    with open(tflite_path, "rb") as f:
                        blob = f.read()
                else:
                    from research.export import tflite  # noqa: PLC0415

                    blob = tflite.to_tflite(fn, x, model=model)
            return blob

        def onnx_file() -> str:
            if onnx_path is not None:
                return os.fspath(onnx_path)
            path = os.path.join(work, "model_fp32.onnx")
            if not os.path.exists(path):
                from research.export import onnx_export  # noqa: PLC0415

                onnx_export.write_onnx(onnx_export.tflite_to_onnx(tflite_blob()), path)
            return path

        for runtime in runtimes:
            try:
                if runtime == "xla":
                    rows.append(_xla(fn, x, latency_repeats))
                elif runtime == "tflite":
                    rows.append(_tflite(fn, x, tflite_blob(), num_threads, latency_repeats))
                elif runtime == "onnxruntime":
                    rows.append(_ort(onnx_file(), x, num_threads, latency_repeats))
                else:
                    rows.append(_tvm(onnx_file(), x, num_threads, latency_repeats, work))
            except ImportError as err:
                rows.append(RuntimeFusion(runtime=runtime, error=f"not installed: {err}"))
            except Exception as err:  # noqa: BLE001 - one runtime failing must not hide the others
                rows.append(RuntimeFusion(runtime=runtime, error=f"{type(err).__name__}: {err}"))
    batch = int(x.shape[0]) if x.ndim else 1
    return FusionReport(batch=batch, num_threads=num_threads, runtimes=tuple(rows))
