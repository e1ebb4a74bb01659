"""K trials' leading ``train`` stage as one jitted, vmapped program.

Parameters, optimizer state and RNG of the K trials are stacked on a leading axis. The train step
is the one every run uses (:func:`research.train.make_train_step`, not jitted), vmapped over the
trials and scanned over ``block_steps`` steps per call (one step per call on a CPU when the step
has convolutions, which XLA's CPU backend runs slowly inside a loop body: see
:func:`research.train.loops_slow_down_convolutions`). Per-trial learning rate and weight decay
are values in the stacked optimizer state (``optax.inject_hyperparams`` in
:func:`research.train.make_optimizer`), so one compiled program serves every trial. Each trial's
batches are exactly those of its sequential run: the indices :class:`research.data.BatchSampler`
draws from the trial's seed, gathered on the device from the trial's own data split.

The population axis is sharded over ``devices`` (``Mesh`` / ``NamedSharding``) when more than one
is given; the data are replicated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research import config as config_lib
from research.data import BatchSampler
from research.train import create_train_state
from research.train import has_convolution
from research.train import loops_slow_down_convolutions
from research.train import make_train_step
from research.train import state_to_model

Timer = Callable[[int, Callable[[], Any]], float]


@dataclasses.dataclass
class Member:
    """One trial of a :class:`PopulationTrainer`: its initial model, optimizer (with any wrapper),
    seed (initial train state and batch order) and training split; ``batch_loss`` (a
    :class:`research.train.BatchLoss`, or ``None``) adds the trial's constants and its rows of
    per-example tables (a cached teacher's logits) to each of its batches, for the trainer's loss
    transforms to read."""

    model: nnx.Module
    tx: Any
    seed: int
    x_train: np.ndarray
    y_train: np.ndarray
    batch_loss: Any = None


@dataclasses.dataclass
class TrialResult:
    """One trial trained in a population: its model, per-step training metrics (of steps
    ``start + 1`` on: every scalar the train step returns, ``loss`` among them; :attr:`losses`) and
    final train state (the tree a sequential run checkpoints at its last step); ``start`` is the
    step it resumed from (a checkpoint of a killed sweep), 0 when it trained from the start;
    ``val_rows`` the validation rows of its ``eval_every`` steps before the last
    (``{"step", "split": "val", "loss", "accuracy", "count"}``, as :func:`research.train.fit` writes)."""

    model: nnx.Module
    metrics: dict[str, np.ndarray]
    seconds: float
    state: Any = None
    start: int = 0
    val_rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def losses(self) -> np.ndarray:
        """The per-step training losses (``metrics["loss"]``)."""
        return self.metrics["loss"]


TIMED_REPEATS = 3
"""Timed calls of :func:`time_call` after its warm-up call."""


def time_call(
    k: int,
    fn: Callable[[], Any],
    repeats: int = TIMED_REPEATS,
    *,
    afford: Callable[[float], bool] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Seconds of one call of ``fn`` (compiled already): the fastest of ``repeats`` after a warm-up.

    The minimum, not the median: other processes on the machine only ever add time.

    Args:
      afford: ``seconds -> whether another call that long may still be paid`` (a measuring
        budget, :meth:`research.population.chooser.Budget.allows`), asked before each timed call
        after the first with the last call's seconds. When it says no, the timing stops at the
        fastest call so far. The first timed call is always made: the warm-up is no figure (an
        XLA:CPU LeNet-5 chunk of 8 took 14x its steady step on its first call). A population
        program far slower than predicted (a vmapped convolution on a CPU: ~1 s per step where
        the sequential step took 25 ms) then costs its compile and two calls, not four.
      clock: seconds now (tests give a fake one).
    """
    del k
    t0 = clock()
    jax.block_until_ready(fn())
    last = clock() - t0
    times = []
    for _ in range(repeats):
        if afford is not None and times and not afford(last):
            break
        t0 = clock()
        jax.block_until_ready(fn())
        last = clock() - t0
        times.append(last)
    return float(min(times)) if times else float(last)  # (repeats=0: the warm-up's time)


class SeedBundles:
    """The untrained bundle of each trial of ``configs``, built once per seed, when first asked:
    the trials of one seed share its model and data set, never modifying them (a
    :class:`PopulationTrainer`'s, and trials that train as the sequential executor trains them)."""

    def __init__(self, configs: Sequence[config_lib.Config]):
        self.configs = list(configs)
        self._built: dict[int, Any] = {}

    def built(self, seed: int):
        """:func:`research.run.build_bundle` of the first config with ``seed`` (built once)."""
        from research.run import build_bundle  # pylint: disable=import-outside-toplevel

        if seed not in self._built:
            self._built[seed] = build_bundle(next(c for c in self.configs if c.seed == seed))
        return self._built[seed]

    def bundle(self, index: int):
        """A fresh :class:`research.stages.Bundle` of trial ``index`` over its seed's model and data set."""
        from research.stages import Bundle  # pylint: disable=import-outside-toplevel

        b = self.built(self.configs[index].seed)
        return Bundle(model=b.model, dataset=b.dataset, seed=b.seed, recipe=b.recipe)


def memory_limit_bytes(device: jax.Device | None = None) -> int:
    """Bytes a chunk may use on ``device``: its allocator limit, or half the host memory (CPU)."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except (NotImplementedError, RuntimeError):
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2)


class PopulationTrainer:
    """Trains the leading ``train`` stage of trial configs that share one population signature.

    Args:
      configs: the trials (see :func:`research.population.split_populations`; all equal outside
        :data:`research.population.POPULATION_KEYS`).
      block_steps: steps per compiled call (a ``lax.scan``); fewer if the stage has fewer steps,
        and 1 (no loop) where :func:`research.train.loops_slow_down_convolutions` on the devices and
        the step has convolutions.
      devices: shard the population axis over these devices (default: the first local device).
      cache: compiled programs and their bytes (and whether the step has convolutions), shared
        by trainers of the same population signature (a tune study's batches compile once).

    Each trial's ``checkpoint_every`` (of its stage) says where :meth:`train` stops a block to hand
    the trial's state to its ``on_checkpoint`` callback, as a sequential run checkpoints; the block
    length is cut down to a divisor of the checkpoint cadence when that costs at most half of it.

    Raises:
      ValueError: no configs, or trials that differ outside the population keys.
    """

    def __init__(
        self,
        configs: Sequence[config_lib.Config],
        *,
        block_steps: int = 50,
        devices: Sequence[jax.Device] | None = None,
        cache: dict | None = None,
    ):
        from research.population.keys import signature
        from research.population.keys import split_populations
        from research.stages import train_kwargs
        from research.train import make_optimizer

        if not configs:
            raise ValueError("no trial configs; give at least one")
        groups = split_populations(configs)
        if len(groups) != 1 or groups[0].solo:
            raise ValueError(f"the trials do not form one population: {[g.reason for g in groups if g.reason]}")
        self.configs = list(configs)
        self.stage = configs[0].stages[0]
        # One data split and one initial model per distinct seed (trials that differ only in
        # hyperparameters share them).
        seeds = sorted({c.seed for c in configs})
        self._seed_bundles = SeedBundles(configs)
        self._bundles = {s: self._seed_bundles.built(s) for s in seeds}
        self.dataset = self._bundles[seeds[0]].dataset
        members = [
            Member(
                model=self._bundles[c.seed].model,
                tx=make_optimizer(**_optimizer_kwargs(train_kwargs(c.stages[0]))),
                seed=c.seed,
                x_train=self._bundles[c.seed].dataset.x_train,
                y_train=self._bundles[c.seed].dataset.y_train,
            )
            for c in configs
        ]
        key = json.dumps(signature(configs[0]), sort_keys=True, default=str)
        every = [c.stages[0].checkpoint_every for c in configs]
        # validation rows during training, as fit writes them (only with a validation split)
        evals = [c.stages[0].eval_every if len(self._bundles[c.seed].dataset.x_val) else 0 for c in configs]
        self._setup(
            members, self.stage.steps, self.stage.batch_size, key, block_steps, devices, cache, every=every,
            evals=evals, traced=lambda defs: self._sequential_step(defs)[0],
        )  # fmt: skip

    @classmethod
    def for_members(
        cls,
        members: Sequence[Member],
        *,
        steps: int,
        batch_size: int,
        program_key: Any,
        block_steps: int = 50,
        devices: Sequence[jax.Device] | None = None,
        cache: dict | None = None,
        loss_fn=None,
        checkpoint_every: Sequence[int] | int = 0,
    ) -> PopulationTrainer:
        """A trainer of given models and optimizers (a later stage's fine-tuning of K trials).

        ``program_key`` (hashable) names everything the members' train step bakes in (optimizer
        settings but the values in its state, wrapper structure, model graph, data shapes, the
        loss's :attr:`research.train.BatchLoss.key`); members of one trainer must agree on it.
        Their optimizers' states hold what differs (learning rate, weight decay, a pruning
        wrapper's targets), and their batch losses' constants and tables (KD temperatures,
        weights, teacher logits). ``checkpoint_every``: one cadence for all, or one per member
        (0: only the final state).

        Raises:
          ValueError: no members, or some with a batch loss and some without.
        """
        if not members:
            raise ValueError("no members; give at least one")
        self = cls.__new__(cls)
        self.configs, self.stage, self._bundles = [], None, {}
        self.dataset = None
        every = [checkpoint_every] * len(members) if isinstance(checkpoint_every, int) else list(checkpoint_every)
        self._setup(list(members), steps, batch_size, program_key, block_steps, devices, cache, loss_fn, every=every)
        return self

    def _setup(
        self,
        members,
        steps,
        batch_size,
        key,
        block_steps,
        devices,
        cache,
        loss_fn=None,
        every=(),
        evals=(),
        traced=None,
    ):
        """``traced``: ``defs -> the step`` the convolution check traces (default: the population's
        step); the sequential executor's jitted step for a first stage, whose first call by the
        sequential path (or :meth:`sequential_step_seconds`) then reuses the trace."""
        self.members = members
        self.steps = steps
        self.checkpoint_every = [int(c) for c in every] if every else [0] * len(members)
        self.eval_every = [int(c) for c in evals] if evals else [0] * len(members)
        if len(self.checkpoint_every) != len(members):
            raise ValueError(f"{len(self.checkpoint_every)} checkpoint cadences for {len(members)} members")
        self.devices = list(devices) if devices else [jax.local_devices()[0]]
        seeds = sorted({m.seed for m in members})
        self._data_id = {s: i for i, s in enumerate(seeds)}
        first = {s: next(m for m in members if m.seed == s) for s in seeds}
        xs = np.stack([first[s].x_train for s in seeds])
        ys = np.stack([first[s].y_train for s in seeds])
        self.batch_size = min(batch_size, xs.shape[1])
        replicated = self._sharding(replicate=True)
        self._xs = jax.device_put(xs, replicated)
        self._ys = jax.device_put(ys, replicated)
        self._samplers = {
            s: BatchSampler(np.arange(xs.shape[1]), np.arange(xs.shape[1]), batch_size=self.batch_size, seed=s)
            for s in seeds
        }
        self.defs, state0 = create_train_state(nnx.clone(members[0].model), members[0].tx, seed=members[0].seed)
        # One seed: every trial sees the same batches, so the batch is gathered once and broadcast
        # (a shared input times stacked weights is one large matmul, not K small ones).
        self.shared_batches = len(seeds) == 1
        shared = self.shared_batches
        with_loss = [m.batch_loss is not None for m in members]
        if any(with_loss) and not all(with_loss):
            raise ValueError(
                f"members {[i for i, w in enumerate(with_loss) if not w]} have no batch loss and the others have one; "
                "a population trains one loss: split them"
            )
        self.extended = all(with_loss)
        extended = self.extended
        # Per-example tables (a cached teacher's logits) once per distinct table, replicated; each
        # trial gathers its rows by its table's index.
        self._table_id, tables, seen = [0] * len(members), [{}], {}
        if extended:
            tables = []
            for j, m in enumerate(members):
                digest = _tree_digest(m.batch_loss.rows)
                if digest not in seen:
                    seen[digest] = len(tables)
                    tables.append(m.batch_loss.rows)
                self._table_id[j] = seen[digest]
        stacked = jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]), *tables)
        self._tables = jax.device_put(stacked, replicated)
        transforms = members[0].batch_loss.transforms if extended else ()
        step = make_train_step(
            self.defs, members[0].tx, *([loss_fn] if loss_fn else []), loss_transforms=transforms, jit=False
        )
        self._cache = cache if cache is not None else {}
        #: Whether the blocks are single steps, not loops (convolutions on a CPU); traced once per
        #: population signature and platform (trainers of a tune study's batches share ``cache``).
        platform = self.devices[0].platform
        unlooped_key = ("unlooped", key, platform)
        if unlooped_key not in self._cache:
            batch0 = {"x": xs[0, : self.batch_size], "y": ys[0, : self.batch_size]}
            if extended:
                rows = np.arange(self.batch_size, dtype=np.int32)
                batch0 = members[0].batch_loss.extend({**batch0, "index": rows})
            self._cache[unlooped_key] = loops_slow_down_convolutions(platform) and has_convolution(
                traced(self.defs) if traced else step, state0, batch0
            )
        self.unlooped = self._cache[unlooped_key]
        self.block_steps = _block_length(
            1 if self.unlooped else block_steps, steps, self.checkpoint_every + self.eval_every
        )
        self.program_key = (
            key,
            len(seeds),
            self.shared_batches,
            self.block_steps,
            tuple(str(d) for d in self.devices),
        )
        self.memory: dict[int, int] = {}
        self.compile_seconds: dict[int, float] = {}  # seconds each K's program took to compile here (0: cached)
        self.sequential_compile_seconds = 0.0  # the sequential step's first call beyond its steps (0: cached)
        self._sequential_timed = False

        def block(state, xs, ys, data_id, idx, valid, constants, tables, table_id):
            def extend(batch, i, c, t):  # the trial's constants and its tables' rows i
                rows = jax.tree.map(lambda table: table[t][i], tables)
                return {**batch, **c, **rows, "index": i}

            def one(carry, inp):
                idx_t, ok = inp
                if shared and not extended:
                    batch = {"x": xs[0, idx_t], "y": ys[0, idx_t]}
                    new, metrics = _vmap_lockstep(step, (None,))(carry, batch)
                elif shared:
                    batch = {"x": xs[0, idx_t], "y": ys[0, idx_t]}  # gathered once, shared by the trials

                    def trial_step(s, c, t):
                        return step(s, extend(batch, idx_t, c, t))

                    new, metrics = _vmap_lockstep(trial_step, (0, 0))(carry, constants, table_id)
                else:

                    def trial_step(s, d, i, c, t):
                        batch = {"x": xs[d, i], "y": ys[d, i]}
                        return step(s, extend(batch, i, c, t) if extended else batch)

                    new, metrics = _vmap_lockstep(trial_step, (0, 0, 0, 0))(carry, data_id, idx_t, constants, table_id)
                new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, carry)
                return new, metrics

            if idx.shape[0] == 1:  # no loop around a single step (see ``unlooped``)
                new, metrics = one(state, (idx[0], valid[0]))
                return new, jax.tree.map(lambda a: a[None], metrics)
            return jax.lax.scan(one, state, (idx, valid))

        self._block = block

    # ------------------------------------------------------------------ placement
    def _sharding(self, *, replicate: bool = False, axis: int = 0):
        from jax.sharding import Mesh
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        mesh = Mesh(np.array(self.devices), ("pop",))
        if replicate:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, P(*([None] * axis), "pop"))

    def _put(self, tree, axis: int = 0):
        return jax.device_put(tree, self._sharding(axis=axis))

    def _put_idx(self, idx: np.ndarray):
        if self.shared_batches:
            return jax.device_put(idx, self._sharding(replicate=True))
        return self._put(idx, axis=1)

    def _trial_args(self, indices: Sequence[int], idx: np.ndarray, valid: np.ndarray, chunk=None) -> tuple:
        """The block program's arguments after the data for trials ``indices`` (placed): their data
        sets, batch rows (``idx``), ``valid`` steps, batch-loss constants, tables and table ids
        (``chunk``: :meth:`_chunk_args` of ``indices`` made before, the same for every block)."""
        data_id, constants, tables, table_id = chunk or self._chunk_args(indices)
        return data_id, self._put_idx(idx), valid, constants, tables, table_id

    def _chunk_args(self, indices: Sequence[int]) -> tuple:
        """The arguments of every block of trials ``indices`` (placed): data set ids, batch-loss
        constants, tables, table ids."""
        data_id = self._put(np.array([self._data_id[self.members[i].seed] for i in indices], np.int32))
        constants = {}
        if self.extended:
            trees = [self.members[i].batch_loss.constants for i in indices]
            constants = self._put(jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]), *trees))
        table_id = self._put(np.array([self._table_id[i] for i in indices], np.int32))
        return data_id, constants, self._tables, table_id

    def bundle(self, index: int):
        """A fresh untrained :class:`research.stages.Bundle` of trial ``index`` (what
        :func:`research.run.build_bundle` gives for its config; data set and model shared with the
        trials of the same seed, never modified)."""
        if not self.configs:
            raise ValueError("a trainer built for_members has no configs; its members bring their models")
        return self._seed_bundles.bundle(index)

    def chunk_size_ok(self, k: int) -> bool:
        """Whether ``k`` trials split evenly over the devices."""
        return k % len(self.devices) == 0

    # ------------------------------------------------------------------ state and batches
    def initial_state(self, indices: Sequence[int]):
        """The stacked train state of trials ``indices`` (trial 0's state repeats as padding).

        Each distinct trial's state is created once (the chooser times chunks of one trial
        repeated K times: one state, not K; a cold LeNet-5 chooser at K=32 spent 2 s creating them)."""
        created: dict[int, Any] = {}
        for i in dict.fromkeys(indices):
            m = self.members[i]
            _, s = create_train_state(nnx.clone(m.model), m.tx, seed=m.seed)
            created[i] = jax.tree.map(np.asarray, s)
        return self._put(jax.tree.map(lambda *a: np.stack(a), *[created[i] for i in indices]))

    def batch_indices(
        self, indices: Sequence[int], start: int, stop: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(idx [block, K, batch], valid [block])`` for steps ``start ..`` (before ``stop``, default
        the last step) of trials ``indices`` (``idx [block, batch]`` when the trials share one seed,
        hence their batches)."""
        stop = self.steps if stop is None else min(stop, self.steps)
        if self.shared_batches:
            (sampler,) = self._samplers.values()
            idx = np.zeros((self.block_steps, self.batch_size), np.int32)
            valid = np.arange(start, start + self.block_steps) < stop
            for t in np.flatnonzero(valid):
                idx[t] = sampler.batch(start + int(t))["x"]
            return idx, valid
        idx = np.zeros((self.block_steps, len(indices), self.batch_size), np.int32)
        valid = np.zeros(self.block_steps, bool)
        for t in range(self.block_steps):
            step = start + t
            if step >= stop:
                break
            valid[t] = True
            per_seed = {s: sampler.batch(step)["x"] for s, sampler in self._samplers.items()}
            for j, i in enumerate(indices):
                idx[t, j] = per_seed[self.members[i].seed]
        return idx, valid

    def program_args(self, k: int) -> tuple:
        """The arguments the ``k`` trials' program is compiled with: trial 0 repeated ``k`` times
        (its state, data, first batches and batch-loss values), placed."""
        if not self.chunk_size_ok(k):
            raise ValueError(f"chunk size {k} does not split over {len(self.devices)} devices; use a multiple")
        idx, valid = self.batch_indices([0] * k, 0)
        return (self.initial_state([0] * k), self._xs, self._ys, *self._trial_args([0] * k, idx, valid))

    def is_compiled(self, k: int) -> bool:
        """Whether the program for ``k`` trials is compiled already (by this trainer or one sharing its cache)."""
        return (*self.program_key, k) in self._cache

    def compiled(self, k: int, args: tuple | None = None):
        """The compiled block program for ``k`` trials (compiled once per ``k``).

        ``args``: :meth:`program_args` made beforehand (a compile in another thread then reads no
        model of the trials while they train; default: made here)."""
        key = (*self.program_key, k)
        if key not in self._cache:
            args = self.program_args(k) if args is None else args
            t0 = time.perf_counter()
            lowered = jax.jit(self._block, donate_argnums=(0,)).lower(*args)
            compiled = lowered.compile()
            self._cache[key] = (compiled, _program_bytes(compiled))
            self.compile_seconds[k] = time.perf_counter() - t0
        self.compile_seconds.setdefault(k, 0.0)
        compiled, self.memory[k] = self._cache[key]
        return compiled

    def step_seconds(self, k: int, timer: Timer = time_call) -> float:
        """Seconds per training step of ``k`` trials (one compiled block, timed by ``timer``)."""
        program = self.compiled(k)
        idx, valid = self.batch_indices([0] * k, 0)
        args = self._trial_args([0] * k, idx, valid)
        state = self.initial_state([0] * k)

        def call():  # a device copy of the state per call (the program donates its input)
            return program(jax.tree.map(jnp.copy, state), self._xs, self._ys, *args)[1]

        return timer(k, call) / self.block_steps

    def sequential_step_seconds(self, timer: Timer = time_call, steps: int | None = None) -> float:
        """Seconds per training step of trial 0 trained as the sequential executor trains it.

        The step is the one :func:`research.train.finetune` jits for this stage (the same cached
        jitted function, so a later sequential run of the trials compiles nothing), called as
        :func:`research.train.fit` calls it from ``finetune``: once per step from Python with the
        host batches of :class:`research.data.BatchSampler` on a CPU, scanned over the stacked
        batches in one call on a GPU/TPU (:func:`research.train.default_block_steps` > 1); the
        metrics fetched at the end of the block. ``timer`` is called with
        ``k=`` :data:`research.population.chooser.SEQUENTIAL_K` and a call of ``steps`` steps (default
        ``block_steps``). The first call this trainer makes of the step is timed apart: what it takes
        beyond its steps is :attr:`sequential_compile_seconds` (0 when the step was compiled before).

        Raises:
          ValueError: the trainer was built ``for_members`` (no stage config to train).
        """
        from research.population.chooser import SEQUENTIAL_K  # pylint: disable=import-outside-toplevel
        from research.train.loop import default_block_steps  # pylint: disable=import-outside-toplevel
        from research.train.loop import run_block  # pylint: disable=import-outside-toplevel

        if not self.configs:
            raise ValueError("a trainer built for_members has no stage config; time its members' steps instead")
        step, tx = self._sequential_step(self.defs)
        member = self.members[0]
        _, state = create_train_state(nnx.clone(member.model), tx, seed=member.seed)
        sampler = BatchSampler(member.x_train, member.y_train, batch_size=self.batch_size, seed=member.seed)
        batches = steps or self.block_steps
        first: list[float] = []
        in_blocks = default_block_steps() > 1

        def call():  # a copy of the state per call (the step donates its input)
            t0 = time.perf_counter()
            s, pending = jax.tree.map(jnp.copy, state), []
            if in_blocks:
                s, metrics = run_block(step, s, [sampler.batch(i) for i in range(batches)])
                pending.append(metrics)
            else:
                for i in range(batches):
                    s, metrics = step(s, sampler.batch(i))
                    pending.append(metrics)
            jax.device_get(pending)
            if not self._sequential_timed and not first:
                first.append(time.perf_counter() - t0)
            return s

        seconds = timer(SEQUENTIAL_K, call) / batches
        if first:
            self.sequential_compile_seconds = max(0.0, first[0] - batches * seconds)
        self._sequential_timed = True
        return seconds

    def _sequential_step(self, defs) -> tuple[Callable, Any]:
        """``(jitted step, optimizer)`` of trial 0's first stage as :func:`research.train.finetune`
        makes them: the same cached jitted function (finetune's cache key for a first stage, no
        constraints carried, no wrapper), so what is traced or compiled here the sequential path reuses."""
        from research.constraints import Carried  # pylint: disable=import-outside-toplevel
        from research.stages import train_kwargs  # pylint: disable=import-outside-toplevel
        from research.train import make_optimizer  # pylint: disable=import-outside-toplevel
        from research.train.finetune import optimizer_key  # pylint: disable=import-outside-toplevel
        from research.train.losses import cross_entropy_loss  # pylint: disable=import-outside-toplevel

        settings = _optimizer_kwargs(train_kwargs(self.stage))
        tx = make_optimizer(**settings)
        cache_key = (optimizer_key(settings), (Carried().step_key, None))
        return make_train_step(defs, tx, cross_entropy_loss, (), cache_key=cache_key), tx

    # ------------------------------------------------------------------ training
    def initial_states(self, indices: Sequence[int], states: Sequence[Any]):
        """The stacked train state of trials ``indices`` from their given ``states`` (restored
        checkpoints; the first repeats as padding up to ``len(indices)``)."""
        states = list(states) + [states[0]] * (len(indices) - len(states))
        return self._put(jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]), *states))

    def restore(self, index: int, directory: str) -> tuple[Any, int] | None:
        """``(train state, step)`` of the newest readable checkpoint of trial ``index`` in
        ``directory`` (a killed sweep's), or ``None`` when it holds none."""
        from research.train import Checkpointer  # pylint: disable=import-outside-toplevel

        if not (os.path.isdir(directory) and os.listdir(directory)):
            return None
        m = self.members[index]
        _, template = create_train_state(nnx.clone(m.model), m.tx, seed=m.seed)
        ckpt = Checkpointer(directory)
        try:
            return ckpt.restore_latest(template)
        finally:
            ckpt.close()

    def checkpoint_steps(self, index: int) -> set[int]:
        """The steps before the last at which trial ``index`` checkpoints (its ``checkpoint_every``)."""
        return _cadence(self.checkpoint_every[index], self.steps)

    def eval_steps(self, index: int) -> set[int]:
        """The steps before the last at which trial ``index`` writes a validation row (its ``eval_every``)."""
        return _cadence(self.eval_every[index], self.steps)

    def _validate(
        self, indices: Sequence[int], due: Sequence[int], host, step: int, k: int
    ) -> dict[int, dict[str, Any]]:
        """``{position: validation row}`` of the trials at positions ``due`` of ``indices`` (their
        states in ``host``), evaluated together per data set, as :func:`research.train.fit` writes them."""
        from research.population.measure import evaluate_many  # pylint: disable=import-outside-toplevel

        rows, by_seed = {}, {}
        for j in due:
            by_seed.setdefault(self.members[indices[j]].seed, []).append(j)
        for seed, positions in by_seed.items():
            ds = self._bundles[seed].dataset
            models = [state_to_model(self.defs, jax.tree.map(lambda a, j=j: a[j], host)) for j in positions]
            for j, row in zip(positions, evaluate_many(models, ds.x_val, ds.y_val, pad_to=k), strict=True):
                rows[j] = {"step": step, "split": "val", **row}
        return rows

    # ------------------------------------------------------------------ training
    def train(
        self,
        indices: Sequence[int],
        k: int | None = None,
        *,
        start: int = 0,
        states: Sequence[Any] | None = None,
        on_checkpoint: Callable[[int, int, Any, dict[str, np.ndarray], list[dict]], None] | None = None,
    ) -> list[TrialResult]:
        """Trains trials ``indices`` in one chunk of ``k`` (default ``len(indices)``; padded to ``k``).

        Args:
          indices: the trials (members) to train.
          k: the chunk size (the compiled program's K).
          start: the step the trials are at (a resumed chunk; its trials share it).
          states: their train states at ``start`` (restored checkpoints), one per index; default:
            the initial states.
          on_checkpoint: called as ``on_checkpoint(step, position in indices, train state, metrics
            of steps start + 1 .. step ({name: values}), validation rows so far)`` at each of a
            trial's checkpoint steps (its ``checkpoint_every``) before the last, as a sequential
            run saves a checkpoint there.

        A trial with ``eval_every`` below the steps (and a validation split) is evaluated at those
        steps, the chunk's due trials together (:func:`research.population.measure.evaluate_many`),
        into :attr:`TrialResult.val_rows`.

        Returns:
          One :class:`TrialResult` per index, in order.
        """
        indices = list(indices)
        k = k or len(indices)
        if len(indices) > k:
            raise ValueError(f"{len(indices)} trials do not fit a chunk of {k}; split them")
        if states is not None and len(states) != len(indices):
            raise ValueError(f"{len(states)} states for {len(indices)} trials; give one per trial")
        padded = indices + [indices[0]] * (k - len(indices))
        program = self.compiled(k)
        t0 = time.perf_counter()
        state = self.initial_state(padded) if states is None else self.initial_states(padded, states)
        saves = {j: self.checkpoint_steps(i) for j, i in enumerate(indices)} if on_checkpoint else {}
        evals = {j: self.eval_steps(i) for j, i in enumerate(indices)}
        stops = sorted({t for steps in [*saves.values(), *evals.values()] for t in steps if t > start} | {self.steps})
        blocks, step, val_rows = [], start, {j: [] for j in range(len(indices))}
        chunk = self._chunk_args(padded)
        while step < self.steps:
            stop = min(step + self.block_steps, next(t for t in stops if t > step))
            idx, valid = self.batch_indices(padded, step, stop)
            state, metrics = program(state, self._xs, self._ys, *self._trial_args(padded, idx, valid, chunk))
            # kept on the device until read: the next block is dispatched without waiting for this
            # one (single-step blocks, a CPU's convolutions, would otherwise wait once per step)
            blocks.append((metrics, valid))
            step = stop
            due = [j for j, steps in saves.items() if step in steps]
            due_eval = [j for j, steps in evals.items() if step in steps]
            if not (due or due_eval):
                continue
            host = jax.device_get(state)
            so_far = _concat(blocks, k)
            finite = {j: bool(np.all(np.isfinite(so_far["loss"][:, j]))) for j in range(len(indices))}
            # as fit(): a NaN loss ends the trial's rows before its next validation row or checkpoint
            for j, row in self._validate(indices, [j for j in due_eval if finite[j]], host, step, k).items():
                val_rows[j].append(row)
            for j in due:
                if finite[j]:  # as fit(): no checkpoint from a state after a NaN loss
                    rows = {name: v[:, j] for name, v in so_far.items()}
                    on_checkpoint(step, j, jax.tree.map(lambda a, j=j: a[j], host), rows, list(val_rows[j]))
        host = jax.device_get(state)
        seconds = time.perf_counter() - t0
        metrics = _concat(blocks, k)
        out = []
        for j, _ in enumerate(indices):
            trial = jax.tree.map(lambda a, j=j: jnp.asarray(a[j]), host)
            out.append(
                TrialResult(
                    model=state_to_model(self.defs, trial),
                    metrics={name: v[:, j] for name, v in metrics.items()},
                    seconds=seconds,
                    state=trial,
                    start=start,
                    val_rows=val_rows[j],
                )
            )
        return out


