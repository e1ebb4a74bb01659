"""Control for ofa_small: what the 1-D family's global-max head buys at cnn1d's shape and budget.

``cnn1d`` (Greydanus & Kobak's MNIST-1D baseline) reads its last conv layer's features flattened.
The ``conv1d_family`` member closest to it (24 channels per stage, one conv per stage, kernels
5/3/3) is trained with either head, from scratch, with the budget every model of
``experiments.ofa_small`` gets (1,500 steps, batch 128, Adam at a constant 3e-3, same seed), so a
found model's margin over ``cnn1d`` can be split into what the head buys and what the rest of the
search adds.

Run from the repository root:
  python -m experiments.ofa_small.head_control --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from experiments.ofa_small.experiment import OFAConfig
from experiments.ofa_small.experiment import _scratch
from research import data
from research import metrics

#: The family member of cnn1d's shape (cnn1d: 25 channels, kernels 5/3/3, one conv per stage).
CNN1D_SHAPE = dict(
    width_0=24, width_1=24, width_2=24, depth_0=1, depth_1=1, depth_2=1, kernel_0=5, kernel_1=3, kernel_2=3
)
#: ofa_small's from-scratch budget (``OFAConfig``'s defaults), which every control model gets.
BUDGET = OFAConfig()
MODELS = {
    "zoo cnn1d": ("cnn1d", {}),
    "w24-24-24 d111 k533 (flatten)": ("conv1d_family", {**CNN1D_SHAPE, "head": "flatten"}),
    "w24-24-24 d111 k533 max": ("conv1d_family", {**CNN1D_SHAPE, "head": "max"}),
}


def run_controls(
    seeds: tuple[int, ...] = (0, 1, 2),
    *,
    steps: int = BUDGET.scratch_steps,
    batch_size: int = BUDGET.batch_size,
    learning_rate: float = BUDGET.learning_rate,
    models: tuple[str, ...] | None = None,
) -> list[dict[str, Any]]:
    """The models of :data:`MODELS` (``models``: some of its labels; default all) trained from scratch
    per seed: FLOPs, validation and test accuracy.

    Raises:
      KeyError: a label in ``models`` that :data:`MODELS` lacks (the error lists the labels).
    """
    labels = tuple(MODELS) if models is None else tuple(models)
    unknown = [m for m in labels if m not in MODELS]
    if unknown:
        raise KeyError(f"no control model(s) {unknown}; the labels are {list(MODELS)}")
    budget = dataclasses.replace(BUDGET, scratch_steps=steps, batch_size=batch_size, learning_rate=learning_rate)
    rows = []
    for seed in seeds:
        ds = data.load_dataset("mnist1d", seed=seed)
        sample = jnp.zeros((1, *ds.input_shape), jnp.float32)
        for label in labels:
            name, options = MODELS[label]
            model, runs = _scratch(name, options, ds, budget, seed, repeats=1)
            rows.append(
                {
                    "seed": seed, "model": label, "flops": metrics.flops(model, sample),
                    "val": runs["scratch_val"], "test": runs["scratch_test"],
                }
            )  # fmt: skip
    return rows


def format_controls(rows: list[dict[str, Any]]) -> str:
    """A table of the rows and, per model, the mean test accuracy over seeds."""
    lines = [f"{'seed':>4}  {'model':<32}{'FLOPs':>8}{'val':>8}{'test':>8}", "-" * 60]
    lines += [f"{r['seed']:>4}  {r['model']:<32}{r['flops']:>8,.0f}{r['val']:>8.3f}{r['test']:>8.3f}" for r in rows]
    for label in dict.fromkeys(r["model"] for r in rows):
        tests = [r["test"] for r in rows if r["model"] == label]
        lines.append(f"mean test {label}: {np.mean(tests):.3f} over {len(tests)} seed(s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--steps",
        type=int,
        default=BUDGET.scratch_steps,
        help="training steps of every model (ofa_small's scratch budget)",
    )
    a = p.parse_args(argv)
    rows = run_controls(tuple(a.seeds), steps=a.steps)
    print(format_controls(rows))
    return rows


if __name__ == "__main__":
    main()
