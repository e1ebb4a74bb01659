"""AutoML engine: search spaces, samplers (random, Sobol, GP-BO, TPE, BOHB), schedulers
(successive halving, Hyperband, ASHA) and a durable ask/tell :class:`Study`.

Pure JAX + numpy + stdlib; the numerical parts (GP fits, acquisition ascent, TPE scoring)
are jitted and vmapped.
"""

from research.automl.acquisition import (
    expected_improvement,
    get_acquisition,
    list_acquisitions,
    log_expected_improvement,
    probability_of_improvement,
    register_acquisition,
    upper_confidence_bound,
)
from research.automl.gp import GPSampler
from research.automl.plots import plot_history, plot_pareto_front
from research.automl.samplers import (
    QMCSampler,
    RandomSampler,
    Sampler,
    list_samplers,
    make_sampler,
    register_sampler,
)
from research.automl.schedulers import ASHA, Hyperband, Scheduler, SuccessiveHalving
from research.automl.sobol import sobol_points
from research.automl.space import Categorical, Float, Int, Space
from research.automl.storage import InMemoryStorage, SQLiteStorage, Storage
from research.automl.study import Study
from research.automl.tpe import BOHBSampler, TPESampler
from research.automl.trial import Trial, TrialState

__all__ = [
    "ASHA",
    "BOHBSampler",
    "Categorical",
    "Float",
    "GPSampler",
    "Hyperband",
    "InMemoryStorage",
    "Int",
    "QMCSampler",
    "RandomSampler",
    "SQLiteStorage",
    "Sampler",
    "Scheduler",
    "Space",
    "Storage",
    "Study",
    "SuccessiveHalving",
    "TPESampler",
    "Trial",
    "TrialState",
    "expected_improvement",
    "get_acquisition",
    "list_acquisitions",
    "list_samplers",
    "log_expected_improvement",
    "make_sampler",
    "plot_history",
    "plot_pareto_front",
    "probability_of_improvement",
    "register_acquisition",
    "register_sampler",
    "sobol_points",
    "upper_confidence_bound",
]
