"""The run executor: a config's stages in order, with per-stage checkpoints and a report.

Run directory layout::

    WORKDIR/config.json            the resolved config the run used
    WORKDIR/stages/<i>_<kind>/     each stage's checkpoints/, metrics.jsonl and artifacts
    WORKDIR/stages/<i>_<kind>/result/      the finished stage as data (research.store): recipe.json,
                                           state.npz, extras.json/.npz, record.json; never a pickle
    WORKDIR/report.json, report.txt, curves.png

A killed run started again with the same config and workdir skips the finished stages
(loading their models) and resumes the interrupted stage from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

import flax
import jax
from flax import nnx

from research import config as config_lib
from research import recipe as recipe_lib
from research import report as report_lib
from research import store
from research.data import load_dataset
from research.nn import build_model
from research.stages import Bundle
from research.stages import StageContext
from research.stages import get_stage
from research.stages import measure


def register_all_stages() -> None:
    """Imports ``methods`` (and ``research.export`` when present) so their stages register."""
    import importlib

    for name in ("methods", "research.export"):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name not in (name, name.split(".")[0]):
                raise


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


def run(config: config_lib.Config, workdir: str, *, progress: bool = True, echo: bool = True) -> dict[str, Any]:
    """Runs every stage of ``config`` in ``workdir`` and returns the report dict.

    Raises:
      ConfigError: the config is invalid, or ``workdir`` holds a run of a different config.
    """
    register_all_stages()
    config_lib.validate(config)
    os.makedirs(workdir, exist_ok=True)
    cfg_path = os.path.join(workdir, "config.json")
    cfg_json = config_lib.to_json(config)
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            if f.read().strip() != cfg_json.strip():
                raise config_lib.ConfigError(
                    f"{workdir} holds a run of a different config; use a new --workdir or delete it to start over"
                )
    else:
        with open(cfg_path, "w") as f:
            f.write(cfg_json + "\n")

    bundle = build_bundle(config)
    report: dict[str, Any] = {
        "name": config.name,
        "workdir": os.path.abspath(workdir),
        "environment": environment(),
        "stages": [],
    }
    stage_dirs = []
    for i, stage_cfg in enumerate(config.stages):
        label = f"{i}_{stage_cfg.kind}"
        sdir = os.path.join(workdir, "stages", label)
        os.makedirs(sdir, exist_ok=True)
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
            _, fn = get_stage(stage_cfg.kind)
            ctx = StageContext(
                index=i, label=label, workdir=__import__("pathlib").Path(sdir), seed=config.seed, progress=progress
            )
            t0 = time.perf_counter()
            result = fn(bundle, stage_cfg, ctx)
            seconds = time.perf_counter() - t0
            bundle = result.bundle
            measured = measure(bundle.model, bundle.dataset, latency_batch_size=config.latency_batch_size)
            measured.update(result.metrics)
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
                "notes": result.notes,
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
        report["stages"].append(record)
        report_lib.write_report(workdir, report)
    plot = report_lib.plot_curves(workdir, stage_dirs)
    report["plots"] = [plot] if plot else []
    report_lib.write_report(workdir, report)
    return report


def load_run(workdir: str) -> tuple[dict[str, Any], nnx.Module, dict[str, Any]]:
    """``(report, final_model, extras)`` of a finished run directory.

    The model is rebuilt from the last stage's stored recipe and arrays (:mod:`research.store`);
    nothing in the directory is executed.

    Raises:
      FileNotFoundError: no finished stage in ``workdir``.
      research.store.StoreError: a legacy ``result.pkl`` (rerun) or unreadable stage files.
    """
    with open(os.path.join(workdir, "report.json")) as f:
        report = json.load(f)
    if not report["stages"]:
        raise FileNotFoundError(f"{workdir} has no finished stage")
    saved = load_stage(workdir, report["stages"][-1]["label"])
    return report, saved.model, saved.extras


def load_stage(workdir: str, label: str) -> store.StageData:
    """The stored result of stage ``label`` (e.g. ``"1_prune"``) of a run directory.

    Raises:
      research.store.StoreError: the stage has not finished, is a legacy pickle, or is unreadable.
    """
    register_all_stages()  # methods register their recipe steps on import
    return store.load_stage(os.path.join(workdir, "stages", label))


def load_run_config(workdir: str) -> dict[str, Any]:
    """The config a run used, as the dict stored in ``config.json``."""
    with open(os.path.join(workdir, "config.json")) as f:
        return json.load(f)
