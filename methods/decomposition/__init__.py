"""Tensor decomposition: factorized NNX layers from trained weights, rank selection, surgery.

``factorize(model, rules)`` replaces matched ``nnx.Linear``/``nnx.Conv`` layers by
:class:`LowRankLinear` (SVD), :class:`Tucker2Conv` (partial Tucker) or :class:`CPConv`
(parafac) initialised from the trained weights, keeping a layer dense where its factorized form
measures slower on the current backend. Importing the package registers the ``decompose``
stage.
"""

from methods.decomposition.decompose import cp_factors, relative_error, svd_factors, tucker2_factors
from methods.decomposition.layers import CPConv, LowRankLinear, Tucker2Conv
from methods.decomposition.rank import (
    dense_cost,
    energy_rank,
    evbmf,
    factorized_cost,
    max_rank,
    select_rank,
)
from methods.decomposition.speed import compare_latency
from methods.decomposition.stage import DecomposeStage, run_decompose
from methods.decomposition.surgery import (
    DecompositionRule,
    FactorizationReport,
    LayerReport,
    ModelBudget,
    factorize,
    factorize_with_report,
)

__all__ = [
    "CPConv",
    "DecomposeStage",
    "DecompositionRule",
    "FactorizationReport",
    "LayerReport",
    "LowRankLinear",
    "ModelBudget",
    "Tucker2Conv",
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
