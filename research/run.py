"""The run executor: a config's stages in order, with per-stage checkpoints and a report.

Run directory layout::

    WORKDIR/config.json            the resolved config the run used
    WORKDIR/stages/<i>_<kind>/     each stage's checkpoints/, metrics.jsonl and artifacts
    WORKDIR/stages/<i>_<kind>/result/      the finished stage as data (research.store): recipe.json,
                                           state.npz, extras.json/.npz, record.json; never a pickle
    WORKDIR/stages/<i>_<kind>/key.json     the hash of the config prefix that made the stage
    WORKDIR/replaced/<i>_<kind>-<key>/     stages set aside after their config changed
    WORKDIR/.lock                          held by the process running in the directory
    WORKDIR/report.json, report.txt, curves.png

A killed run started again with the same config and workdir skips the finished stages
(loading their models) and resumes the interrupted stage from its last checkpoint. Started with
a config whose later stages changed, it reuses the unchanged prefix and reruns from the first
changed stage (see :mod:`research.workdir`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import flax
import jax
from flax import nnx

from research import config as config_lib
from research import constraints as constraints_lib
from research import recipe as recipe_lib
from research import report as report_lib
from research import store
from research import workdir as workdir_lib
from research.config import register_all_stages
from research.data import load_dataset
from research.metrics import measure
from research.nn import build_model
from research.stages import Bundle
from research.stages import StageContext
from research.stages import StageFn
from research.stages import get_stage


def load_data(config: config_lib.Config):
    """The data set of ``config`` (split by ``config.seed``)."""
    return load_dataset(
        config.data.name,
        seed=config.seed,
        val_fraction=config.data.val_fraction,
        test_fraction=config.data.test_fraction,
        limit=config.data.limit,
        **dict(config.data.options),
    )


def build_bundle(config: config_lib.Config) -> Bundle:
    """Loads the data set and builds the (untrained) model of ``config``."""
    ds = load_data(config)
    model = build_model(
        config.model.name,
        input_shape=ds.input_shape,
        num_classes=ds.num_classes,
        rngs=nnx.Rngs(config.seed),
        **dict(config.model.options),
    )
    recipe = (
        recipe_lib.zoo_step(config.model.name, dict(config.model.options), ds.input_shape, ds.num_classes, config.seed),
    )
    return Bundle(model=model, dataset=ds, seed=config.seed, recipe=recipe)


def environment() -> dict[str, Any]:
    """Where the run executes: versions, the JAX backend and the device's name.

    Throughput figures in the report (``train_steps_per_s``, latencies) are only comparable on
    the same device, so the report records it (e.g. ``"NVIDIA H100 80GB HBM3"``, or ``"cpu"``).
    """
    dev = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "python": sys.version.split()[0],
        "backend": jax.default_backend(),
        "device": dev.device_kind,
        "device_count": jax.device_count(),
    }


@dataclasses.dataclass(frozen=True)
class RunHooks:
    """Work a caller running many trials does for :func:`run` (the population executor; the
    sequential one gives its trials a kept figure for ``plot``).

    Attributes:
      bundle: returns the run's untrained bundle (data set and model), in place of
        :func:`build_bundle` (the population has built it already).
      measure: ``(stage index, model, dataset, latency_batch_size) -> metrics``, in place of
        :func:`research.metrics.measure` (the population measures its trials together).
      plot: ``(workdir, [(label, stage dir)]) -> PNG path or None``, in place of
        :func:`research.report.plot_curves` (the same plot, drawn on a reused figure:
        :class:`research.report.CurvePlotter`).
    """

    bundle: Callable[[], Bundle] | None = None
    measure: Callable[[int, nnx.Module, Any, int], dict[str, Any]] | None = None
    plot: Callable[[str, list[tuple[str, str]]], str | None] | None = None


def run(
    config: config_lib.Config,
    workdir: str,
    *,
    progress: bool = True,
    echo: bool = True,
    overwrite: bool = False,
    prepared: Mapping[int, StageFn] | None = None,
    hooks: RunHooks | None = None,
) -> dict[str, Any]:
    """Runs every stage of ``config`` in ``workdir`` and returns the report dict.

    The workdir is locked for the whole run (:class:`research.workdir.WorkdirLock`). Stages are
    reused by content: a stage directory whose key (a hash of the config up to and including that
    stage, see :func:`research.workdir.stage_keys`) matches is loaded, or resumed from its
    checkpoints if it was interrupted; from the first changed stage on, the earlier results are
    moved to ``WORKDIR/replaced/`` and the stages run again.

    Args:
      config: the experiment.
      workdir: the run directory.
      progress: show progress bars.
      echo: print one line per stage (and what was reused or moved aside) to stderr.
      overwrite: delete the run that ``workdir`` holds first (``slimjax run --overwrite``).
      prepared: ``{stage index: stage function}`` replacing the registered function of those stages
        (the population executor hands over models it trained); measured, stored and reported as
        any stage.
      hooks: work done for many runs at once by the caller (:class:`RunHooks`; the population
        executor's shared bundle, batched measurement and plotting).

    Raises:
      ConfigError: the config is invalid, or ``workdir`` holds a run whose first stage, data, model
        or seed differ (and ``overwrite`` is false).
      WorkdirInUseError: another process is running in ``workdir``.
    """
    register_all_stages()
    config_lib.validate(config)
    with workdir_lib.WorkdirLock(workdir):
        if overwrite:
            removed = workdir_lib.clear(workdir, markers=("config.json", workdir_lib.STAGES_DIR))
            if removed and echo:
                print(f"overwrite: deleted {', '.join(removed)} in {workdir}", file=sys.stderr)
        for note in workdir_lib.reconcile(workdir, config):
            if echo:
                print(note, file=sys.stderr)
        return _run_stages(config, workdir, progress=progress, echo=echo, prepared=prepared or {}, hooks=hooks)


def _run_stages(
    config: config_lib.Config,
    workdir: str,
    *,
    progress: bool,
    echo: bool,
    prepared: Mapping[int, StageFn] | None = None,
    hooks: RunHooks | None = None,
) -> dict[str, Any]:
    """The stages of :func:`run`, with the lock held and the stage directories reconciled."""
    hooks = hooks or RunHooks()
    bundle = hooks.bundle() if hooks.bundle is not None else build_bundle(config)
    report: dict[str, Any] = {
        "name": config.name,
        "workdir": os.path.abspath(workdir),
        "environment": environment(),
        "stages": [],
    }
    stage_dirs = []
    keys = workdir_lib.stage_keys(config)
    for i, stage_cfg in enumerate(config.stages):
        label = f"{i}_{stage_cfg.kind}"
        sdir = os.path.join(workdir, "stages", label)
        for note in workdir_lib.prepare_stage_dir(workdir, label, keys[i], workdir_lib.stage_prefix(config, i)):
            if echo:
                print(note, file=sys.stderr)
        stage_dirs.append((label, sdir))
        done_path = store.result_dir(sdir)
        if store.is_finished(sdir):
            saved = store.load_stage(sdir)
            bundle = dataclasses.replace(bundle, model=saved.model, extras=saved.extras, recipe=saved.recipe)
            record = saved.record
            if echo:
                print(f"[{label}] finished earlier; loaded from {done_path}", file=sys.stderr)
        else:
            previous = (bundle.model, report["stages"][-1]["metrics"] if report["stages"] else {})
            fn = (prepared or {}).get(i) or get_stage(stage_cfg.kind)[1]
            ctx = StageContext(
                index=i, label=label, workdir=__import__("pathlib").Path(sdir), seed=config.seed, progress=progress
            )
            t0 = time.perf_counter()
            result = fn(bundle, stage_cfg, ctx)
            seconds = time.perf_counter() - t0
            base = bundle.extras if result.base_extras is None else result.base_extras
            zeros_before = constraints_lib.weight_sparsity(_state(previous[0]))
            bundle = result.bundle
            state_after = _state(bundle.model)
            schedule = getattr(stage_cfg, "train", stage_cfg)
            released = getattr(schedule, "keep_constraints", True) is False
            extras, constraint_rows = constraints_lib.check_stage(
                label, base, bundle.extras, state_after, released=released
            )
            bundle = dataclasses.replace(bundle, extras=extras)
            zeros_after = constraints_lib.weight_sparsity(state_after)
            measure_fn = hooks.measure or _measure
            measured = measure_fn(i, bundle.model, bundle.dataset, config.latency_batch_size)
            measured.update(result.metrics)
            measured["weight_sparsity_before"] = zeros_before[0] / max(zeros_before[1], 1)
            measured["weight_sparsity_after"] = zeros_after[0] / max(zeros_after[1], 1)
            for key in ("params", "nonzeros"):
                measured[key] = int(measured[key])
            if bundle.model is previous[0]:  # the stage left the model as it was (e.g. export)
                measured = {**{k: v for k, v in previous[1].items() if k not in measured}, **measured}
            record = {
                "label": label,
                "kind": stage_cfg.kind,
                "config": config_lib.to_dict(stage_cfg),
                "seconds": seconds,
                "metrics": measured,
                "tables": result.tables,
                "artifacts": result.artifacts,
                "notes": [
                    *result.notes,
                    *(
                        f"WARNING: {r['status']} the {r['constraint']} constraint of {r['declared_by']}: {r['detail']}"
                        for r in constraint_rows
                        if r["status"] != "kept"
                    ),
                ],
                "constraints": constraint_rows,
                "declares": sorted(
                    k for k, v in constraints_lib.declared(bundle.extras).items() if v.get("stage") == label
                ),
            }
            store.save_stage(sdir, model=bundle.model, extras=bundle.extras, record=record, recipe=bundle.recipe)
            if echo:
                m = record["metrics"]
                print(
                    f"[{label}] done in {seconds:.1f}s: test acc {m['test_accuracy']:.4f}, "
                    f"params {m['params']:,}, non-zeros {m['nonzeros']:,}, bytes {report_lib.best_bytes(m):,.0f}",
                    file=sys.stderr,
                )
        bundle.models[label] = bundle.model
        bundle.models[stage_cfg.kind] = bundle.model
        bundle.recipes[label] = bundle.recipes[stage_cfg.kind] = bundle.recipe
        bundle.stage_extras[label] = bundle.stage_extras[stage_cfg.kind] = bundle.extras
        report["stages"].append(record)
        report_lib.write_report(workdir, report)
    plot = (hooks.plot or report_lib.plot_curves)(workdir, stage_dirs)
    report["plots"] = [plot] if plot else []
    report_lib.write_report(workdir, report)
    return report


def _measure(index: int, model: nnx.Module, dataset, latency_batch_size: int) -> dict[str, Any]:
    del index
    return measure(model, dataset, latency_batch_size=latency_batch_size)


def _state(model: nnx.Module) -> dict[str, Any]:
    """The model's variables (params and the rest) as nested dicts."""
    return nnx.to_pure_dict(nnx.state(model))


def load_run(workdir: str) -> tuple[dict[str, Any], nnx.Module, dict[str, Any]]:
    """``(report, final_model, extras)`` of a finished run directory.

    The model is rebuilt from the last stage's stored recipe and arrays (:mod:`research.store`);
    nothing in the directory is executed. The directory's lock is held shared while reading
    (:class:`research.workdir.WorkdirLock`), so a run still writing it is refused, not half-read.

    Raises:
      FileNotFoundError: no finished stage in ``workdir``.
      RunFileError: ``report.json`` is missing or unreadable (the message names it and the fix).
      research.store.StoreError: a legacy ``result.pkl`` (rerun) or unreadable stage files.
      WorkdirInUseError: a live process is running in ``workdir``.
    """
    with workdir_lib.WorkdirLock(workdir, shared=True):  # not while a run writes it
        report = report_lib.read_report(workdir)
        if not report["stages"]:
            raise FileNotFoundError(f"{workdir} has no finished stage")
        saved = load_stage(workdir, report["stages"][-1]["label"])
    return report, saved.model, saved.extras


def load_stage(workdir: str, label: str) -> store.StageData:
    """The stored result of stage ``label`` (e.g. ``"1_prune"``) of a run directory.

    Raises:
      research.store.StoreError: the stage has not finished, is a legacy pickle, or is unreadable.
    """
    register_all_stages()  # the stage plugins register their recipe steps on import
    return store.load_stage(os.path.join(workdir, "stages", label))


def load_run_config(workdir: str) -> dict[str, Any]:
    """The config a run used, as the dict stored in ``config.json``.

    Raises:
      RunFileError: ``config.json`` is missing or unreadable (the message names it and the fix).
    """
    return workdir_lib.read_json(
        os.path.join(workdir, "config.json"),
        fix=f"is {workdir} a slimjax run directory? Rerunning its config with --workdir {workdir} rewrites it",
    )
