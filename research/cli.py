"""The ``slimjax`` command line: ``run``, ``sweep``, ``tune``, ``nas``, ``report``, ``export``.

Examples::

    slimjax run configs/quickstart.py
    slimjax run configs/quickstart.py:smoke --set stages.train.steps=50 --workdir runs/try
    slimjax sweep configs/quickstart.py --grid stages.prune.sparsity=0.5,0.7,0.9 --grid seed=0,1
    slimjax sweep configs/quickstart.py --grid model.options.widths=[64],[128,64] --set stages.train.steps=300
    slimjax tune configs/tune_quickstart.py --trials 12 --objective val_accuracy:max --objective bytes:min
    slimjax nas configs/nas_mnist1d.py
    slimjax report runs/quickstart
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

# Heavy modules (JAX, Flax, TensorFlow, the stage plugins) are imported only where a command
# needs them, after its arguments and config were checked: a bad path, a syntax error, a
# malformed --set, a value out of its range or a misspelt registry name (config.check_values,
# against the names declared in research.names and methods.<package>.names) is reported before
# any of them loads. The config file imports the stage classes and rules it uses; the method
# packages export them from light modules (no JAX), so only a config that builds models itself
# (or imports the distill stage) loads JAX first. TensorFlow is never imported before training starts.


def _config_error(message: object) -> int:
    print(f"slimjax: config error: {message}", file=sys.stderr)
    return 2


def _load_config(args, grid=None):
    """``args.config`` with ``--set`` overrides applied and validated (and each value of a sweep's
    ``grid``, before JAX loads); None (after printing the error) when the config is invalid."""
    from research import config as config_lib  # standard library only

    try:
        for item in args.set or []:  # the form of every --set, before the config file runs
            if "=" not in item or not item.partition("=")[0].strip():
                raise config_lib.ConfigError(f"--set {item!r} is not of the form key=value (e.g. stages.0.steps=100)")
        with warnings.catch_warnings(record=True) as caught:  # deprecated spellings, shown once each
            warnings.simplefilter("always", DeprecationWarning)
            config = config_lib.load_config(args.config)
            config = config_lib.apply_overrides(config, args.set or [])
        for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)):
            print(f"slimjax: warning: {message}", file=sys.stderr)
        for w in caught:
            if not issubclass(w.category, DeprecationWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        config_lib.check_values(config)  # types, ranges and registry names: before JAX is imported
        if grid:
            config_lib.check_grid_values(config, grid)  # each --grid value on its own, before JAX too
        config_lib.register_all_stages()  # the stage plugins and their registries (imports JAX)
        config_lib.validate(config)
    except (config_lib.ConfigError, ValueError, KeyError, TypeError) as e:
        _config_error(e)
        return None
    return config


def _cmd_run(args) -> int:
    from research import config as config_lib
    from research import workdir as workdir_lib  # light: the standard library and research.config

    config = _load_config(args)
    if config is None:
        return 2
    from research import report as report_lib
    from research.run import run
    from research.store import StoreError
    from research.train import CheckpointReadError
    from research.train import MetricsFileError

    workdir = args.workdir or workdir_lib.default_workdir(config.name, args.set or [])
    if not args.workdir and args.set:
        print(f"slimjax: run directory {workdir} (the config with its --set overrides)", file=sys.stderr)
    try:
        report = run(config, workdir, progress=not args.no_progress, overwrite=args.overwrite)
    except (config_lib.ConfigError, workdir_lib.WorkdirInUseError, workdir_lib.RunFileError) as e:
        print(f"slimjax: {e}", file=sys.stderr)
        return 2
    except StoreError as e:  # e.g. a legacy result.pkl (never opened) or an unreadable stage result
        print(f"slimjax: {e}", file=sys.stderr)
        return 2
    except (CheckpointReadError, MetricsFileError) as e:  # the message names the file and the fix
        print(f"slimjax: {e}", file=sys.stderr)
        return 1
    print(report_lib.render(report))
    return 0


def _cmd_nas(args) -> int:
    """``slimjax nas CONFIG``: a run whose config has a ``nas`` stage, then the searched Pareto front."""
    config = _load_config(args)
    if config is None:
        return 2
    kinds = [getattr(s, "kind", None) for s in config.stages]
    if "nas" not in kinds:
        return _config_error(
            f"{args.config} has no nas stage (stages: {kinds}); add methods.nas.NASStage() first, "
            "with model.name one of the searchable families (e.g. conv1d_family)"
        )
    import json
    import pathlib

    from research import report as report_lib
    from research.run import run

    workdir = args.workdir or os.path.join("runs", config.name)
    report = run(config, workdir, progress=not args.no_progress)
    print(report_lib.render(report))
    for path in sorted(pathlib.Path(workdir, "stages").glob("*_nas/nas.json")):
        found = json.loads(path.read_text())
        front = sorted((r for r in found["candidates"] if r["pareto"]), key=lambda r: r["flops"])
        print(f"\nPareto front of {found['family']} ({len(front)} of {len(found['candidates'])} candidates, {path}):")
        for r in front:
            opts = " ".join(f"{k}={v}" for k, v in r.items() if k not in ("accuracy", "flops", "bytes", "pareto"))
            print(f"  val acc {r['accuracy']:.4f}  FLOPs {r['flops']:>10,.0f}  bytes {r['bytes']:>9,.0f}  {opts}")
        print("chosen: " + " ".join(f"{k}={v}" for k, v in found["chosen"].items()))
    return 0


class GridError(ValueError):
    """A ``--grid`` argument that is not ``KEY=V1,V2,...``."""


def _split_values(text: str) -> list[str]:
    """Splits ``text`` at commas outside brackets and quotes: ``[1,2],[3]`` -> ``["[1,2]", "[3]"]``."""
    items, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items]


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["a.b=1,2", "seed=0,1"]`` -> ``{"a.b": [1, 2], "seed": [0, 1]}`` (values by ``parse_value``).

    Raises:
      GridError: an item without ``=``, with an empty key or value, or a key given twice.
    """
    from research.config import parse_value

    form = "KEY=V1,V2,... (e.g. --grid stages.prune.sparsity=0.5,0.8)"
    grid: dict[str, list] = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise GridError(f"--grid {item!r} is not of the form {form}")
        values = _split_values(text)
        if not text.strip() or any(not v for v in values):
            raise GridError(f"--grid {item!r} has an empty value; expected {form}")
        if key in grid:
            raise GridError(f"--grid {item!r}: key {key!r} is given twice; list all its values in one --grid")
        grid[key] = [parse_value(v) for v in values]
    return grid