LOCKSTEP_FIELDS = ("step", "count")
"""Per-trial integer scalars named so (``TrainState.step``, optax's and the pruning wrapper's
``count``) are the same in every trial of a chunk: its trials start at one step and step
together. :func:`_vmap_lockstep` passes them to the step unbatched."""


def _lockstep(state) -> Any:
    """``True`` at the leaves of a stacked state that are :data:`LOCKSTEP_FIELDS` counters."""

    def flag(path, leaf):
        name = getattr(path[-1], "name", None) if path else None
        return name in LOCKSTEP_FIELDS and jnp.ndim(leaf) == 1 and jnp.issubdtype(jnp.result_type(leaf), jnp.integer)

    return jax.tree_util.tree_map_with_path(flag, state)


def _vmap_lockstep(step: Callable, other_axes: tuple) -> Callable:
    """``jax.vmap(step)`` over a stacked train state (first argument) and ``other_axes``, with the
    state's step counters (:func:`_lockstep`) passed and returned unbatched, then broadcast back.

    A schedule's ``lax.cond`` on the step (a pruning wrapper's mask update every ``frequency``
    steps) then stays a branch: with a batched counter, vmap turns it into a select that
    recomputes every trial's masks at every step. A step that makes a counter differ between
    trials (vmap refuses an unbatched output it batched) is vmapped over the whole state instead.
    """

    def call(state, *args):
        def batched():
            return jax.vmap(step, in_axes=(0, *other_axes))(state, *args)

        flags = _lockstep(state)
        if not any(jax.tree.leaves(flags)):
            return batched()
        k = jax.tree.leaves(state)[0].shape[0]
        axes = jax.tree.map(lambda f: None if f else 0, flags)
        first = jax.tree.map(lambda f, x: x[0] if f else x, flags, state)
        try:
            new, metrics = jax.vmap(step, in_axes=(axes, *other_axes), out_axes=(axes, 0))(first, *args)
        except ValueError as e:  # a counter that depends on the trial
            if "out_axes" not in str(e):
                raise
            return batched()
        return jax.tree.map(lambda f, x: jnp.broadcast_to(x, (k, *jnp.shape(x))) if f else x, flags, new), metrics

    return call


