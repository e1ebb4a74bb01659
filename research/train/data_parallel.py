"""One run trained data-parallel over the local devices: the batch axis sharded, the state replicated.

``TrainStage(data_parallel=True)`` (``--set stages.train.data_parallel=True``) wraps the run's train
step with :func:`data_parallel_step`: every step's batch is split over a one-axis ``Mesh`` of the
local devices and the train state is replicated, so XLA sums the gradients across devices. The
math is the single-device step's (the same batches, the same mean loss); only the order of the
floating-point sums differs.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


def data_parallel_step(
    step_fn: Callable[[Any, Any], Any], batch_size: int, devices: Sequence[jax.Device] | None = None
) -> Callable[[Any, Any], Any]:
    """``step_fn`` with its batch sharded over ``devices`` (default: every local device).

    Args:
      step_fn: ``(state, batch) -> (state, metrics)``, jitted (e.g. :func:`research.train.make_train_step`).
      batch_size: the run's batch size; it must split evenly over the devices.
      devices: the devices (default ``jax.local_devices()``; in a multi-process run started with
        :func:`research.distributed.multihost.initialize`, every process's devices, see
        :func:`research.train.multiprocess.global_data_parallel_step`).

    Returns:
      The wrapped step (the same function when there is one device).

    Raises:
      ValueError: ``batch_size`` is not a multiple of the device count.
    """
    from jax.sharding import Mesh
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if devices is None and jax.process_count() > 1:  # one run over several processes (jax.distributed)
        from research.train.multiprocess import global_data_parallel_step

        return global_data_parallel_step(step_fn, batch_size)
    devices = list(devices) if devices else jax.local_devices()
    if len(devices) == 1:
        return step_fn
    if batch_size % len(devices):
        raise ValueError(
            f"data_parallel: batch_size={batch_size} does not split over {len(devices)} devices; "
            f"use a multiple of {len(devices)} (e.g. {batch_size + len(devices) - batch_size % len(devices)})"
        )
    mesh = Mesh(np.array(devices), ("data",))
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def step(state, batch):
        # A no-op for arrays already placed; places a state restored from a checkpoint.
        return step_fn(jax.device_put(state, replicated), jax.device_put(batch, split))

    return step