def _cmd_sweep(args) -> int:
    from research import config as config_lib
    from research import workdir as workdir_lib

    if not args.grid:
        print("slimjax: sweep needs at least one --grid KEY=V1,V2,...", file=sys.stderr)
        return 2
    try:
        grid = parse_grid(args.grid)
    except GridError as e:
        print(f"slimjax: {e}", file=sys.stderr)
        return 2
    config = _load_config(args, grid)
    if config is None:
        return 2
    from research.executors import close_executor
    from research.sweep import FILES as SWEEP_FILES
    from research.sweep import sweep

    workdir = args.workdir or workdir_lib.default_workdir(config.name, args.set or [], suffix="_sweep")
    executor = None
    try:
        executor = _executor(args)
        report = sweep(
            config, grid, workdir, progress=not args.no_progress, overwrite=args.overwrite, executor=executor
        )
    except config_lib.ConfigError as e:  # raised before any point runs
        return _config_error(e)
    except workdir_lib.WorkdirInUseError as e:
        print(f"slimjax: {e}", file=sys.stderr)
        return 2
    finally:
        if executor is not None and not isinstance(executor, str):
            close_executor(executor)
    print(report.table())
    written = [n for n in SWEEP_FILES if os.path.exists(os.path.join(workdir, n))]
    print(f"wrote {', '.join(written)} in {workdir}")
    for p in report.failed:
        print(f"slimjax: point {p.index} failed: {p.error}", file=sys.stderr)
    return 1 if report.failed else 0


