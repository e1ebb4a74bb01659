"""Model zoo (Flax NNX) and model surgery."""

from research.nn import families as _families  # noqa: F401  (registers the searchable families)
from research.nn import sequence as _sequence  # noqa: F401  (registers the attention models)
from research.nn import zoo as _zoo  # noqa: F401  (registers the zoo models)
from research.nn.families import FAMILIES
from research.nn.families import Family
from research.nn.families import family_masks
from research.nn.families import get_family
from research.nn.families import list_families
from research.nn.families import register_family
from research.nn.registry import MODELS
from research.nn.registry import build_model
from research.nn.registry import list_models
from research.nn.registry import model_kwargs
from research.nn.registry import register_model
from research.nn.sequence import AttentionGRU
from research.nn.sequence import EncoderBlock
from research.nn.sequence import ViT
from research.nn.surgery import copy_model
from research.nn.surgery import find_modules
from research.nn.surgery import get_module
from research.nn.surgery import iter_modules
from research.nn.surgery import param_count
from research.nn.surgery import params_per_module
from research.nn.surgery import replace_by_type
from research.nn.surgery import replace_module
from research.nn.surgery import replace_modules
from research.nn.surgery import summary
from research.nn.zoo import CNN1D
from research.nn.zoo import MLP
from research.nn.zoo import TINY_OPTIONS
from research.nn.zoo import BasicBlock
from research.nn.zoo import InvertedResidual
from research.nn.zoo import LeNet5
from research.nn.zoo import MobileNetV2Small
from research.nn.zoo import ResNetCIFAR
from research.nn.zoo import VGGSmall

__all__ = [
    "FAMILIES",
    "MODELS",
    "Family",
    "family_masks",
    "get_family",
    "list_families",
    "register_family",
    "AttentionGRU",
    "BasicBlock",
    "CNN1D",
    "EncoderBlock",
    "InvertedResidual",
    "LeNet5",
    "MLP",
    "MobileNetV2Small",
    "ResNetCIFAR",
    "TINY_OPTIONS",
    "VGGSmall",
    "ViT",
    "build_model",
    "copy_model",
    "find_modules",
    "get_module",
    "iter_modules",
    "list_models",
    "model_kwargs",
    "param_count",
    "params_per_module",
    "register_model",
    "replace_by_type",
    "replace_module",
    "replace_modules",
    "summary",
]
