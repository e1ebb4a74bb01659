"""The training side of one run over several processes (``jax.distributed``, see
:mod:`research.distributed.multihost`): the data-parallel step over every process's devices and
per-process checkpoints. Used by :mod:`research.train.data_parallel` and
:class:`research.train.checkpoint.Checkpointer` when ``jax.process_count() > 1``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def global_data_parallel_step(step_fn: Callable[[Any, Any], Any], batch_size: int) -> Callable[[Any, Any], Any]:
    """``step_fn`` data-parallel over the devices of every process (``jax.devices()``).

    The wrapped step takes and returns this process's own arrays (state and metrics on its first
    local device), so the training loop, evaluation and checkpoints see an ordinary
    single-process state. Inside, the state is replicated over the global mesh and the batch
    (the same full batch in every process) split along its first axis; the compiled step
    all-reduces the gradients. The state the step returned is passed straight back in by the
    loop, so it is not copied again (only a state from elsewhere, e.g. a restored checkpoint, is).

    Args:
      step_fn: ``(state, batch) -> (state, metrics)``.
      batch_size: the global batch size; it must split evenly over ``jax.device_count()`` devices.

    Raises:
      ValueError: ``batch_size`` is not a multiple of the global device count.
    """
    from jax.sharding import Mesh
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = jax.devices()
    if batch_size % len(devices):
        raise ValueError(
            f"data_parallel: batch_size={batch_size} does not split over {len(devices)} devices of "
            f"{jax.process_count()} processes; use a multiple of {len(devices)}"
        )
    mesh = Mesh(np.array(devices), ("data",))
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    local = jax.local_devices()
    compiled = jax.jit(step_fn, in_shardings=(replicated, split), out_shardings=replicated)
    cache: dict[str, Any] = {"view": None, "global": None}

    def to_global(x):
        x = jax.numpy.asarray(x) if not isinstance(x, jax.Array) else x
        shards = [jax.device_put(x, d) for d in local]
        return jax.make_array_from_single_device_arrays(x.shape, replicated, shards)

    def split_batch(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, split, lambda index: x[index])

    def step(state, batch):
        leaves = jax.tree.leaves(state)
        view = cache["view"]
        if view is not None and len(view) == len(leaves) and all(a is b for a, b in zip(view, leaves, strict=True)):
            placed = cache["global"]
        else:
            placed = jax.tree.map(to_global, state)
        out_state, metrics = compiled(placed, jax.tree.map(split_batch, batch))
        own = jax.tree.map(lambda x: x.addressable_data(0), out_state)
        cache["view"], cache["global"] = jax.tree.leaves(own), out_state
        return own, jax.tree.map(lambda x: x.addressable_data(0), metrics)

    return step


class ProcessLocalCheckpoints:
    """Per-process checkpoints for a multi-process run (the ``orbax.CheckpointManager`` calls
    :class:`research.train.checkpoint.Checkpointer` makes).

    Orbax refuses to save host-local arrays once ``jax.process_count() > 1`` ("Cannot serialize
    host local jax.Array ... in multi-host setting") and writes numpy leaves from the primary
    process only, but in a data-parallel run every process holds the whole replicated state and
    its own run directory. So each checkpoint is ``DIRECTORY/<step>/state.npz`` (the leaves in
    tree order), written to a temporary directory and renamed; the newest ``max_to_keep`` stay.
    """

    def __init__(self, directory: str, *, max_to_keep: int = 2):
        self.directory, self.max_to_keep = directory, max_to_keep
        os.makedirs(directory, exist_ok=True)

    def reload(self) -> None:
        """Nothing is cached: the directory is listed on every call."""

    def all_steps(self) -> list[int]:
        return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit() and os.path.isfile(self._file(int(n))))

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _file(self, step: int) -> str:
        return os.path.join(self.directory, str(step), "state.npz")

    def save(self, step: int, args: Any) -> None:
        leaves = [np.asarray(x) for x in jax.tree.leaves(args.item)]
        tmp = os.path.join(self.directory, f".tmp-{step}-{os.getpid()}")
        os.makedirs(tmp, exist_ok=True)
        np.savez(os.path.join(tmp, "state.npz"), *leaves)
        os.replace(tmp, os.path.join(self.directory, str(step)))
        for old in self.all_steps()[: -self.max_to_keep]:
            shutil.rmtree(os.path.join(self.directory, str(old)), ignore_errors=True)

    def wait_until_finished(self) -> None:
        """Saves are synchronous."""

    def restore(self, step: int, args: Any) -> list[Any]:
        expected = jax.tree.leaves(args.item)
        with np.load(self._file(step), allow_pickle=False) as f:
            leaves = [f[f"arr_{i}"] for i in range(len(f.files))]
        if len(leaves) != len(expected):
            raise ValueError(f"checkpoint {self._file(step)} holds {len(leaves)} arrays; the state has {len(expected)}")
        return [jax.numpy.asarray(x, dtype=e.dtype) for x, e in zip(leaves, expected, strict=True)]

    def close(self) -> None:
        """Nothing to release."""
