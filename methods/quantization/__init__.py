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
from methods.quantization.folding import find_conv_bn_pairs
from methods.quantization.folding import fold_batchnorm
from methods.quantization.folding import layer_order
from methods.quantization.folding import trace_calls
from methods.quantization.modules import QUANT_METHODS
from methods.quantization.modules import FakeQuant
from methods.quantization.modules import Identity
from methods.quantization.modules import QuantConv
from methods.quantization.modules import QuantLayer
from methods.quantization.modules import QuantLinear
from methods.quantization.modules import QuantMethod
from methods.quantization.modules import QuantRange
from methods.quantization.modules import QuantSpec
from methods.quantization.modules import find_quantizers
from methods.quantization.modules import list_methods
from methods.quantization.modules import register_method
from methods.quantization.observers import OBSERVERS
from methods.quantization.observers import Observer
from methods.quantization.observers import list_observers
from methods.quantization.observers import make_observer
from methods.quantization.observers import register_observer
from methods.quantization.quantizers import check_bits
from methods.quantization.quantizers import dequantize
from methods.quantization.quantizers import fake_quant
from methods.quantization.quantizers import fake_quant_ste
from methods.quantization.quantizers import lsq_init_step
from methods.quantization.quantizers import lsq_quantize
from methods.quantization.quantizers import pact_quantize
from methods.quantization.quantizers import qrange
from methods.quantization.quantizers import quantize
from methods.quantization.quantizers import round_ste
from methods.quantization.quantizers import scale_zero_point
from methods.quantization.report import format_table
from methods.quantization.report import layer_table
from methods.quantization.report import quant_layers
from methods.quantization.report import quant_params
from methods.quantization.report import quantized_bytes
from methods.quantization.stage import QATStage
from methods.quantization.stage import QuantizeStage
from methods.quantization.surgery import QuantRule
from methods.quantization.surgery import float_layers
from methods.quantization.surgery import quantizable_layers
from methods.quantization.surgery import quantize_model
from methods.quantization.surgery import register_twin

__all__ = [
    "QUANT_METHODS",
    "OBSERVERS",
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
