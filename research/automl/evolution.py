"""Evolutionary sampling: regularized (aging) evolution for one objective, NSGA-II for several.

Model-free and cheap per suggestion (numpy only, no compilation), so it suits long searches
where a GP's cost grows with the number of trials, and NAS spaces full of categorical choices.
It works on the space's unit-cube encoding, like every sampler here:

- **Start-up.** The first ``population`` trials are scrambled Sobol points (as ``qmc``).
- **One objective** (Real et al. 2019). The parents come from the ``population`` most recent
  finished trials (older ones age out, which keeps the search from locking onto one lucky early
  point); each child is the best of ``tournament`` members drawn at random, mutated.
- **Several objectives** (Deb et al. 2002). The parents come from the ``population`` best finished
  trials by Pareto rank, then crowding distance (elitist survival); two parents are picked by
  binary tournaments on the same order, crossed over uniformly, and the child is mutated.
- **Mutation.** Each active coordinate changes with probability ``1 / (active coordinates)``, at
  least one: a float or integer moves by a Gaussian step of ``mutation_scale`` in the unit cube
  (reflected at the edges); a categorical takes another choice at random. A conditional
  parameter that the child activates but its parent did not have is drawn uniformly.

With a multi-fidelity scheduler, the trials it learns from are those at one budget, as for the
other samplers (:func:`research.automl.samplers.observations`).

References:
  Real et al. (2019), Regularized evolution for image classifier architecture search.
  https://arxiv.org/abs/1802.01548
  Deb et al. (2002), A fast and elitist multiobjective genetic algorithm: NSGA-II.
  https://doi.org/10.1109/4235.996017
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from research.automl.samplers import Observations
from research.automl.samplers import Sampler
from research.automl.samplers import nondominated_rank
from research.automl.samplers import observations
from research.automl.samplers import register_sampler
from research.automl.sobol import sobol_points
from research.automl.space import Space
from research.automl.trial import Trial

__all__ = ["EvolutionSampler", "crowding_distance"]


def crowding_distance(losses: np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance of each row of ``losses`` ``(n, m)`` within its own set.

    The extremes of every objective get ``inf``; an interior point gets the sum over objectives
    of the gap between its two neighbours, divided by that objective's range.
    """
    n, m = losses.shape
    out = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for j in range(m):
        order = np.argsort(losses[:, j], kind="stable")
        col = losses[order, j]
        span = col[-1] - col[0]
        out[order[0]] = out[order[-1]] = np.inf
        if span > 0:
            out[order[1:-1]] += (col[2:] - col[:-2]) / span
    return out


def _survival_order(losses: np.ndarray) -> np.ndarray:
    """Indices sorted best first: Pareto rank, then larger crowding distance within the rank."""
    rank = nondominated_rank(losses)
    crowd = np.zeros(len(losses))
    for r in np.unique(rank):
        members = np.flatnonzero(rank == r)
        crowd[members] = crowding_distance(losses[members])
    return np.lexsort((-crowd, rank))


