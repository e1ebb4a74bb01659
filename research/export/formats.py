"""The export format protocol and its registry: a format is one class in one module.

:func:`research.export.export` knows no format by name. It validates the request against the
registered formats, computes the JAX reference outputs once, and then, for each requested format
(formats it builds on first) and each of the format's variants, asks the format to convert and
write its artifact into the export's staging directory, compares what comes back in the format's
own runtime with JAX, and records it. The staged set is moved into ``out_dir`` together at the
end (:func:`research.export._io.commit_export_set`).

A format subclasses :class:`ExportFormat` and registers itself with :func:`register_format`::

    @register_format
    class NpzFormat(ExportFormat):
        name = "npz"
        runtime_name = "numpy"

        def produce(self, job, q):
            path = job.path(f"{job.name}_{q}.npz")
            with atomic_path(path) as tmp:  # research.export._io
                np.savez(open(tmp, "wb"), **weights_of(job.convert_model))
            run = NumpyRunner(path)
            return [Produced(name=f"npz_{q}", quantize=q, path=path, runtime="numpy", run=run)]

        def load(self, path, num_threads=1):
            return NumpyRunner(path)

Then ``export(model, x, formats=("npz",))`` writes ``model_fp32.npz``, ``ExportStage(formats=("npz",))``
validates, and the conformance test (``tests/research/export/test_formats.py``) exports the MLP in
it. What a format declares:

* :attr:`ExportFormat.modes` / :meth:`ExportFormat.variants`: the quantization modes it writes
  (``"fp32"`` always; TFLite's registered converter modes; ONNX's full-integer TFLite modes plus
  its own Q/DQ modes; ...), and which of a request's modes it writes;
* :meth:`ExportFormat.needs_calibration`: whether a mode calibrates activation ranges;
* :attr:`ExportFormat.requires`: formats that must be requested with it and why (TVM and TensorRT
  compile the ONNX artifacts); :attr:`ExportFormat.converted_from`: the format whose converter its
  conversion goes through (ONNX is converted from the TFLite flatbuffer), for error messages;
* :meth:`ExportFormat.unavailable`: why it cannot run here, with the install command (None when it
  can), checked before anything is converted (and by ``ExportStage`` before anything trains);
* :meth:`ExportFormat.produce`: convert and write one variant, returning :class:`Produced`
  artifacts with their runners; :meth:`ExportFormat.load`: a runner for an existing file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from importlib import metadata
from typing import Any
from typing import ClassVar

import numpy as np

import research.names as _names
from research.export.config import DEFAULT_FORMATS  # noqa: F401 - re-exported: the formats written when none are named
from research.export.report import Agreement
from research.registry import Registry
from research.registry import did_you_mean

Runner = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Produced:
    """An artifact a format wrote into the staging directory, ready to be compared and recorded.

    Attributes:
      name: artifact id (``tflite_int8``); unique within an export.
      quantize: the variant it implements (``"fp32"``, ``"int8"``...).
      path: the written file, inside :attr:`ExportJob.stage`.
      runtime: the runtime it runs in, with its version (``"LiteRT 2.3.0"``).
      run: ``x -> y`` on numpy arrays in that runtime.
      extra: format-specific facts for the report (``size_breakdown``, ``qdq``...).
      reference: agreement of a second runner (the file executed as written), if any.
    """

    name: str
    quantize: str
    path: str
    runtime: str
    run: Runner
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    reference: Agreement | None = None


def compare(run: Runner, inputs: Sequence[np.ndarray], refs: Sequence[np.ndarray]) -> tuple[float, float, float | None]:
    """``(max abs diff, max rel diff, top-1 agreement)`` of ``run`` against the JAX outputs ``refs``.

    The relative difference is the largest absolute difference over the largest reference
    magnitude; top-1 agreement is None unless every output is 2-D (a classifier's logits).

    Raises:
      AssertionError: an output's shape differs from JAX's.
    """
    abs_diff, scale, agree, total = 0.0, 0.0, 0, 0
    classify = all(r.ndim == 2 for r in refs)
    for x, ref in zip(inputs, refs, strict=True):
        y = np.asarray(run(x), dtype=np.float64)
        ref64 = np.asarray(ref, dtype=np.float64)
        if y.shape != ref64.shape:
            raise AssertionError(f"artifact output shape {y.shape} != JAX output {ref64.shape}")
        abs_diff = max(abs_diff, float(np.max(np.abs(y - ref64))))
        scale = max(scale, float(np.max(np.abs(ref64))))
        if classify:
            agree += int(np.sum(y.argmax(-1) == ref64.argmax(-1)))
            total += len(y)
    rel = abs_diff / scale if scale > 0 else abs_diff
    return abs_diff, rel, (agree / total if classify and total else None)


@dataclasses.dataclass(kw_only=True)
class ExportJob:
    """Everything a format needs to produce its artifacts for one :func:`~research.export.export` call.

    Attributes:
      model: the model as given; ``fn``: its inference function (the StableHLO artifact's graph).
      convert_model / convert_fn: what the converters take (a deploy hook's float stand-in, else
        the model); every artifact is still compared with ``model``.
      sample: the input that fixes shapes and is timed; ``calibration``: representative inputs.
      inputs / refs: the inputs every artifact is checked on and JAX's outputs on them.
      formats: the requested format names, in processing order; ``variants``: the requested
        quantization modes, ``"fp32"`` first.
      stage: the staging directory the artifacts are written into; ``out_dir``: their destination.
      name: the file name stem.
      options: export keyword options formats read (``batch_polymorphic``, ``batch_route``,
        ``activation_ranges``, ``activation_calibration``, ``num_threads``, ``latency_repeats``, ``onnx_opset``,
        ``tvm_tuning_trials``) and per-format ``format_options``.
      notes: report notes formats add (a variant a compiler refused, a stand-in used).
      cpu: the host's int8 facts (:class:`research.export.cpu.CpuInt8`); ``cpu_text`` its description.
    """

    model: Any
    fn: Callable[[Any], Any]
    convert_model: Any
    convert_fn: Callable[[Any], Any]
    sample: np.ndarray
    calibration: np.ndarray | None
    inputs: list[np.ndarray]
    refs: list[np.ndarray]
    formats: tuple[str, ...]
    variants: tuple[str, ...]
    stage: str
    out_dir: str
    name: str
    cpu: Any
    cpu_text: str
    batch_polymorphic: bool = True
    batch_route: str = "auto"
    activation_ranges: Mapping[str, tuple[float, float]] | None = None
    activation_calibration: str = "minmax"
    num_threads: int = 1
    latency_repeats: int = 30
    onnx_opset: int = 17  # onnx_export.DEFAULT_OPSET (not imported: that module imports this one)
    tvm_tuning_trials: int = 0
    format_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    produced: list[tuple[str, Produced]] = dataclasses.field(default_factory=list)
    _memo: dict[Any, Any] = dataclasses.field(default_factory=dict)

    def path(self, filename: str) -> str:
        """Where to write ``filename`` (inside the staging directory)."""
        return os.path.join(self.stage, filename)

    def agreement(self, runtime: str, run: Runner) -> Agreement:
        """How ``run`` agrees with JAX on the job's inputs."""
        abs_d, rel_d, top1 = compare(run, self.inputs, self.refs)
        return Agreement(runtime=runtime, max_abs_diff=abs_d, max_rel_diff=rel_d, top1_agreement=top1)

    def written(self, fmt: str) -> dict[str, Produced]:
        """The artifacts format ``fmt`` has produced so far in this export, by quantization mode."""
        return {p.quantize: p for f, p in self.produced if f == fmt}

    def memo(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` once per export: a conversion two formats share (the TFLite flatbuffer)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def needing(self, fmt: str) -> tuple[str, ...]:
        """The requested formats whose artifacts go through ``fmt``'s conversion (``fmt`` itself included)."""
        return tuple(f for f in self.formats if fmt in conversion_chain(f))

    def options_of(self, fmt: str) -> dict[str, Any]:
        """``format_options[fmt]``: the options of one format (empty when none were given)."""
        return dict(self.format_options.get(fmt, {}))


class ExportFormat:
    """One export format: its variants, its conversion and its runtime. Subclass and register.

    Class attributes:
      name: the name in ``formats=`` (``"tflite"``).
      runtime_name: the runtime's name for :func:`research.export.artifact_latency`
        (``"onnxruntime"`` for ``"onnx"``); defaults to ``name``.
      requires: ``{format: why}``: formats that must be requested too
        (``{"onnx": "compiles the ONNX artifacts"}``).
      converted_from: the format whose converter this one's conversion goes through (``"tflite"``
        for ONNX), so a converter failure names every requested format it stops.
      extension: file suffix of the artifact (for :func:`research.export.artifact_latency`).
    """

    name: ClassVar[str] = ""
    runtime_name: ClassVar[str] = ""
    requires: ClassVar[Mapping[str, str]] = {}
    converted_from: ClassVar[str | None] = None
    extension: ClassVar[str] = ""

    def modes(self) -> tuple[str, ...]:
        """Quantization modes this format can write; ``"fp32"`` first."""
        return ("fp32",)

    def needs_calibration(self, mode: str) -> bool:
        """Whether ``mode`` calibrates activation ranges (so needs ``calibration`` data)."""
        del mode
        return False

    def variants(self, requested: Sequence[str]) -> tuple[str, ...]:
        """The requested modes (``"fp32"`` first) this format writes, in request order."""
        mine = set(self.modes())
        return tuple(q for q in requested if q in mine)

    def unavailable(self) -> str | None:
        """Why this format cannot run here, naming the install command; None when it can."""
        return None

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Refuses bad ``format_options[name]`` in :func:`~research.export.export`, before anything
        converts (raise ValueError naming the option and what the format takes). The base accepts
        any: a format reads its own with :meth:`ExportJob.options_of`.
        """
        del options

    def prepare(self, job: ExportJob) -> None:
        """Called once per export before any artifact is produced (e.g. to measure the CPU)."""
        del job

    def label(self, job: ExportJob, q: str) -> str:
        """What is being produced, for the note added to an error (``model_int8.tflite (tflite_int8)``)."""
        return f"{job.name}_{q}{self.extension} ({self.name}_{q})"

    def produce(self, job: ExportJob, q: str) -> list[Produced]:
        """Converts variant ``q``, writes it atomically into ``job.stage``, returns its artifacts with runners.

        An empty list means the variant was not produced (say why in ``job.notes``).
        """
        raise NotImplementedError(f"export format {self.name!r} does not implement produce()")

    def load(self, path: str, num_threads: int = 1) -> Runner:
        """A runner ``x -> y`` for an artifact file this format wrote."""
        raise NotImplementedError(f"export format {self.name!r} does not implement load()")


# Created (with the built-in names declared) in the standard-library research.names, so configs are checked before JAX.
EXPORT_FORMATS: Registry[type[ExportFormat]] = _names.EXPORT_FORMATS


def register_format(cls: type[ExportFormat]) -> type[ExportFormat]:
    """Class decorator registering an :class:`ExportFormat` under its ``name``.

    Registering the same class again (a re-imported module) is allowed; a different class under a
    taken name raises :class:`research.registry.DuplicateNameError`.
    """
    if not (isinstance(cls, type) and issubclass(cls, ExportFormat)):
        raise TypeError(f"register_format takes an ExportFormat subclass, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__qualname__}.name is empty; set name = '<format>'")
    EXPORT_FORMATS.register(cls.name, cls)
    return cls


def get_format(name: str) -> ExportFormat:
    """A fresh instance of the format registered as ``name`` (one per export)."""
    return EXPORT_FORMATS.get(name)()


def format_names() -> list[str]:
    """Names of every registered export format, sorted."""
    return EXPORT_FORMATS.names()


def format_for_runtime(runtime: str) -> ExportFormat:
    """The format whose artifacts run in ``runtime`` (``"onnxruntime"`` -> the ONNX format)."""
    for name in format_names():
        fmt = get_format(name)
        if (fmt.runtime_name or name) == runtime:
            return fmt
    raise ValueError(f"runtime={runtime!r} runs no registered export format; choose from {runtimes()}")


def runtimes() -> tuple[str, ...]:
    """Runtime names of the registered formats."""
    return tuple((get_format(n).runtime_name or n) for n in format_names())


def conversion_chain(name: str) -> tuple[str, ...]:
    """``name`` and every format its conversion goes through (``"tvm"`` -> ``("tvm", "onnx", "tflite")``)."""
    chain = [name]
    while name in EXPORT_FORMATS and (nxt := EXPORT_FORMATS.get(name).converted_from) and nxt not in chain:
        chain.append(nxt)
        name = nxt
    return tuple(chain)


def conversions_used(formats: Iterable[str]) -> tuple[str, ...]:
    """Every format whose converter an export of ``formats`` runs: each requested format and the
    formats it is converted through (``("onnx",)`` -> ``("onnx", "tflite")``), in first-seen order.
    Their ``format_options`` apply, requested or not (an ONNX file is the TFLite conversion's)."""
    return tuple(dict.fromkeys(c for f in formats for c in conversion_chain(f)))


def activation_calibration_modes(rule: str) -> frozenset[str]:
    """The ``quantize`` modes whose activation ranges ``activation_calibration=rule`` chooses: the
    int8 TFLite modes (and the ONNX files converted from them) and the ONNX-only modes that
    implement ``rule`` (:func:`research.export.onnx_export.register_onnx_quantization`)."""
    from research.export import onnx_export  # noqa: PLC0415 - it imports this module
    from research.export import tflite_ranges  # noqa: PLC0415

    return tflite_ranges.INT8_ACTIVATION_MODES | frozenset(onnx_export.onnx_modes_with_rule(rule))


def quantize_modes() -> tuple[str, ...]:
    """Every ``quantize=`` mode some registered format writes, ``"fp32"`` excluded.

    The default formats' modes come first, in their order, then the other formats' (by name).
    """
    order = [*DEFAULT_FORMATS, *(n for n in format_names() if n not in DEFAULT_FORMATS)]
    modes = (q for n in order if n in EXPORT_FORMATS for q in get_format(n).modes())
    return tuple(q for q in dict.fromkeys(modes) if q != "fp32")


def needs_calibration(q: str) -> bool:
    """Whether quantization mode ``q`` calibrates activation ranges in any format that writes it."""
    return any(get_format(n).needs_calibration(q) for n in format_names() if q in get_format(n).modes())


def writers(q: str) -> list[str]:
    """The registered formats that write quantization mode ``q``, the default formats first."""
    rank = {n: i for i, n in enumerate(DEFAULT_FORMATS)}
    names = sorted(format_names(), key=lambda n: (rank.get(n, len(rank)), n))
    return [n for n in names if q in get_format(n).modes()]


def requested_variants(quantize: str | Sequence[str] | None) -> tuple[str, ...]:
    """``quantize=`` as the tuple of modes to write: ``"fp32"`` first, duplicates dropped."""
    if quantize is None:
        return ("fp32",)
    qs = [quantize] if isinstance(quantize, str) else list(quantize)
    return ("fp32", *[q for q in dict.fromkeys(qs) if q != "fp32"])


def problems(
    formats: Sequence[str],
    quantize: Sequence[str],
    *,
    availability: bool = True,
    activation_calibration: str = "minmax",
) -> list[tuple[str, str]]:
    """What is wrong with a request of ``formats`` and ``quantize`` modes, each with its fix.

    Checks, in order: formats given and registered (with a did-you-mean), each available here
    (``availability``), each format's ``requires`` requested too, every mode known and written by
    some requested format, and a non-default ``activation_calibration`` (a known rule) used by
    some requested mode. Calibration data is checked by :func:`research.export.export` itself.

    Returns:
      ``(field, message)`` pairs; ``field`` is ``"formats"``, ``"formats.<i>"``,
      ``"quantize.<i>"`` (``i`` indexes the given sequence) or ``"activation_calibration"``, for
      config errors.
    """
    formats, quantize = tuple(formats), tuple(quantize)
    names = format_names()
    if not formats:
        return [("formats", f"formats=() exports nothing; give some of {names}")]
    out = []
    for i, f in enumerate(formats):
        if f not in EXPORT_FORMATS:
            msg = f"formats={formats!r} contains {f!r}: unknown export format;{did_you_mean(f, names)} choose from {names}"
            out.append((f"formats.{i}", msg))
    if out:
        return out
    for i, f in enumerate(formats):
        if f in formats[:i]:
            continue
        fmt = get_format(f)
        reason = fmt.unavailable() if availability else None
        if reason:
            out.append((f"formats.{i}", f"formats={formats!r}: {f!r} cannot run here: {reason}"))
        for needed, why in fmt.requires.items():
            if needed not in formats:
                out.append((f"formats.{i}", f"formats={formats!r}: {f!r} {why}; add {needed!r} to formats"))
    known = quantize_modes()
    for i, q in enumerate(quantize):
        if q == "fp32" or q in quantize[:i]:
            continue
        if q not in known:
            out.append(
                (f"quantize.{i}", f"quantize={q!r} is unknown;{did_you_mean(q, known)} use None or some of {known}")
            )
            continue
        if not any(q in get_format(f).modes() for f in formats):
            by = writers(q)
            what = f"an {by[0]!r} file only" if len(by) == 1 else f"files of the formats {by} only"
            out.append((f"quantize.{i}", f"quantize={q!r} writes {what}; add {by[0]!r} to formats={formats!r}"))
    users = activation_calibration_modes(activation_calibration) if activation_calibration != "minmax" else ()
    if users and not set(quantize) & users:
        out.append(
            (
                "activation_calibration",
                f"activation_calibration={activation_calibration!r} chooses the activation ranges of the int8 "
                f"modes {sorted(users)}, and quantize={list(quantize)} has none; "
                "add one to quantize (e.g. quantize='int8') or drop activation_calibration",
            )
        )
    return out


def processing_order(formats: Sequence[str]) -> tuple[str, ...]:
    """The requested formats, each after the formats it requires (otherwise in request order)."""
    done: list[str] = []

    def visit(f: str, seen: tuple[str, ...]) -> None:
        if f in done:
            return
        if f in seen:
            raise ValueError(f"export formats {seen + (f,)} require each other in a cycle")
        for needed in EXPORT_FORMATS.get(f).requires:
            if needed in formats:
                visit(needed, (*seen, f))
        done.append(f)

    for f in dict.fromkeys(formats):
        visit(f, ())
    return tuple(done)


def dist_version(dist: str) -> str:
    """The installed version of distribution ``dist``, or ``"?"``."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def module_available(module: str, install_hint: str) -> str | None:
    """None when ``module`` can be imported (found without importing it), else why and how to install it."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"the Python package {module!r} is not installed; {install_hint}"


@contextlib.contextmanager
def producing(artifact: str, out_dir: str) -> Iterator[None]:
    """Names the artifact being produced on any error, and says the previous set is intact.

    The innermost label wins: an error already named (a shared conversion inside a format's
    artifact) is not named again.
    """
    try:
        yield
    except Exception as err:
        if not any(str(n).startswith("slimjax export:") for n in getattr(err, "__notes__", ())):
            err.add_note(
                f"slimjax export: failed while producing {artifact}; nothing of this export was moved "
                f"into {out_dir}, which still holds the previous export set"
            )
        raise


# The built-in formats register themselves at the bottom of their modules; importing them here
# means any use of the registry (``format_names()``, ``get_format``) sees them, however the
# package was entered. (Each imports this module, which is complete by now.)
from research.export import onnx_export as _onnx_export  # noqa: E402,F401
from research.export import stablehlo as _stablehlo  # noqa: E402,F401
from research.export import tensorrt as _tensorrt  # noqa: E402,F401
from research.export import tflite as _tflite  # noqa: E402,F401
from research.export import tvm as _tvm  # noqa: E402,F401
