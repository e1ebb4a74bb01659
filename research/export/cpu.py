"""The CPU's int8-relevant instruction set, and what it means for onnxruntime's fused int8 kernels.

onnxruntime (MLAS) runs a fused int8 convolution or matrix multiplication on x86-64 as
``uint8 x int8`` (int8 activations are shifted to uint8 first). Without VNNI (or AMX) it sums
each pair of neighbouring products with ``PMADDUBSW`` in **saturating 16-bit** arithmetic:
``2 x 255 x 127 = 64,770`` is clamped to 32,767. A full-range int8 weight file (TensorRT's
symmetric Q/DQ form, TFLite's per-channel kernels) can therefore compute different numbers on an
AVX2 or AVX-512 CPU without VNNI than on one with VNNI, on ARM, or with the Q/DQ nodes executed
as written. VNNI (``VPDPBUSD``), AVX-VNNI and AMX sum in 32 bits; ARM's NEON/dot-product kernels
widen before adding. onnxruntime's session option ``session.x64quantprecision=1`` rewrites the
int8 weights to uint8 (``w + 128``, zero point moved with it: the same products) so its
non-saturating ``uint8 x uint8`` kernels run instead.

:func:`cpu_int8` reads the flags once (``/proc/cpuinfo`` on Linux, ``platform`` elsewhere);
:func:`parse_cpuinfo` is the pure parser.
"""

from __future__ import annotations

import dataclasses
import functools
import platform


@dataclasses.dataclass(frozen=True)
class CpuInt8:
    """The CPU's int8-relevant instruction set.

    Attributes:
      arch: ``"x86-64"``, ``"arm64"`` or the machine name ``platform`` reports.
      isa: the best int8 dot-product instructions found, e.g. ``"AVX512-VNNI"``, ``"AVX-VNNI"``,
        ``"AMX-INT8"``, ``"AVX512 (no VNNI)"``, ``"AVX2 (no VNNI)"``, ``"SSE4.1"``,
        ``"NEON+i8mm"``, ``"NEON+dotprod"``, ``"NEON"``, or ``"unknown"``.
      u8s8_saturates: whether onnxruntime's fused ``uint8 x int8`` kernels sum product pairs in
        saturating 16-bit arithmetic here (x86-64 without VNNI/AMX); None when the flags could
        not be read.
    """

    arch: str
    isa: str
    u8s8_saturates: bool | None

    def __str__(self) -> str:
        return f"{self.arch} {self.isa}"


def parse_cpuinfo(text: str, machine: str) -> CpuInt8:
    """Parses ``/proc/cpuinfo`` text (the first ``flags``/``Features`` line) for ``machine``.

    Args:
      text: contents of ``/proc/cpuinfo`` (may be empty).
      machine: ``platform.machine()``, e.g. ``"x86_64"``, ``"aarch64"``, ``"arm64"``.

    Returns:
      A :class:`CpuInt8`.

    Example:
      >>> str(parse_cpuinfo("flags : fpu sse4_1 avx2 fma", "x86_64"))
      'x86-64 AVX2 (no VNNI)'
      >>> parse_cpuinfo("flags : sse4_1 avx2 avx512bw avx512_vnni", "x86_64").u8s8_saturates
      False
    """
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = set(value.split())
            break
    m = machine.lower()
    if m in ("x86_64", "amd64", "x64", "i686", "i386"):
        arch = "x86-64" if m not in ("i686", "i386") else "x86"
        if not flags:
            return CpuInt8(arch, "unknown", None)
        if "amx_int8" in flags:
            return CpuInt8(arch, "AMX-INT8", False)
        if flags & {"avx512_vnni", "avx512vnni"}:
            return CpuInt8(arch, "AVX512-VNNI", False)
        if "avx_vnni" in flags:
            return CpuInt8(arch, "AVX-VNNI", False)
        if "avx512bw" in flags:
            return CpuInt8(arch, "AVX512 (no VNNI)", True)
        if "avx2" in flags:
            return CpuInt8(arch, "AVX2 (no VNNI)", True)
        if "sse4_1" in flags:  # MLAS's SSE4.1 u8s8 kernel saturates in its Windows build only
            return CpuInt8(arch, "SSE4.1", platform.system() == "Windows")
        return CpuInt8(arch, "no SSE4.1", False)
    if m in ("aarch64", "arm64"):
        if not flags:  # macOS has no /proc/cpuinfo; every Apple silicon core has the dot product
            return CpuInt8("arm64", "NEON+dotprod" if platform.system() == "Darwin" else "unknown", False)
        if "i8mm" in flags:
            return CpuInt8("arm64", "NEON+i8mm", False)
        if "asimddp" in flags:
            return CpuInt8("arm64", "NEON+dotprod", False)
        return CpuInt8("arm64", "NEON", False)
    return CpuInt8(machine or "unknown", "unknown", None)


@functools.cache
def cpu_int8() -> CpuInt8:
    """The int8-relevant instruction set of the CPU this process runs on (read once)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        text = ""
    return parse_cpuinfo(text, platform.machine())