@register_sampler("evolution")
class EvolutionSampler(Sampler):
    """Regularized evolution (one objective) and NSGA-II selection (several objectives).

    Args:
      seed: Seed of every random choice.
      population: Trials in the parent pool, and Sobol start-up trials before evolution begins.
      tournament: Members drawn per single-objective tournament (the best becomes the parent);
        default ``min(5, population)``.
      crossover: Probability that a multi-objective child crosses two parents (else it mutates one).
      mutation_scale: Standard deviation of a float/integer mutation in the unit cube.

    Raises:
      ValueError: ``population < 2``, ``tournament`` outside ``[1, population]``,
        ``crossover`` outside ``[0, 1]`` or ``mutation_scale`` outside ``(0, 1]``.

    Example:
      >>> from research.automl.space import Float, Space
      >>> EvolutionSampler(seed=0, population=4).sample(Space({"x": Float(0, 1)}), [], ["minimize"], 2)[0].keys()
      dict_keys(['x'])
    """

    def __init__(
        self,
        seed: int = 0,
        population: int = 20,
        tournament: int | None = None,
        crossover: float = 0.9,
        mutation_scale: float = 0.15,
    ):
        super().__init__(seed)
        if int(population) != population or population < 2:
            raise ValueError(f"population={population} must be an integer >= 2 (the parent pool and start-up trials)")
        tournament = min(5, int(population)) if tournament is None else tournament
        if int(tournament) != tournament or not 1 <= tournament <= population:
            raise ValueError(f"tournament={tournament} must be an integer in [1, population={population}]")
        if not 0.0 <= crossover <= 1.0:
            raise ValueError(f"crossover={crossover} is a probability; give a value in [0, 1]")
        if not 0.0 < mutation_scale <= 1.0:
            raise ValueError(f"mutation_scale={mutation_scale} is a step in the unit cube; give a value in (0, 1]")
        self.population = int(population)
        self.tournament = int(tournament)
        self.crossover = float(crossover)
        self.mutation_scale = float(mutation_scale)

    def __repr__(self) -> str:
        return (
            f"EvolutionSampler(seed={self.seed}, population={self.population}, tournament={self.tournament}, "
            f"crossover={self.crossover}, mutation_scale={self.mutation_scale})"
        )

    # -- the parent pool
    def pool(self, obs: Observations) -> np.ndarray:
        """Indices (into ``obs``) of the trials parents are drawn from, best first for several objectives."""
        if obs.losses.shape[1] == 1:
            return np.argsort(obs.numbers, kind="stable")[-self.population :]  # the youngest: aging
        return _survival_order(obs.losses)[: self.population]

    def sample_unit(self, space: Space, trials: Sequence[Trial], directions: Sequence[str], n: int) -> np.ndarray:
        obs = observations(space, trials, directions)
        if obs.n < self.population:
            start = len(trials)
            return sobol_points(np.arange(start, start + n), space.dim, scramble=True, seed=self.seed)
        rng = self.rng(trials)
        pool = self.pool(obs)
        seen = {tuple(np.round(space.snap(u), 9)) for u in np.concatenate([obs.u, obs.pending_u])}
        out = []
        for _ in range(n):
            for _attempt in range(20):  # a child equal to a tried point is drawn again
                child = self._child(space, obs, pool, rng)
                key = tuple(np.round(space.snap(child), 9))
                if key not in seen:
                    break
            seen.add(key)
            out.append(child)
        return np.stack(out)

    # -- one child
    def _child(self, space: Space, obs: Observations, pool: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if obs.losses.shape[1] == 1:
            drawn = rng.choice(pool, size=self.tournament, replace=False)
            parent = drawn[np.argmin(obs.losses[drawn, 0])]
            u, active = obs.u[parent].copy(), obs.active[parent]
        else:
            # pool is best first, so a binary tournament keeps the lower position
            a = pool[min(rng.choice(len(pool), size=2, replace=False))]
            u, active = obs.u[a].copy(), obs.active[a]
            if rng.random() < self.crossover:
                b = pool[min(rng.choice(len(pool), size=2, replace=False))]
                take = rng.random(space.dim) < 0.5
                u = np.where(take, obs.u[b], u)
                active = np.where(take, obs.active[b], active)
        return self._mutate(space, u, active, rng)

    def _mutate(self, space: Space, u: np.ndarray, active: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        live = np.flatnonzero(active) if active.any() else np.arange(space.dim)
        chosen = live[rng.random(len(live)) < 1.0 / len(live)]
        if chosen.size == 0:
            chosen = rng.choice(live, size=1)
        for j in chosen:
            if space.is_categorical[j]:
                k = int(space.n_choices[j])
                current = min(int(u[j] * k), k - 1)
                new = rng.integers(k - 1) if k > 1 else 0
                new = new + (new >= current) if k > 1 else 0
                u[j] = (new + 0.5) / k
            else:
                x = u[j] + rng.normal(0.0, self.mutation_scale)
                x = abs(x) % 2.0  # reflect into [0, 1]
                u[j] = 2.0 - x if x > 1.0 else x
        # parameters the child activates that its parent did not have start anywhere
        newly = space.active_mask(space.snap(u)) & ~active.astype(bool)
        u[newly] = rng.random(int(newly.sum()))
        return u