def _cmd_tune(args) -> int:
    """``slimjax tune CONFIG --trials N ...``: a study over the config file's ``get_space()``."""
    from research import config as config_lib

    if _load_config(args) is None:  # values and names checked before JAX, as `slimjax run` does
        return 2
    from research import tune as tune_lib  # pylint: disable=import-outside-toplevel
    from research.executors import close_executor  # pylint: disable=import-outside-toplevel
    from research.run import register_all_stages  # pylint: disable=import-outside-toplevel

    register_all_stages()
    if args.workers > 1:  # K processes share the accelerator: none may grab most of its memory up front
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    executor = None
    try:
        config, space = tune_lib.load_config_and_space(args.config)
        config = config_lib.apply_overrides(config, args.set or [])
        config_lib.validate(config)
        executor = _executor(args)  # after the config loads: a config error does not wait for Ray
        workdir = args.workdir or os.path.join("runs", f"{config.name}_tune")
        result = tune_lib.tune(
            config,
            space,
            workdir,
            trials=args.trials,
            sampler=args.sampler,
            objectives=args.objective or ["val_accuracy:max"],
            constraints=args.constraint or [],
            budget_key=args.budget_key,
            scheduler=args.scheduler,
            min_budget=args.min_budget,
            eta=args.eta,
            workers=args.workers,
            executor=executor,
            seed=args.seed,
            reference=tune_lib.parse_reference(args.reference),
            config_spec=args.config,
            set_overrides=args.set or [],
            policies=tune_lib.load_policies(args.config),
            progress=not args.no_progress,
        )
    except (config_lib.ConfigError, ValueError, KeyError) as e:
        print(f"slimjax: config error: {e}", file=sys.stderr)
        return 2
    finally:
        if executor is not None and not isinstance(executor, str):
            close_executor(executor)
    print(result.table())
    print(f"wrote tune.json, tune.txt, plots and best/ in {workdir}")
    return 0 if any(t["state"] == "COMPLETE" for t in result.trials) else 1