def _tree_digest(tree) -> tuple:
    """A pytree of arrays as a hashable digest: its structure and each leaf's shape, dtype and a
    SHA-256 of its bytes (equal digests: equal tables, so K trials with one teacher keep one copy)."""
    leaves = [np.ascontiguousarray(np.asarray(x)) for x in jax.tree.leaves(tree)]
    return (
        str(jax.tree.structure(tree)),
        tuple((x.shape, str(x.dtype), hashlib.sha256(x.tobytes()).hexdigest()) for x in leaves),
    )


def _cadence(every: int, steps: int) -> set[int]:
    """The multiples of ``every`` below ``steps`` (none when ``every`` is 0 or not below ``steps``)."""
    return set(range(every, steps, every)) if 0 < every < steps else set()


def _concat(blocks: list[tuple[dict[str, Any], np.ndarray]], k: int) -> dict[str, np.ndarray]:
    """The blocks' per-step metrics, ``(metrics of the block's steps, which steps are valid)``,
    joined on the host: ``{name: [steps, k]}`` (``loss`` always present)."""
    if not blocks:
        return {"loss": np.zeros((0, k), np.float32)}
    host = jax.device_get([metrics for metrics, _ in blocks])
    return {
        name: np.concatenate([np.asarray(m[name])[valid] for m, (_, valid) in zip(host, blocks, strict=True)], axis=0)
        for name in host[0]
    }


def _block_length(block_steps: int, steps: int, every: Sequence[int]) -> int:
    """Steps per compiled call: ``block_steps`` (at most ``steps``), or the largest divisor of the
    checkpoint cadences' greatest common divisor below it when that is at least half of it (blocks
    then end on checkpoint steps; otherwise :meth:`PopulationTrainer.train` cuts a block short there)."""
    block = max(1, min(block_steps, steps))
    cadences = [c for c in every if 0 < c < steps]
    if not cadences:
        return block
    g = math.gcd(*cadences)
    d = max(d for d in range(1, min(g, block) + 1) if g % d == 0)
    return d if 2 * d >= block else block


def _optimizer_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    keys = ("steps", "learning_rate", "optimizer", "weight_decay", "schedule", "warmup_steps", "grad_clip")
    return {k: kw[k] for k in keys}


def _program_bytes(compiled) -> int:
    """Device bytes a compiled program needs: arguments, outputs and temporaries (aliases once)."""
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):
        return 0
    if m is None:
        return 0
    return int(
        m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - getattr(m, "alias_size_in_bytes", 0)
    )
