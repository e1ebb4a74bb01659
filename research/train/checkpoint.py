"""Orbax checkpoints of a :class:`TrainState`, with typed PRNG keys handled.

Saving is synchronous and atomic (orbax writes to a temporary directory and renames it), so a
run killed mid-save keeps its previous checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_saveable(tree: Any) -> Any:
    """Replaces typed PRNG key arrays by their raw ``uint32`` data (orbax cannot store keys)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def from_saveable(tree: Any, template: Any) -> Any:
    """Inverse of :func:`to_saveable`, using ``template`` to know which leaves were keys."""
    return jax.tree.map(
        lambda x, t: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x,
        tree,
        template,
    )


class Checkpointer:
    """Keeps the last ``max_to_keep`` checkpoints of a pytree under ``directory``.

    Example:
      >>> ckpt = Checkpointer("/tmp/run/checkpoints")   # doctest: +SKIP
      >>> ckpt.save(100, state); state = ckpt.restore(template=state)   # doctest: +SKIP
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
        self.directory = os.path.abspath(os.fspath(directory))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
            ),
        )

    def latest_step(self) -> int | None:
        """The newest saved step, or ``None``."""
        self._manager.reload()
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, tree: Any) -> None:
        """Saves ``tree`` as checkpoint ``step`` (overwrites nothing that exists)."""
        self._manager.save(int(step), args=ocp.args.StandardSave(to_saveable(tree)))
        self._manager.wait_until_finished()

    def restore(self, template: Any, step: int | None = None) -> Any:
        """Restores checkpoint ``step`` (default: latest) into the structure of ``template``.

        Raises:
          FileNotFoundError: no checkpoint exists in the directory.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        saveable = to_saveable(template)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype) if hasattr(x, "dtype") else x, saveable
        )
        restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        restored = jax.tree.unflatten(jax.tree.structure(saveable), jax.tree.leaves(restored))
        return from_saveable(restored, template)

    def close(self) -> None:
        self._manager.close()
