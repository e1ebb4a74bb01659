"""A population's program compiled in a background thread while its first trials train.

A fresh process pays for a population program before it saves anything: tracing and compiling
the vmapped step (LeNet-5, K=32, on the 2-core CPU: 1.5-1.6 s, against 0.4 s for a warm trial of
100 steps), then timing it against the sequential step. :class:`BackgroundCompile` moves the
compile off the critical path: the executor starts it, trains the population's first trials one
after another exactly as the sequential executor does (the sequential step's compile, which the
chooser pays anyway, then trains a trial), and asks :meth:`BackgroundCompile.done` between trials.
Once the program is ready the remaining trials are timed against it and trained with the faster
(:meth:`research.population.executor.PopulationExecutor._run_overlapped`).

The thread compiles the largest chunk size first and, when its compiled bytes exceed the memory
limit, the next smaller power of two; then it runs the vmapped evaluation programs once (test and
validation splits, K models stacked), so that the first chunk compiles nothing. XLA releases
Python's lock while it compiles; on a machine whose cores the training already keeps busy the
compile still slows the training (2-core CPU: LeNet-5 trials of 0.44 s took 0.6-0.8 s while a
1.6 s compile ran beside them; the README's population section has the sweeps' figures).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from flax import nnx

from research.population.measure import evaluate_many


class BackgroundCompile:
    """Compiles ``trainer``'s program for the largest of ``ks`` that fits ``memory_limit``, in a thread.

    Args:
      trainer: the population's :class:`research.population.trainer.PopulationTrainer`.
      ks: chunk sizes to try, largest first (each a multiple of the trainer's device count).
      memory_limit: bytes a chunk may use.
      sequential_seconds: the sequential step's seconds per step, timed before (kept for the
        choice that follows: :attr:`sequential_seconds`).

    The arguments of the first K's program and a copy of trial 0's model (for the evaluation
    programs) are made before the thread starts, so the thread reads no model the trials are
    training from (a smaller K, tried when the first does not fit, makes its own arguments).

    Attributes (read them after :meth:`done` says ``True``):
      k: the compiled chunk size that fits (``None``: none did, or the compile failed).
      seconds: wall seconds the thread took (compiles and evaluation programs).
      error: why no K is ready (``""`` when one is).
      tried: ``[(k, bytes)]`` of the programs compiled, in order.
    """

    def __init__(self, trainer, ks: Sequence[int], memory_limit: int, *, sequential_seconds: float | None = None):
        if not ks:
            raise ValueError("no chunk sizes to compile; give at least one")
        self.trainer, self.ks, self.memory_limit = trainer, sorted(ks, reverse=True), memory_limit
        self.sequential_seconds = sequential_seconds
        self.k: int | None = None
        self.seconds = 0.0
        self.error = ""
        self.tried: list[tuple[int, int]] = []
        self._first_args = trainer.program_args(self.ks[0])
        self._model = None
        if trainer.configs:  # a trainer of configs evaluates its first stage's models together
            self._model = nnx.clone(trainer.bundle(0).model)
        self._thread = threading.Thread(target=self._work, name="population-compile", daemon=True)

    def start(self) -> BackgroundCompile:
        self._thread.start()
        return self

    def done(self) -> bool:
        """Whether the thread has finished (a K is ready, or :attr:`error` says why not)."""
        return not self._thread.is_alive()

    def join(self) -> None:
        """Waits for the thread (a compile cannot be interrupted)."""
        self._thread.join()

    def _work(self) -> None:
        t0 = time.perf_counter()
        try:
            for k in self.ks:
                self.trainer.compiled(k, self._first_args if k == self.ks[0] else None)
                nbytes = self.trainer.memory.get(k, 0)
                self.tried.append((k, nbytes))
                if nbytes <= self.memory_limit:
                    self.k = k
                    break
            if self.k is None:
                self.error = (
                    f"no chunk size fits: {', '.join(f'K={k} needs {b:,} bytes' for k, b in self.tried)} "
                    f"> the {self.memory_limit:,} available"
                )
            elif self._model is not None:
                self._warm_evaluation(self.k)
        except Exception as e:  # a step that does not vmap or compile: the trials train one after another
            self.k, self.error = None, f"{type(e).__name__}: {e}"
        finally:
            self._first_args = None
            self.seconds = time.perf_counter() - t0

    def _warm_evaluation(self, k: int) -> None:
        """Runs the vmapped evaluation programs a chunk of ``k`` uses (compiled once per shape)."""
        ds = self.trainer.dataset
        splits: list[Any] = [(ds.x_test, ds.y_test)]
        if len(ds.x_val):
            splits.append((ds.x_val, ds.y_val))
        for x, y in splits:
            evaluate_many([self._model], x, y, pad_to=k)
