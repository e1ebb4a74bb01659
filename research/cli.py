"""The ``slimjax`` command line: ``run``, ``report``, ``export``.

Examples::

    slimjax run configs/quickstart.py
    slimjax run configs/quickstart.py:smoke --set stages.train.steps=50 --workdir runs/try
    slimjax report runs/quickstart
"""

from __future__ import annotations

import argparse
import os
import sys


def _cmd_run(args) -> int:
    from research import config as config_lib
    from research import report as report_lib
    from research.run import register_all_stages
    from research.run import run

    register_all_stages()
    try:
        config = config_lib.load_config(args.config)
        config = config_lib.apply_overrides(config, args.set or [])
        config_lib.validate(config)
    except (config_lib.ConfigError, ValueError, KeyError, TypeError) as e:
        print(f"slimjax: config error: {e}", file=sys.stderr)
        return 2
    workdir = args.workdir or os.path.join("runs", config.name)
    report = run(config, workdir, progress=not args.no_progress)
    print(report_lib.render(report))
    return 0


def _cmd_report(args) -> int:
    import json

    from research import report as report_lib

    path = os.path.join(args.run_dir, "report.json")
    if not os.path.exists(path):
        print(f"slimjax: no report.json in {args.run_dir}", file=sys.stderr)
        return 2
    with open(path) as f:
        print(report_lib.render(json.load(f)))
    return 0


def _cmd_export(args) -> int:
    try:
        from research.export import export_run
    except ImportError as e:
        print(f"slimjax: export is unavailable: {e}", file=sys.stderr)
        return 2
    report = export_run(args.run_dir, formats=tuple(args.to.split(",")), int8=args.int8, out_dir=args.out)
    print(report.table() if hasattr(report, "table") else report)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``slimjax`` console script."""
    parser = argparse.ArgumentParser(prog="slimjax", description="Make neural networks small and fast (JAX).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a config's stages and write a run directory")
    p.add_argument("config", help="path/to/config.py[:arg]")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--workdir", help="run directory (default runs/<config name>)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(fn=_cmd_run)

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
