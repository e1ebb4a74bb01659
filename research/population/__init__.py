"""Population execution: many trials of one architecture trained as one jitted, vmapped program.

See :mod:`research.population.keys` (which trials train together), :mod:`.trainer` (the vmapped
program), :mod:`.chooser` (the chunk size, measured) and :mod:`.executor` (the sweep/tune executor).
"""

from research.population.keys import POPULATION_KEYS
from research.population.keys import Population
from research.population.keys import split_populations

__all__ = ["POPULATION_KEYS", "Population", "split_populations"]
