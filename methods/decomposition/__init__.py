"""Tensor decomposition: factorized NNX layers from trained weights, rank selection, surgery.

``factorize(model, rules)`` replaces matched ``nnx.Linear``/``nnx.Conv`` layers by
:class:`LowRankLinear` (SVD), :class:`Tucker2Conv` (partial Tucker) or :class:`CPConv`
(parafac) initialised from the trained weights, keeping a layer dense where its factorized form
measures slower on the current backend. Importing the package registers the ``decompose``
stage.
"""

from methods.decomposition.decompose import balance_cp_factors
from methods.decomposition.decompose import cp_factors
from methods.decomposition.decompose import relative_error
from methods.decomposition.decompose import svd_factors
from methods.decomposition.decompose import tucker2_factors
from methods.decomposition.layers import CPConv
from methods.decomposition.layers import LowRankLinear
from methods.decomposition.layers import Tucker2Conv
from methods.decomposition.rank import dense_cost
from methods.decomposition.rank import energy_rank
from methods.decomposition.rank import evbmf
from methods.decomposition.rank import factorized_cost
from methods.decomposition.rank import max_rank
from methods.decomposition.rank import select_rank
from methods.decomposition.speed import compare_latency
from methods.decomposition.stage import DecomposeStage
from methods.decomposition.stage import run_decompose
from methods.decomposition.surgery import DecompositionRule
from methods.decomposition.surgery import FactorizationReport
from methods.decomposition.surgery import LayerReport
from methods.decomposition.surgery import ModelBudget
from methods.decomposition.surgery import factorize
from methods.decomposition.surgery import factorize_with_report

__all__ = [
    "CPConv",
    "DecomposeStage",
    "DecompositionRule",
    "FactorizationReport",
    "LayerReport",
    "LowRankLinear",
    "ModelBudget",
    "Tucker2Conv",
    "balance_cp_factors",
    "compare_latency",
    "cp_factors",
    "dense_cost",
    "energy_rank",
    "evbmf",
    "factorize",
    "factorize_with_report",
    "factorized_cost",
    "max_rank",
    "relative_error",
    "run_decompose",
    "select_rank",
    "svd_factors",
    "tucker2_factors",
]
