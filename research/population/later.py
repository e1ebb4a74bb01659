"""Later stages of a population: the fine-tuning of a prune (or any) stage trained as one program.

After the leading ``train`` stage, each trial of a chunk runs its stages through
:func:`research.run.run` as usual, but in its own thread, one trial at a time (a baton: exactly
one thread runs; the others wait). When a stage's fine-tuning starts (:func:`research.stages.fine_tune`
with a cacheable step), the trial hands its :class:`~research.stages.FineTuneRequest` over
(:data:`research.stages.FINE_TUNE_RUNNER`) and waits. Once every trial of the chunk waits or has
finished, the requests that compile to the same program (:func:`request_key`: the same stage,
optimizer settings but the values in its state, wrapper structure (``step_key``), model graph and
data shapes) train together as one vmapped program; the rest train alone, as a sequential run
would. Then each trial resumes, one at a time, with its trained model.

What differs between the trials' fine-tunings lives in the optimizer state or in the batches and
so may differ inside one program: learning rate, AdamW's weight decay, a pruning wrapper's per-leaf
target sparsities and masks (masks have the parameters' shapes), and a cached teacher's
distillation (its logits, the terms' weights and temperatures: the loss's
:class:`research.train.BatchLoss`, whose key joins the program key). What a trial writes is what
:func:`research.train.finetune` writes: ``metrics.jsonl`` (one row per step with every scalar the
train step returns, the validation rows) and the checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import nnx

from research.population.padding import canonical_graphdef
from research.population.padding import lift_models
from research.population.padding import pad_models
from research.population.padding import unpad_tree
from research.population.trainer import Member
from research.population.trainer import PopulationTrainer
from research.population.trainer import TrialResult


class TrialThread:
    """Runs ``target`` (one trial's :func:`research.run.run`) in a thread that holds the baton only
    between :meth:`resume` calls of the coordinator.

    Attributes:
      request: the fine-tuning request it waits on (``None`` while running or once finished).
      outcome: what ``target`` returned, once finished.
    """

    def __init__(self, target: Callable[[], Any], runner_var):
        self.request = None
        self.outcome = None
        self.finished = False
        self._reply = None
        self._go = threading.Event()
        self._back = threading.Event()
        self._thread = threading.Thread(target=self._main, args=(target, runner_var), daemon=True)
        self._started = False

    def _main(self, target, runner_var) -> None:
        self._go.wait()
        self._go.clear()
        runner_var.set(self._ask)  # this thread's context only
        try:
            self.outcome = target()
        finally:
            self.finished = True
            self._back.set()

    def _ask(self, request):
        self.request = request
        self._back.set()
        self._go.wait()
        self._go.clear()
        reply, self._reply = self._reply, None
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def resume(self, reply=None) -> None:
        """Hands the baton to the thread (with ``reply`` to its request) and waits until it asks
        again or finishes."""
        self.request, self._reply = None, reply
        if not self._started:
            self._started = True
            self._thread.start()
        self._go.set()
        self._back.wait()
        self._back.clear()
        if self.finished:
            self._thread.join()


def _settings(kwargs: dict[str, Any]) -> dict[str, Any]:
    keys = ("steps", "learning_rate", "optimizer", "weight_decay", "schedule", "warmup_steps", "grad_clip")
    defaults = {"optimizer": "adam", "weight_decay": 0.0, "schedule": "cosine", "warmup_steps": 0, "grad_clip": 0.0}
    return {k: kwargs.get(k, defaults.get(k)) for k in keys}


def request_key(request) -> tuple | None:
    """What the request's compiled train step depends on (requests with equal keys train as one
    program), or ``None`` when it must train alone: data-parallel, validation rows during training
    (``eval_every`` below ``steps``), or a checkpoint to resume from in its directory. Models that
    differ only in the sizes of registered layers (factorization ranks,
    :mod:`research.population.padding`) have one key: they train padded to one shape."""
    from research.train.finetune import optimizer_key  # pylint: disable=import-outside-toplevel

    if request.alone:  # not cacheable: research.stages.fine_tune says why
        return None
    kw = request.kwargs
    steps = kw["steps"]
    if kw.get("data_parallel") or (kw.get("eval_every") and kw["eval_every"] < steps):
        return None
    ckpts = os.path.join(os.fspath(kw["workdir"]), "checkpoints")
    if os.path.isdir(ckpts) and os.listdir(ckpts):
        return None  # an interrupted stage: finetune resumes it
    ds = request.dataset
    return (
        "fine_tune",
        request.stage,
        optimizer_key(_settings(kw)),
        kw["step_key"],
        canonical_graphdef(request.model),  # models differing only in ranks train together, padded
        np.shape(ds.x_train),
        str(np.asarray(ds.x_train).dtype),
        min(kw.get("batch_size", 128), len(ds.x_train)),
    )


KEY_PARTS = (
    "kind",
    "stage",
    "optimizer settings (but the learning rate and AdamW's weight decay)",
    "optimizer wrapper, kept constraints or loss (step_key)",
    "model graph (sizes and lifted choices aside)",
    "training data shape",
    "training data dtype",
    "batch size",
)
"""What each entry of :func:`request_key` is, for the reasons :func:`alone_reason` gives."""


def alone_reason(request, key: tuple | None, others: Sequence[tuple]) -> str:
    """Why ``request`` (program key ``key``) trains alone in its chunk, whose other fine-tuning
    requests of the stage have the program keys ``others`` (``None`` for those that train alone)."""
    kw = request.kwargs
    if key is None:
        if request.alone:
            return request.alone
        if kw.get("data_parallel"):
            return "data-parallel over the devices (a population shards over its trials instead)"
        if kw.get("eval_every") and kw["eval_every"] < kw["steps"]:
            return f"validation rows during training (eval_every={kw['eval_every']} < steps={kw['steps']})"
        return "resumed from its own checkpoint (an interrupted stage)"
    keyed = [o for o in others if o is not None]
    if not keyed:
        return "the only fine-tuning of its chunk at this stage"
    common = max(set(keyed), key=keyed.count)
    differ = [name for name, a, b in zip(KEY_PARTS, key, common, strict=False) if a != b]
    return "its program differs from the chunk's other trials' in: " + ", ".join(differ or ["its key"])


@dataclasses.dataclass
class Trained:
    """What :func:`train_requests` gives back for a group of requests.

    Attributes:
      results: one :class:`TrialResult` per request, at the request's own shapes (model, state).
      defs: one :class:`research.train.ModelDefs` per request (its own graph).
      models: the models as trained (padded to one shape when ``padded``), for evaluating together.
      padded: whether the models were padded (their ranks differ).
      lifted: ``{path: distinct values}`` of the lifted choices that differ between the models
        (their quantizers' bit widths: :func:`research.population.padding.lift_models`), ``{}``
        when none was lifted.
    """

    results: list[TrialResult]
    defs: list[Any]
    models: list[nnx.Module]
    padded: bool
    lifted: dict[str, list] = dataclasses.field(default_factory=dict)


def train_requests(requests: Sequence[Any], key: tuple, k: int, *, block_steps: int, devices, cache: dict) -> Trained:
    """Trains requests that share ``key`` as one population, ``k`` at a time (padded). Models whose
    factorization ranks differ train padded with zero components to the largest
    (:func:`research.population.padding.pad_models`), models whose quantizers' bit widths differ
    train lifted (the grids as values: :func:`research.population.padding.lift_models`), and each is
    cut back to its own ranks and graph after training; so are the checkpoints written on the way.
    """
    from research.train import create_train_state  # pylint: disable=import-outside-toplevel
    from research.train import make_optimizer  # pylint: disable=import-outside-toplevel
    from research.train import state_to_model  # pylint: disable=import-outside-toplevel

    models, padded = pad_models([r.model for r in requests])
    models, lifted = lift_models(models)
    txs, members = [], []
    for r, model in zip(requests, models, strict=True):
        tx = make_optimizer(**_settings(r.kwargs))
        tx = r.wrap_tx(tx) if r.wrap_tx is not None else tx
        txs.append(tx)
        members.append(
            Member(
                model=model,
                tx=tx,
                seed=r.kwargs.get("seed", 0),
                x_train=r.dataset.x_train,
                y_train=r.dataset.y_train,
                batch_loss=r.batch_loss,
            )
        )
    own = None  # each request's (defs, train state) at its own shapes: what the padded states are cut to
    if padded or lifted:
        own = [
            create_train_state(nnx.clone(r.model), tx, seed=m.seed)
            for r, tx, m in zip(requests, txs, members, strict=True)
        ]
        key = (key, nnx.graphdef(models[0]))  # the program is that of the padded (lifted) graph
    kw = requests[0].kwargs
    trainer = PopulationTrainer.for_members(
        members,
        steps=kw["steps"],
        batch_size=kw.get("batch_size", 128),
        program_key=key,
        block_steps=block_steps,
        devices=devices[:1] if k % len(devices) else devices,
        cache=cache,
        checkpoint_every=[r.kwargs.get("checkpoint_every", 100) for r in requests],
    )

    def cut(i, state):
        return state if own is None else unpad_tree(state, own[i][1])

    out: list[TrialResult] = []
    for first in range(0, len(members), k):
        chunk = list(range(first, min(first + k, len(members))))

        def save(step, j, state, metrics, val_rows, chunk=chunk):
            save_progress(requests[chunk[j]].kwargs["workdir"], step, cut(chunk[j], state), metrics, val_rows=val_rows)

        out += trainer.train(chunk, k, on_checkpoint=save)
    trained = [r.model for r in out]
    if own is not None:  # each trial's model built as the trainer builds it, from its state at its own shapes
        states = [cut(i, r.state) for i, r in enumerate(out)]
        out = [
            dataclasses.replace(r, model=state_to_model(own[i][0], state), state=state)
            for i, (r, state) in enumerate(zip(out, states, strict=True))
        ]
    defs = [d for d, _ in own] if own is not None else [trainer.defs] * len(out)
    return Trained(results=out, defs=defs, models=trained, padded=padded, lifted=lifted)


def _train_rows(
    workdir: str, metrics: dict[str, np.ndarray], start: int, val_rows: Sequence[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """The ``metrics.jsonl`` rows of a trial, in :func:`research.train.fit`'s order: those of steps up
    to ``start`` already in the file (a resumed trial's), then one train row per step of ``metrics``
    (steps ``start + 1`` on, every scalar of the step), each validation row after its step's row."""
    from research.train import read_metrics  # pylint: disable=import-outside-toplevel

    rows = [r for r in read_metrics(workdir) if r.get("step", 0) <= start] if start else []
    vals = {r["step"]: r for r in val_rows}
    names = sorted(metrics)  # fit's rows: the step's metrics as jax returns them (keys sorted)
    for i in range(len(metrics["loss"])):
        step = start + i + 1
        rows.append({"step": step, "split": "train", **{n: float(metrics[n][i]) for n in names}})
        if step in vals:
            rows.append(vals[step])
    return rows


def _write_rows(workdir: str, rows: list[dict[str, Any]]) -> None:
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def save_progress(
    workdir, step: int, state: Any, metrics: dict[str, np.ndarray], start: int = 0, val_rows: Sequence[dict] = ()
) -> None:
    """What :func:`research.train.fit` has on disk at checkpoint ``step`` of a trial trained in a
    population: ``metrics.jsonl`` with every step's row up to ``step`` (and the validation rows so
    far) and the checkpoint (the last two are kept, as a sequential run keeps them), so a killed
    sweep resumes from it.

    ``metrics`` (``{name: values}``, ``loss`` among them) are those of steps ``start + 1 .. step``.
    """
    from research.train import Checkpointer  # pylint: disable=import-outside-toplevel

    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    _write_rows(workdir, _train_rows(workdir, metrics, start, val_rows))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        ckpt.save(step, state)
    finally:
        ckpt.close()


def write_trial(workdir, result: TrialResult, val_row: dict[str, float] | None) -> list[dict[str, Any]]:
    """Writes what :func:`research.train.fit` leaves in a stage directory for a trial trained in a
    population (``metrics.jsonl``: every step's row and the validation rows of its ``eval_every``
    steps, then the final validation row; the final checkpoint) and returns the rows (a resumed
    trial's rows up to ``result.start`` are kept).

    Raises:
      NonFiniteLossError: a loss was NaN or infinite (the rows up to it are written; no checkpoint).
    """
    from research.train import Checkpointer  # pylint: disable=import-outside-toplevel
    from research.train import NonFiniteLossError  # pylint: disable=import-outside-toplevel

    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    losses = np.asarray(result.losses, np.float64)
    bad = np.flatnonzero(~np.isfinite(losses))
    rows = _train_rows(workdir, result.metrics, result.start, result.val_rows)
    if bad.size:  # the rows up to the first bad step's
        first = result.start + int(bad[0]) + 1
        rows = [r for r in rows if r["step"] < first or (r["step"] == first and r["split"] == "train")]
    _write_rows(workdir, rows)
    last = result.start + len(losses)
    if bad.size:  # as fit() stops: the last good checkpoint (if one was saved) is kept
        ckpts = os.path.join(workdir, "checkpoints")
        kept = None
        if os.path.isdir(ckpts) and os.listdir(ckpts):
            ckpt = Checkpointer(ckpts)
            kept = ckpt.latest_step()
            ckpt.close()
        raise NonFiniteLossError(rows[-1]["step"], rows[-1]["loss"], kept, ckpts if kept is not None else None)
    if result.state is not None:  # the final checkpoint a sequential run leaves
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
        try:
            if ckpt.latest_step() != last:
                ckpt.save(last, result.state)
        finally:
            ckpt.close()
    if val_row is not None:  # the last row of a sequential run's metrics.jsonl
        row = {"step": last, "split": "val", **val_row}
        with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
    return rows
