"""Quantization: quantizers (STE, LSQ, PACT), fake-quant layers, calibration, BN folding, rules.

Typical post-training quantization::

    model = fold_batchnorm(model)
    qmodel = quantize_model(model, [QuantRule(pattern=".*", bits=8)])
    qmodel = calibrate(qmodel, batches, observer="percentile")
    params = quant_params(qmodel)      # for research.export

Before a full-integer export (TFLite int8) of a model with LayerNorms, ``int8_norm_epsilon`` (raise
each norm's epsilon to a few steps of its variance's int8 grid) followed by a short fine-tuning and
``activation_calibration="percentile"`` at export keeps quiet tokens' normalisation accurate;
fine-tuning with ``kurtosis_regularizer(0.01)`` (or the ``kurtosis`` stage) makes heavy-tailed
activations easier to round on one int8 grid; ``quant_noise_regularizer`` trains against simulated
int8 grid noise.

QAT: train ``qmodel`` with the ordinary training core (``research.train`` /
``research.train.finetune``); LSQ steps and PACT clipping values are ``nnx.Param`` leaves.
"""

from research.lazy import lazy_exports

# Public name -> defining module, imported on first use (PEP 562): the config classes' modules are
# light (no JAX), and so is the rule's (methods.quantization.rules); the rest import JAX and Flax.
_EXPORTS = {
    "calibrate": "methods.quantization.calibration",
    "deployable": "methods.quantization.deploy",
    "find_conv_bn_pairs": "methods.quantization.folding",
    "fold_batchnorm": "methods.quantization.folding",
    "layer_order": "methods.quantization.folding",
    "trace_calls": "methods.quantization.folding",
    "FakeQuant": "methods.quantization.modules",
    "Identity": "methods.quantization.modules",
    "QuantConv": "methods.quantization.modules",
    "QuantLayer": "methods.quantization.modules",
    "QuantLinear": "methods.quantization.modules",
    "QuantMethod": "methods.quantization.modules",
    "QuantRange": "methods.quantization.modules",
    "QuantSpec": "methods.quantization.modules",
    "find_quantizers": "methods.quantization.modules",
    "list_methods": "methods.quantization.modules",
    "register_method": "methods.quantization.modules",
    "Observer": "methods.quantization.observers",
    "list_observers": "methods.quantization.observers",
    "make_observer": "methods.quantization.observers",
    "register_observer": "methods.quantization.observers",
    "check_bits": "methods.quantization.rules",
    "dequantize": "methods.quantization.quantizers",
    "fake_quant": "methods.quantization.quantizers",
    "fake_quant_ste": "methods.quantization.quantizers",
    "lsq_init_step": "methods.quantization.quantizers",
    "lsq_quantize": "methods.quantization.quantizers",
    "pact_quantize": "methods.quantization.quantizers",
    "qrange": "methods.quantization.quantizers",
    "quantize": "methods.quantization.quantizers",
    "round_ste": "methods.quantization.quantizers",
    "scale_zero_point": "methods.quantization.quantizers",
    "format_table": "methods.quantization.report",
    "layer_table": "methods.quantization.report",
    "quant_layers": "methods.quantization.report",
    "quant_params": "methods.quantization.report",
    "quantized_bytes": "methods.quantization.report",
    "KurtosisStage": "methods.quantization.config",
    "NormEpsilonStage": "methods.quantization.config",
    "QATStage": "methods.quantization.config",
    "activation_kurtosis": "methods.quantization.kurtosis",
    "activations": "methods.quantization.kurtosis",
    "kurtosis": "methods.quantization.kurtosis",
    "kurtosis_penalty": "methods.quantization.kurtosis",
    "kurtosis_regularizer": "methods.quantization.kurtosis",
    "grid_noise": "methods.quantization.noise",
    "int8_norm_epsilon": "methods.quantization.norm_epsilon",
    "norm_statistics": "methods.quantization.norm_epsilon",
    "noisy_forward": "methods.quantization.noise",
    "quant_noise_regularizer": "methods.quantization.noise",
    "QuantizeStage": "methods.quantization.config",
    "QuantRule": "methods.quantization.rules",
    "float_layers": "methods.quantization.surgery",
    "quantizable_layers": "methods.quantization.surgery",
    "quantize_model": "methods.quantization.surgery",
    "register_twin": "methods.quantization.surgery",
    "QUANT_METHODS": "methods.quantization.modules",
    "OBSERVERS": "methods.quantization.observers",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "OBSERVERS",
    "QUANT_METHODS",
    "FakeQuant",
    "Identity",
    "KurtosisStage",
    "NormEpsilonStage",
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
    "activation_kurtosis",
    "activations",
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
    "grid_noise",
    "int8_norm_epsilon",
    "layer_order",
    "layer_table",
    "list_methods",
    "list_observers",
    "lsq_init_step",
    "kurtosis",
    "kurtosis_penalty",
    "kurtosis_regularizer",
    "lsq_quantize",
    "make_observer",
    "noisy_forward",
    "norm_statistics",
    "pact_quantize",
    "qrange",
    "quant_layers",
    "quant_noise_regularizer",
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