def _cmd_report(args) -> int:
    from research import report as report_lib
    from research.workdir import RunFileError

    try:
        print(report_lib.render(report_lib.read_report(args.run_dir)))
    except RunFileError as e:
        print(f"slimjax: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_export(args) -> int:
    if not os.path.isdir(args.run_dir):
        print(
            f"slimjax: run directory {args.run_dir!r} does not exist; give a directory `slimjax run` wrote",
            file=sys.stderr,
        )
        return 2
    try:
        from research.export import export_run
    except ImportError as e:
        print(f"slimjax: export is unavailable: {e}", file=sys.stderr)
        return 2
    from research.config import ConfigError
    from research.store import StoreError
    from research.workdir import WorkdirInUseError
    from research.workdir import WorkdirLock

    try:
        with WorkdirLock(args.run_dir):  # it writes RUN_DIR/export: not while a run uses the directory
            report = export_run(args.run_dir, formats=tuple(args.to.split(",")), int8=args.int8, out_dir=args.out)
    except (StoreError, WorkdirInUseError) as e:  # a legacy result.pkl (never opened), unreadable files, a live run
        print(f"slimjax: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:  # a mistyped or unrunnable --to, refused before the run is loaded
        print(f"slimjax: export error: {e}", file=sys.stderr)
        return 2
    print(report.table() if hasattr(report, "table") else report)
    return 0


def _add_executor_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--executor",
        default="sequential",
        choices=["sequential", "population", "ray"],
        help="sequential: one run after another; population: runs sharing model and data train as one vmapped "
        "program, K at a time (K measured; falls back to sequential when vmap does not pay); ray: one Ray task "
        'per run, on a local Ray or a cluster (pip install "slimjax[ray]")',
    )
    p.add_argument(
        "--address",
        help="with --executor ray: 'auto' (the cluster `ray start --head` started on this machine) or HOST:PORT "
        "of a cluster's GCS; default: start a local Ray and shut it down at the end",
    )
    p.add_argument("--cpus-per-trial", type=float, help="with --executor ray: CPUs each run declares (default 1)")
    p.add_argument(
        "--gpus-per-trial", type=float, help="with --executor ray: GPUs each run declares, e.g. 1 or 0.5 (default 0)"
    )
    p.add_argument(
        "--population-chunk",
        type=int,
        metavar="K",
        help="with --executor population: train K runs per compiled program instead of measuring K (tune asks "
        "batches of K); with --executor ray (sweep): send K runs per Ray task, trained there by the population "
        "executor",
    )
    p.add_argument(
        "--measure-budget",
        type=_budget,
        default=_NOT_GIVEN,
        metavar="F|none",
        help="with --executor population: the most measuring K may cost, as a fraction of the estimated "
        "sequential training (default 0.1 on a CPU, 0.5 on a GPU/TPU); 'none' lifts the limit",
    )
    p.add_argument(
        "--overlap",
        action="store_true",
        help="with --executor population: compile each population's program in a background thread while its "
        "first trials train one after another, then time it against the sequential step for the rest (off by "
        "default: on a 2-core CPU the compile slowed the trials beside it as much as it took)",
    )


_NOT_GIVEN = object()  # --measure-budget's default ('none' is a value: no budget)


def _budget(value: str) -> float | None:
    """``--measure-budget``: a fraction >= 0, or ``none``."""
    if value.strip().lower() == "none":
        return None
    try:
        fraction = float(value)
    except ValueError:
        fraction = -1.0
    if not fraction >= 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a fraction >= 0 (e.g. 0.1) or 'none'")
    return fraction


def _executor(args):
    """``args.executor``, the population executor built from ``--population-chunk``/``--measure-budget``,
    or the Ray executor built from the ``--address``/``--*-per-trial``/``--population-chunk`` flags."""
    from research import config as config_lib
    from research.executors import make_executor

    ray_only = {
        "address": args.address,
        "cpus_per_trial": args.cpus_per_trial,
        "gpus_per_trial": args.gpus_per_trial,
    }
    given = {k: v for k, v in ray_only.items() if v is not None}
    chunk, budget, overlap = args.population_chunk, args.measure_budget, args.overlap
    if overlap and args.executor != "population":
        raise config_lib.ConfigError(
            f"--overlap applies only to --executor population (got --executor {args.executor})"
        )
    if overlap and args.command == "tune":
        raise config_lib.ConfigError(
            "--overlap applies to sweep: tune measures K before it asks the sampler for a batch of that size"
        )
    if overlap and chunk is not None:
        raise config_lib.ConfigError(
            "--overlap compiles the program of a measured K in the background, and --population-chunk fixes K: "
            "give one of them"
        )
    if chunk is not None and chunk < 1:
        raise config_lib.ConfigError(f"--population-chunk {chunk} must be >= 1")
    if budget is not _NOT_GIVEN and args.executor != "population":
        raise config_lib.ConfigError(
            f"--measure-budget applies only to --executor population (got --executor {args.executor})"
        )
    if chunk is not None and args.executor not in ("population", "ray"):
        raise config_lib.ConfigError(
            f"--population-chunk applies only to --executor population or ray (got --executor {args.executor})"
        )
    if args.executor != "ray":
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            verb = "apply" if len(given) > 1 else "applies"
            raise config_lib.ConfigError(f"{flags} {verb} only to --executor ray (got --executor {args.executor})")
        if args.executor != "population" or (chunk is None and budget is _NOT_GIVEN and not overlap):
            return args.executor
        if chunk is not None and budget is not _NOT_GIVEN:
            raise config_lib.ConfigError(
                "--population-chunk fixes K, so nothing is measured: give --measure-budget or --population-chunk, "
                "not both"
            )
        options: dict = {"chunk_size": chunk} if chunk is not None else {"overlap": overlap}
        if budget is not _NOT_GIVEN:
            options["measure_budget"] = budget
        return make_executor("population", **options)
    if args.command == "tune" and chunk is not None:
        raise config_lib.ConfigError(
            "--population-chunk applies to sweep; tune --executor ray asks one trial per free Ray slot "
            "(use tune --executor population on one machine)"
        )
    if chunk is not None:
        given["population_chunk"] = chunk
    return make_executor("ray", **given).start()  # a bad --address fails here, before anything is written


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``slimjax`` console script."""
    parser = argparse.ArgumentParser(prog="slimjax", description="Make neural networks small and fast (JAX).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a config's stages and write a run directory")
    p.add_argument("config", help="path/to/config.py[:arg]")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--workdir", help="run directory (default runs/<config name>[-<hash of the --set overrides>])")
    p.add_argument("--overwrite", action="store_true", help="delete the run the workdir holds and start over")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(fn=_cmd_run)

    p = sub.add_parser("sweep", help="run a config once per point of a grid of overrides")
    p.add_argument("config", help="path/to/config.py[:arg]")
    p.add_argument(
        "--grid", action="append", metavar="KEY=V1,V2,...", help="values of one override key (repeatable; product)"
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field for every point")
    p.add_argument("--workdir", help="sweep directory (default runs/<config name>[-<hash of --set>]_sweep)")
    p.add_argument("--overwrite", action="store_true", help="delete the sweep the workdir holds and start over")
    _add_executor_flag(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(fn=_cmd_sweep)

    p = sub.add_parser("tune", help="tune a config over its get_space() with a Study (one run per trial)")
    p.add_argument("config", help="path/to/config.py[:arg] defining get_config() and get_space()")
    p.add_argument("--trials", type=int, required=True, help="number of configurations to try")
    p.add_argument(
        "--sampler",
        default="tpe",
        help="a registered sampler: gp, tpe, bohb, random, sobol (qmc), ehvi, motpe, evolution, or one the config's modules register",
    )
    p.add_argument(
        "--objective", action="append", metavar="METRIC:max|min", help="val_accuracy:max (default), bytes:min, ..."
    )
    p.add_argument("--constraint", action="append", metavar="METRIC<=X", help="e.g. bytes<=20000 (repeatable)")
    p.add_argument(
        "--reference",
        help="hypervolume reference: baseline (default: the config's own metrics, one extra run), nadir, or METRIC=V,...",
    )
    p.add_argument("--budget-key", help="--set key a scheduler varies, e.g. stages.train.steps")
    p.add_argument("--scheduler", choices=["asha", "hyperband"], help="multi-fidelity scheduler")
    p.add_argument("--min-budget", type=float, help="smallest budget (default: full / eta^2)")
    p.add_argument("--eta", type=int, default=3, help="the scheduler's halving factor")
    p.add_argument("--workers", type=int, default=1, help="local processes running trials at once")
    _add_executor_flag(p)
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field for every trial")
    p.add_argument("--workdir", help="study directory (default runs/<config name>_tune); a rerun resumes it")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(fn=_cmd_tune)

    p = sub.add_parser("nas", help="run a config with a nas stage and print the searched Pareto front")
    p.add_argument("config", help="path/to/config.py[:arg]")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--workdir", help="run directory (default runs/<config name>)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(fn=_cmd_nas)

    p = sub.add_parser("report", help="print the report of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(fn=_cmd_report)

    p = sub.add_parser("export", help="export a finished run's model (StableHLO, TFLite, ONNX)")
    p.add_argument("run_dir")
    p.add_argument("--to", default="stablehlo,tflite,onnx", help="comma-separated formats")
    p.add_argument("--int8", action="store_true", help="full-integer int8 with the run's calibration data")
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/export)")
    p.set_defaults(fn=_cmd_export)

    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
