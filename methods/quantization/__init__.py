"""Quantization: quantizers (STE, LSQ, PACT), fake-quant layers, calibration, BN folding, rules.

Typical post-training quantization::

    model = fold_batchnorm(model)
    qmodel = quantize_model(model, [QuantRule(pattern=".*", bits=8)])
    qmodel = calibrate(qmodel, batches, observer="percentile")
    params = quant_params(qmodel)      # for research.export

QAT: train ``qmodel`` with the ordinary training core (``research.train`` /
``research.stages.finetune``); LSQ steps and PACT clipping values are ``nnx.Param`` leaves.
"""

from methods.quantization import stage as _stage  # noqa: F401  (registers quantize/qat)
from methods.quantization.calibration import calibrate
from methods.quantization.deploy import deployable
from methods.quantization.folding import (
    find_conv_bn_pairs,
    fold_batchnorm,
    layer_order,
    trace_calls,
)
from methods.quantization.modules import (
    FakeQuant,
    Identity,
    QuantConv,
    QuantLayer,
    QuantLinear,
    QuantMethod,
    QuantRange,
    QuantSpec,
    find_quantizers,
    list_methods,
    register_method,
)
from methods.quantization.observers import (
    Observer,
    list_observers,
    make_observer,
    register_observer,
)
from methods.quantization.quantizers import (
    check_bits,
    dequantize,
    fake_quant,
    fake_quant_ste,
    lsq_init_step,
    lsq_quantize,
    pact_quantize,
    qrange,
    quantize,
    round_ste,
    scale_zero_point,
)
from methods.quantization.report import (
    format_table,
    layer_table,
    quant_layers,
    quant_params,
    quantized_bytes,
)
from methods.quantization.stage import QATStage, QuantizeStage
from methods.quantization.surgery import (
    QuantRule,
    float_layers,
    quantizable_layers,
    quantize_model,
    register_twin,
)

__all__ = [
    "FakeQuant",
    "Identity",
    "Observer",
    "QATStage",
    "QuantConv",
    "QuantLayer",
    "QuantLinear",
    "QuantMethod",
    "QuantRange",
    "QuantRule",
    "QuantSpec",
    "QuantizeStage",
    "calibrate",
    "check_bits",
    "dequantize",
    "deployable",
    "fake_quant",
    "fake_quant_ste",
    "find_conv_bn_pairs",
    "float_layers",
    "fold_batchnorm",
    "format_table",
    "layer_order",
    "layer_table",
    "list_methods",
    "list_observers",
    "lsq_init_step",
    "lsq_quantize",
    "make_observer",
    "pact_quantize",
    "qrange",
    "quant_layers",
    "quant_params",
    "quantizable_layers",
    "quantize",
    "quantize_model",
    "quantized_bytes",
    "find_quantizers",
    "register_method",
    "register_observer",
    "register_twin",
    "round_ste",
    "scale_zero_point",
    "trace_calls",
]
