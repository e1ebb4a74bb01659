"""The quantization rule a config constructs: :class:`QuantRule`, and the bit-width check.

Standard library only, so a config file that builds rules loads, and is checked, without JAX.
``methods.quantization.surgery`` uses (and re-exports) it; the method names are checked against
the declared registry :data:`methods.quantization.names.QUANT_METHODS`.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import TYPE_CHECKING

from methods.quantization import names
from research.tree.rules import Rule

if TYPE_CHECKING:
    from methods.quantization.modules import QuantSpec

#: The bit widths a quantizer supports.
MIN_BITS = 2
MAX_BITS = 8


def check_bits(bits: int) -> int:
    """Validates a bit width.

    Args:
      bits: the bit width.

    Returns:
      ``bits`` as an int.

    Raises:
      ValueError: when ``bits`` is not an integer in 2..8.
    """
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise ValueError(f"bits={bits!r} is not an int; pass an int in {MIN_BITS}..{MAX_BITS}")
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(f"bits={bits} is outside {MIN_BITS}..{MAX_BITS}; pass an int in 2..8")
    return int(bits)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantRule(Rule):
    """Quantization of the Linear/Conv layers whose module path matches ``pattern``.

    Attributes:
      pattern: regular expression searched in the layer's module path and its kernel path
        (``"conv1$"`` or ``"conv1/kernel"``; the convention in :mod:`research.tree.rules`).
      bits: kernel bit width (2..8).
      act_bits: input-activation bit width (``None``: same as ``bits``).
      quantize_inputs: quantize the layer's input activations.
      per_channel: one kernel scale per output channel (else one per tensor).
      method: kernel quantizer: ``"ste"`` (min/max range), ``"lsq"`` or ``"pact"``.
      act_method: input quantizer (``None``: same as ``method``).
      symmetric: kernel zero point 0 (``"lsq"``/``"pact"`` are always symmetric).
      act_symmetric: input zero point 0 for ``"ste"`` (affine by default, like TFLite).
      narrow_range: kernel grid without the most negative level (TFLite int8 weights).
      stochastic: stochastic rounding during training.
      keep_float: leave the matched layers in float (listed in the report).
    """

    bits: int = 8
    act_bits: int | None = None
    quantize_inputs: bool = True
    per_channel: bool = True
    method: str = "ste"
    act_method: str | None = None
    symmetric: bool = True
    act_symmetric: bool = False
    narrow_range: bool = False
    stochastic: bool = False
    keep_float: bool = False

    def __post_init__(self):
        super().__post_init__()
        for field in ("bits", "act_bits"):
            value = getattr(self, field)
            if value is None and field == "act_bits":
                continue
            try:
                check_bits(value)
            except ValueError as e:
                raise ValueError(f"QuantRule(pattern={self.pattern!r}).{field}: {e}") from None
        for name in (self.method, self.act_method):
            if name is not None and name not in names.QUANT_METHODS.names():
                raise ValueError(
                    f"quantization method {name!r} (rule {self.pattern!r}) is not registered; "
                    f"pick one of {names.QUANT_METHODS.names()}"
                )

    def weight_spec(self) -> QuantSpec:
        """The kernel's :class:`~methods.quantization.QuantSpec`."""
        from methods.quantization.modules import QuantSpec  # pylint: disable=import-outside-toplevel

        return QuantSpec(
            bits=self.bits,
            method=self.method,
            signed=True,
            symmetric=self.symmetric or self.method != "ste",
            narrow_range=self.narrow_range,
            per_channel=self.per_channel,
            axis=-1,
            stochastic=self.stochastic,
        )

    def input_spec(self) -> QuantSpec | None:
        """The input activations' :class:`~methods.quantization.QuantSpec` (``None`` when inputs stay float)."""
        from methods.quantization.modules import QuantSpec  # pylint: disable=import-outside-toplevel

        if not self.quantize_inputs:
            return None
        method = self.act_method or self.method
        return QuantSpec(
            bits=self.act_bits if self.act_bits is not None else self.bits,
            method=method,
            signed=None,
            symmetric=self.act_symmetric or method != "ste",
            per_channel=False,
            stochastic=self.stochastic,
        )
