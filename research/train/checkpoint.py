"""Orbax checkpoints of a :class:`TrainState`, with typed PRNG keys handled.

Saving is synchronous and atomic (orbax writes to a temporary directory and renames it), so a
run killed mid-save keeps its previous checkpoint. Restoring the latest checkpoint falls back to
the newest one that reads: a checkpoint damaged later (truncated by a full disk or a partial
copy) is moved to ``corrupt_checkpoints/`` beside the checkpoint directory with a warning.
"""

from __future__ import annotations

import gc
import os
import sys
import types
import warnings
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


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was set aside and an older one restored."""


class CheckpointReadError(OSError):
    """No checkpoint of a directory could be restored; names the directory, the steps and the fix."""


class Checkpointer:
    """Keeps the last ``max_to_keep`` checkpoints of a pytree under ``directory``.

    Example:
      >>> ckpt = Checkpointer("/tmp/run/checkpoints")   # doctest: +SKIP
      >>> ckpt.save(100, state); state = ckpt.restore(template=state)   # doctest: +SKIP
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
        self.directory = os.path.abspath(os.fspath(directory))
        if jax.process_count() > 1:  # a multi-process run: orbax refuses per-process (host-local) saves
            from research.train.multiprocess import ProcessLocalCheckpoints

            self._manager = ProcessLocalCheckpoints(self.directory, max_to_keep=max_to_keep)
            return
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                enable_async_checkpointing=False,
                # Temporary directories are left only by a killed save; callers hold the run's lock.
                cleanup_tmp_directories=True,
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

    def _restore_step(self, template: Any, step: int) -> Any:
        saveable = to_saveable(template)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype) if hasattr(x, "dtype") else x, saveable
        )
        restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        restored = jax.tree.unflatten(jax.tree.structure(saveable), jax.tree.leaves(restored))
        return from_saveable(restored, template)

    def _try_restore(self, template: Any, step: int) -> tuple[Any, str | None]:
        """``(tree, None)``, or ``(None, "Type: first line of the error")`` when ``step`` does not read.

        Only the message is kept: the exception's traceback holds orbax's abandoned array reads,
        which are collected here, so their "Exception ignored" reports stay silent.
        """
        previous = sys.unraisablehook

        def hook(unraisable):
            if not isinstance(unraisable.object, types.CoroutineType):
                previous(unraisable)

        sys.unraisablehook = hook
        try:
            try:
                return self._restore_step(template, step), None
            except Exception as e:  # orbax/TensorStore raise many types for damaged files
                error = _first_line(e)
            gc.collect()
            return None, error
        finally:
            sys.unraisablehook = previous

    def restore(self, template: Any, step: int | None = None) -> Any:
        """Restores checkpoint ``step`` (default: the newest readable one) into the structure of ``template``.

        Raises:
          FileNotFoundError: no checkpoint exists in the directory.
          CheckpointReadError: ``step`` (or, by default, every checkpoint) cannot be read.
        """
        if step is None:
            found = self.restore_latest(template)
            if found is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
            return found[0]
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory} (steps: {self.all_steps()})")
        tree, error = self._try_restore(template, step)
        if error is not None:
            raise CheckpointReadError(
                f"checkpoint {os.path.join(self.directory, str(step))} cannot be read ({error}); "
                "restore another step, or delete it"
            )
        return tree

    def restore_latest(self, template: Any) -> tuple[Any, int] | None:
        """``(tree, step)`` of the newest checkpoint that reads, or ``None`` when there is none.

        A newer checkpoint that fails to read while an older one reads is damaged: it is moved to
        ``<parent>/corrupt_checkpoints/<step>`` (so a resumed run can save that step again) and a
        :class:`CheckpointWarning` names it. When none reads, nothing is moved (a template that no
        longer fits, after a code change, fails on every step).

        Raises:
          CheckpointReadError: checkpoints exist but none can be read; names the steps, the first
            error and the fix.
        """
        failed: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            tree, error = self._try_restore(template, step)
            if error is not None:
                failed.append((step, error))
                continue
            for bad, err in failed:
                dest = self._set_aside(bad)
                warnings.warn(
                    f"checkpoint step {bad} in {self.directory} cannot be read ({err}); "
                    f"moved it to {dest} and resumed from step {step}",
                    CheckpointWarning,
                    stacklevel=2,
                )
            return tree, step
        if failed:
            step, err = failed[0]
            raise CheckpointReadError(
                f"no checkpoint in {self.directory} can be read (steps {[s for s, _ in failed]}; step {step}: "
                f"{err}); if the model or stage code changed since they were written, delete "
                f"{self.directory} to restart this stage from its beginning"
            )
        return None

    def _set_aside(self, step: int) -> str:
        src = os.path.join(self.directory, str(step))
        base = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints", str(step))
        dest, n = base, 1
        while os.path.exists(dest):
            n += 1
            dest = f"{base}-{n}"
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.replace(src, dest)
        self._manager.reload()
        return dest

    def close(self) -> None:
        self._manager.close()


def _first_line(e: BaseException, width: int = 200) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = f"{type(e).__name__}: {text}"
    return text if len(text) <= width else text[: width - 3] + "..."
