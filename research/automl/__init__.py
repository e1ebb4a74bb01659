"""AutoML engine: search spaces, samplers (random, Sobol, GP-BO, TPE, BOHB;
multi-objective EHVI and MOTPE), schedulers
(successive halving, Hyperband, ASHA) and a durable ask/tell :class:`Study`.

Pure JAX + numpy + stdlib; the numerical parts (GP fits, acquisition ascent, TPE scoring)
are jitted and vmapped.
"""

from research.automl.acquisition import ACQUISITIONS
from research.automl.acquisition import expected_improvement
from research.automl.acquisition import get_acquisition
from research.automl.acquisition import list_acquisitions
from research.automl.acquisition import log_expected_improvement
from research.automl.acquisition import probability_of_improvement
from research.automl.acquisition import register_acquisition
from research.automl.acquisition import upper_confidence_bound
from research.automl.gp import GPSampler
from research.automl.hypervolume import hypervolume
from research.automl.hypervolume import hypervolume_contributions
from research.automl.hypervolume import pareto_mask
from research.automl.mo import EHVISampler
from research.automl.mo import MOTPESampler
from research.automl.plots import plot_history
from research.automl.plots import plot_pareto_front
from research.automl.samplers import SAMPLERS
from research.automl.samplers import QMCSampler
from research.automl.samplers import RandomSampler
from research.automl.samplers import Sampler
from research.automl.samplers import list_samplers
from research.automl.samplers import make_sampler
from research.automl.samplers import register_sampler
from research.automl.schedulers import ASHA
from research.automl.schedulers import Hyperband
from research.automl.schedulers import Scheduler
from research.automl.schedulers import SuccessiveHalving
from research.automl.sobol import sobol_points
from research.automl.space import Categorical
from research.automl.space import Float
from research.automl.space import Int
from research.automl.space import Space
from research.automl.storage import InMemoryStorage
from research.automl.storage import SQLiteStorage
from research.automl.storage import Storage
from research.automl.study import Study
from research.automl.tpe import BOHBSampler
from research.automl.tpe import TPESampler
from research.automl.trial import Trial
from research.automl.trial import TrialState

__all__ = [
    "ACQUISITIONS",
    "SAMPLERS",
    "ASHA",
    "BOHBSampler",
    "EHVISampler",
    "Categorical",
    "Float",
    "GPSampler",
    "Hyperband",
    "InMemoryStorage",
    "MOTPESampler",
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
    "hypervolume",
    "hypervolume_contributions",
    "list_acquisitions",
    "list_samplers",
    "log_expected_improvement",
    "make_sampler",
    "pareto_mask",
    "plot_history",
    "plot_pareto_front",
    "probability_of_improvement",
    "register_acquisition",
    "register_sampler",
    "sobol_points",
    "upper_confidence_bound",
]
