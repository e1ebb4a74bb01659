"""StableHLO export through ``jax.export``, with a manifest.

``jax.export`` serializes a jitted function as a portable StableHLO artifact. JAX guarantees that
such an artifact can be compiled and run by a JAX/jaxlib up to **6 months newer** than the jaxlib
that exported it (backward compatibility) and up to **3 weeks older** (forward compatibility);
the window counts from when the exporting jaxlib was *built*, which is on or before the export
date. The manifest records both dates computed from the export date, the versions, and the input
and output shapes/dtypes (``"b"`` marks a symbolic batch dimension).

Reference: https://docs.jax.dev/en/latest/export/export.html#compatibility-guarantees
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jaxlib
import numpy as np
from jax import export as jax_export

from research.export._io import write_bytes_atomic
from research.export.formats import ExportFormat
from research.export.formats import ExportJob
from research.export.formats import Produced
from research.export.formats import register_format

BACKWARD_COMPAT_DAYS = 182  # "up to 6 months newer"
FORWARD_COMPAT_DAYS = 21  # "up to 3 weeks older"


def input_spec(sample: np.ndarray, batch_polymorphic: bool) -> jax.ShapeDtypeStruct:
    """Returns the export spec for ``sample``; the leading dim is symbolic ``b`` if asked."""
    if batch_polymorphic:
        if sample.ndim == 0:
            raise ValueError(
                "batch_polymorphic=True needs an input with a leading batch dimension, got a "
                "scalar sample; pass a batched sample or batch_polymorphic=False"
            )
        (b,) = jax_export.symbolic_shape("b")
        return jax.ShapeDtypeStruct((b, *sample.shape[1:]), sample.dtype)
    return jax.ShapeDtypeStruct(sample.shape, sample.dtype)


def _shape_str(shape: tuple[Any, ...]) -> list[Any]:
    return [d if isinstance(d, int) else str(d) for d in shape]


def manifest(exported: jax_export.Exported, when: _dt.datetime | None = None) -> dict[str, Any]:
    """Builds the manifest dict for an ``Exported``.

    Args:
      exported: the exported function.
      when: export time (default: now, UTC).

    Returns:
      JSON-ready dict with versions, shapes/dtypes, platforms and the compatibility dates.
    """
    when = when or _dt.datetime.now(_dt.UTC)
    day = when.date()
    return {
        "format": "jax.export serialized StableHLO (Exported.serialize())",
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "calling_convention_version": exported.calling_convention_version,
        "platforms": list(exported.platforms),
        "inputs": [{"shape": _shape_str(a.shape), "dtype": str(a.dtype)} for a in exported.in_avals],
        "outputs": [{"shape": _shape_str(a.shape), "dtype": str(a.dtype)} for a in exported.out_avals],
        "exported_on": day.isoformat(),
        "loadable_until": (day + _dt.timedelta(days=BACKWARD_COMPAT_DAYS)).isoformat(),
        "oldest_consumer_jaxlib_built_on": (day - _dt.timedelta(days=FORWARD_COMPAT_DAYS)).isoformat(),
        "compatibility_note": (
            "jax.export guarantees loading by a jaxlib built up to 6 months after (and 3 weeks "
            "before) the exporting jaxlib was built; the dates above count from the export "
            "date, which is on or after that build. Export with the newest jaxlib for archival. "
            "https://docs.jax.dev/en/latest/export/export.html#compatibility-guarantees"
        ),
    }


def export_stablehlo(
    fn: Callable[[jax.Array], jax.Array],
    spec: jax.ShapeDtypeStruct,
    path: str | os.PathLike,
    platforms: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Exports ``fn`` to ``path`` (serialized ``Exported``) and ``path + '.json'`` (manifest).

    Both files are written atomically; the artifact is deserialized before it replaces an older
    one.

    Args:
      fn: the inference function.
      spec: its input spec (see :func:`input_spec`).
      path: destination of the serialized artifact.
      platforms: lowering platforms (default: the current backend), e.g. ``("cpu", "cuda")``.

    Returns:
      The manifest dict.
    """
    exported = jax_export.export(jax.jit(fn), platforms=platforms)(spec)
    blob = bytes(exported.serialize())

    def verify(tmp: str) -> None:
        with open(tmp, "rb") as f:
            jax_export.deserialize(bytearray(f.read()))

    write_bytes_atomic(path, blob, verify)
    info = manifest(exported)
    write_bytes_atomic(os.fspath(path) + ".json", json.dumps(info, indent=2).encode())
    return info


def load_stablehlo(path: str | os.PathLike) -> Callable[[jax.Array], jax.Array]:
    """Loads a serialized artifact and returns a jitted callable running it."""
    with open(path, "rb") as f:
        exported = jax_export.deserialize(bytearray(f.read()))
    return jax.jit(exported.call)


@register_format
class StableHLOFormat(ExportFormat):
    """``model.stablehlo`` (+ ``.json`` manifest): the model's own graph via ``jax.export``, float32 only.

    Always the model itself, never a deploy hook's stand-in; run by deserializing it in JAX.
    """

    name = "stablehlo"
    runtime_name = "jax.export"
    extension = ".stablehlo"

    def label(self, job: ExportJob, q: str) -> str:
        return f"{job.name}.stablehlo (stablehlo)"

    def produce(self, job: ExportJob, q: str) -> list[Produced]:
        path = job.path(f"{job.name}.stablehlo")
        info = export_stablehlo(job.fn, input_spec(job.sample, job.batch_polymorphic), path)
        run = self.load(path)
        runtime = f"jax.export {jax.__version__}"
        return [Produced(name="stablehlo", quantize=q, path=path, runtime=runtime, run=run, extra={"manifest": info})]

    def load(self, path: str, num_threads: int = 1) -> Callable[[np.ndarray], np.ndarray]:
        del num_threads
        loaded = load_stablehlo(path)
        return lambda x: np.asarray(loaded(x))
