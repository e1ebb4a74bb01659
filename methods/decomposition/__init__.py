"""Tensor decomposition: factorized NNX layers from trained weights, rank selection, surgery.

``factorize(model, rules)`` replaces matched ``nnx.Linear``/``nnx.Conv`` layers by
:class:`LowRankLinear` (SVD), :class:`Tucker2Conv` (partial Tucker) or :class:`CPConv`
(parafac) initialised from the trained weights, keeping a layer dense where its factorized form
measures slower on the current backend. Its ``stage`` module registers
the ``decompose`` stage (``methods.register_stages()``).
"""

from research.lazy import lazy_exports

# Public name -> defining module, imported on first use (PEP 562): the config classes' modules are
# light (no JAX), and so are the rules' (methods.decomposition.rules); the rest import JAX and Flax.
_EXPORTS = {
    "balance_cp_factors": "methods.decomposition.decompose",
    "cp_factors": "methods.decomposition.decompose",
    "relative_error": "methods.decomposition.decompose",
    "svd_factors": "methods.decomposition.decompose",
    "tucker2_factors": "methods.decomposition.decompose",
    "CPConv": "methods.decomposition.layers",
    "LowRankLinear": "methods.decomposition.layers",
    "Tucker2Conv": "methods.decomposition.layers",
    "dense_cost": "methods.decomposition.rank",
    "energy_rank": "methods.decomposition.rank",
    "evbmf": "methods.decomposition.rank",
    "factorized_cost": "methods.decomposition.rank",
    "max_rank": "methods.decomposition.rank",
    "select_rank": "methods.decomposition.rank",
    "compare_latency": "methods.decomposition.speed",
    "clear_latency_cache": "methods.decomposition.speed",
    "layer_latencies": "methods.decomposition.speed",
    "DecomposeStage": "methods.decomposition.config",
    "run_decompose": "methods.decomposition.stage",
    "DecompositionRule": "methods.decomposition.rules",
    "FactorizationReport": "methods.decomposition.surgery",
    "LayerReport": "methods.decomposition.surgery",
    "ModelBudget": "methods.decomposition.rules",
    "factorize": "methods.decomposition.surgery",
    "factorize_with_report": "methods.decomposition.surgery",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

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
    "clear_latency_cache",
    "layer_latencies",
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
