"""Which trials can train together: the keys that may differ inside one population.

A population trains its trials' leading ``train`` stage as one vmapped program, so everything that
shapes that program (model, data shapes, batch size, optimizer kind, schedule, step count) must be
equal across its trials. Values that live in the program's *state* instead of its code may differ:
they are listed in :data:`POPULATION_KEYS` (``stages.0.`` stands for the leading train stage).
Stages after the first run per trial, so their fields never split a population.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from research import config as config_lib

TRAIN_KIND = "train"

POPULATION_KEYS: dict[str, str] = {
    "seed": "model initialisation, data split and batch order are per-trial arrays",
    "name": "a label only",
    "latency_batch_size": "used only when measuring each trial's run",
    "stages.0.learning_rate": "a value in the optimizer state (optax.inject_hyperparams)",
    "stages.0.weight_decay": "a value in the optimizer state with optimizer='adamw' (inject_hyperparams)",
    "stages.0.checkpoint_every": "logging cadence, not the math",
    "stages.0.eval_every": "logging cadence, not the math",
    "stages.0.log_every": "logging cadence, not the math",
    "stages.0.data_parallel": "placement only (a population shards over its trials instead)",
}


@dataclasses.dataclass(frozen=True)
class Population:
    """Trials that train together.

    Attributes:
      indices: positions of the trials in the list given to :func:`split_populations`.
      reason: why these trials are not in the first population (empty for the first one), or why
        they run one after another (``solo``).
      solo: the trials cannot train in a population (e.g. their first stage is not ``train``).
    """

    indices: tuple[int, ...]
    reason: str = ""
    solo: bool = False


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = obj
    return out


def signature(config: config_lib.Config) -> dict[str, Any]:
    """The dotted values of ``config`` that must be equal inside a population.

    Raises:
      ValueError: the config's first stage is not a ``train`` stage (it cannot run in a population).
    """
    if not config.stages or getattr(config.stages[0], "kind", None) != TRAIN_KIND:
        first = getattr(config.stages[0], "kind", None) if config.stages else None
        raise ValueError(f"its first stage is {first!r}; the population executor trains a leading 'train' stage")
    stage = config_lib.to_dict(config.stages[0])
    if stage.get("teacher") is not None:
        raise ValueError("its leading train stage has a teacher; the population executor trains without one")
    flat = _flatten({"model": config_lib.to_dict(config.model), "data": config_lib.to_dict(config.data)})
    flat.update(_flatten({"stages": {"0": stage}}))
    if stage.get("optimizer") != "adamw":
        flat.pop("stages.0.weight_decay", None)  # compared below only when it is a constant of the program
        flat["stages.0.weight_decay (optimizer != adamw)"] = stage.get("weight_decay")
    for key in POPULATION_KEYS:
        flat.pop(key, None)
    return flat


def split_populations(configs: Sequence[config_lib.Config]) -> list[Population]:
    """Groups trial configs into populations (first-seen order), each with the reason it is separate.

    Returns:
      The populations; trials that cannot train in any population come as ``solo`` entries with
      their reason.

    Example:
      Two learning rates and two batch sizes give two populations; the second's reason names
      ``stages.0.batch_size``.
    """
    groups: dict[str, list[int]] = {}
    sigs: dict[str, dict[str, Any]] = {}
    solo: list[Population] = []
    for i, cfg in enumerate(configs):
        try:
            sig = signature(cfg)
        except ValueError as e:
            solo.append(Population((i,), reason=f"trial {i}: {e}", solo=True))
            continue
        key = json.dumps(sig, sort_keys=True, default=str)
        groups.setdefault(key, []).append(i)
        sigs.setdefault(key, sig)
    out: list[Population] = []
    first = None
    for key, indices in groups.items():
        sig = sigs[key]
        if first is None:
            first = sig
            out.append(Population(tuple(indices)))
            continue
        diff = sorted(k for k in set(first) | set(sig) if first.get(k) != sig.get(k))
        shown = ", ".join(f"{k}={sig.get(k)!r} (first population: {first.get(k)!r})" for k in diff[:4])
        out.append(
            Population(
                tuple(indices),
                reason=f"{shown}: not a key that may differ inside a population ({', '.join(POPULATION_KEYS)})",
            )
        )
    return out + solo
