"""Running slimjax beyond one process: sweeps and tuning on Ray, one run across hosts.

- :mod:`research.distributed.ray_executor`: ``executor="ray"`` for :func:`research.sweep.sweep` and
  :func:`research.tune.tune` (``slimjax sweep|tune --executor ray``): one Ray task per trial with
  declared CPU/GPU resources; the driver alone owns the study and the sweep files.
- :mod:`research.distributed.multihost`: one run trained data-parallel over several processes
  (hosts) through ``jax.distributed``.

Nothing here imports Ray at import time: Ray is the optional extra ``slimjax[ray]``, imported when
the Ray executor is chosen.
"""
