"""`dualbench export RUN_DIR` / `dualbench export --models M --out DIR`: artifacts, verification, serving.

RUN_DIR: every ok run's final weights (no retraining) -> RUN_DIR/export/ (artifacts per run,
deployment.csv/.json, cross_framework.csv, latency.png) and a Deployment section in
RUN_DIR/report.md/.html. --models: fresh models (initial weights) -> DIR/. Exit codes: 0 every
produced artifact verified (and, with --strict, every format produced and served); 1 otherwise;
2 bad input; 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import datetime, timezone
from typing import Any

from common.config import INIT_SCHEMES
from common.errors import ConfigError, UserError
from compare import options

SERVE_CHOICES = ("first", "all", "none")


def register(parser: argparse.ArgumentParser) -> None:
    """Options of `dualbench export`."""
    from common.deploy import FORMAT_NAMES

    p = parser.add_argument
    p("run_dir", nargs="?", help="results folder of a `dualbench run` (exports its ok runs' final weights)")
    p("--models", help="export fresh models instead (initial weights), e.g. resnet20; needs --out "
                       "(default: none, export RUN_DIR)")
    p("--backends", default="torch,tensorflow", help="backends for --models (default torch,tensorflow)")
    p("--out", help="folder for --models exports (default: none; RUN_DIR/export for a results folder)")
    p("--data", help="--models: verify on this dataset SPEC's test split (default: generated normalised images)")
    p("--test-subset", type=int, help="--models with --data: stratified test subset size, images (default: all)")
    p("--in-shape", default="32,32,3",
      help="--models without --data: H,W,C of the generated images, pixels and channels (default 32,32,3)")
    p("--images", type=int, default=256, help="--models without --data: generated images (default 256)")
    p("--seeds", type=int, default=0, help="--models: seed of the initial weights and generated images, one "
                                           "value (default 0)")
    options.add_alias(parser, "--seed", "--seeds", type=int)
    p("--init", default="torch_default", choices=INIT_SCHEMES,
      help="--models: initial-weights scheme (default torch_default)")
    p("--formats", help=f"comma-separated subset of: {', '.join(FORMAT_NAMES)} (default: all)")
    p("--threads", type=int, help="intra-op threads of every runtime (default: all usable cores)")
    p("--seconds", type=float, default=1.0, help="timed seconds per batch size per serving process (default 1)")
    p("--rounds", type=int, default=2, help="serving processes per artifact, ABBA order (default 2)")
    p("--batch-size", type=int, default=64, help="serving throughput batch size, images (default 64)")
    options.add_alias(parser, "--batch", "--batch-size", type=int)
    p("--serve", choices=SERVE_CHOICES, default="first",
      help="which jobs' artifacts are timed: the lowest seed per model and backend (default), all, none")
    p("--jobs", type=int, default=1,
      help="worker processes at once while exporting and verifying (default 1; serving is always one at a time)")
    p("--timeout", type=float, default=1800.0, help="seconds per worker process (default 1800)")
    p("--strict", action="store_true",
      help="exit 1 when a format could not be produced or served (default: only mismatches fail)")
    p("--json", action="store_true", help="print deployment.json to stdout instead of tables (default: tables)")


def _positive(name: str, value: float | int | None) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"{name} must be positive, got {value:g}")


def _settings(args: argparse.Namespace) -> Any:
    from common.deploy import FORMAT_NAMES
    from common.manifest import usable_cores
    from compare.export import ExportSettings

    for name in ("threads", "seconds", "rounds", "batch_size", "timeout", "images", "test_subset", "jobs"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    formats = None
    if args.formats:
        formats = [f.strip() for f in args.formats.split(",") if f.strip()]
        unknown = [f for f in formats if f not in FORMAT_NAMES]
        if unknown or not formats:
            named = ", ".join(unknown) if unknown else repr(args.formats)
            raise ConfigError(f"unknown --formats {named}; choose from: {', '.join(FORMAT_NAMES)}")
    return ExportSettings(threads=args.threads or usable_cores(), seconds=args.seconds, rounds=args.rounds,
                          batch=args.batch_size, timeout_s=args.timeout, formats=formats, serve=args.serve != "none",
                          jobs=args.jobs)


def _check_mode(args: argparse.Namespace) -> None:
    if args.run_dir and args.models:
        raise ConfigError("give a results folder or --models, not both")
    if not args.run_dir and not args.models:
        raise ConfigError("nothing to export: give a results folder (dualbench export results/x) or "
                          "--models NAME --out DIR")
    if args.models and not args.out:
        raise ConfigError("--models needs --out DIR (where the artifacts go)")
    if args.run_dir and args.out:
        raise ConfigError("--out is for --models; a results folder's exports go to RUN_DIR/export")


def _fresh(args: argparse.Namespace, exporter: Any) -> list[Any]:
    from common.registry import parse_models
    from compare.export_plan import fresh_jobs
    from compare.options import parse_backends, parse_in_shape

    backends = parse_backends(args.backends)
    unknown = [b for b in backends if b not in ("torch", "tensorflow")]
    if unknown:
        raise ConfigError(f"--backends {','.join(unknown)} has no export formats; use torch and/or tensorflow")
    return fresh_jobs(parse_models(args.models), backends, exporter, seed=args.seeds, init_scheme=args.init,
                      data=args.data, test_subset=args.test_subset, in_shape=parse_in_shape(args.in_shape),
                      image_count=args.images)


def _command(args: argparse.Namespace) -> str:
    words = ["dualbench", "export"] + ([args.run_dir] if args.run_dir else [])
    defaults = vars(build_defaults())
    for name, value in vars(args).items():
        if name in ("command", "run_dir") or value == defaults.get(name):
            continue
        flag = "--" + name.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return shlex.join(words)


def build_defaults() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser)
    return parser.parse_args([])


def _deployment(args: argparse.Namespace, settings: Any, results: dict[str, Any]) -> dict[str, Any]:
    from common.deploy import CROSS_RTOL, LITERT_RTOL, MIN_TOP1_AGREEMENT, NATIVE_RTOL

    return {"schema_version": 1, "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": _command(args), "source": args.run_dir or "fresh models",
            "settings": {"threads": settings.threads, "seconds": settings.seconds, "rounds": settings.rounds,
                         "batch": settings.batch, "warmup": settings.warmup, "serve": args.serve,
                         "native_rtol": NATIVE_RTOL, "litert_rtol": LITERT_RTOL, "cross_rtol": CROSS_RTOL,
                         "min_top1_agreement": MIN_TOP1_AGREEMENT},
            **results}


def main(args: argparse.Namespace) -> int:
    """Plan, export, verify, serve, write; returns the exit code."""
    from pathlib import Path

    from compare.export import Exporter
    from compare.export_plan import run_jobs, serving_subset
    from compare.store import ResultsStore

    _check_mode(args)
    settings = _settings(args)
    store = ResultsStore(args.run_dir or args.out)
    if args.run_dir and not store.root.is_dir():
        raise UserError(f"{store.root} is not a results folder: pass the --out of a `dualbench run`")
    store.ensure_writable()
    with store.exclusive():
        exporter = Exporter(store.root / "export" if args.run_dir else store.root, settings)
        try:
            jobs = run_jobs(store, exporter) if args.run_dir else _fresh(args, exporter)
            serving_subset(jobs, args.serve)
            deployment = _deployment(args, settings, exporter.run(jobs))
        finally:
            exporter.close()
        written = _write(store, Path(exporter.root), deployment, rerender=bool(args.run_dir))
    _print(deployment, written, as_json=args.json)
    return _exit_code(deployment, args.strict)


def _write(store: Any, root: Any, deployment: dict[str, Any], rerender: bool) -> list[Any]:
    from compare.deployment import write_outputs

    written = write_outputs(root, deployment)
    if rerender and store.runs_path.exists():
        from compare.report import render_all

        written += [p for p in render_all(store) if p.name.startswith("report.")]
    return written


def _exit_code(deployment: dict[str, Any], strict: bool) -> int:
    rows = deployment["rows"]
    wrong = [r for r in rows if r["status"] in ("mismatch", "unloadable")]
    wrong += [c for c in deployment["cross_framework"] if not c["passed"]]
    missing = [r for r in rows if r["status"] == "failed" or r.get("serve_error")]
    return 1 if wrong or (strict and missing) else 0


def _print(deployment: dict[str, Any], written: list[Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(deployment, indent=2, sort_keys=True))
        return
    from compare.deployment import cross_table, failed_rows, serving_table, verification_table
    from compare.tables import to_text

    print("\nVerification (artifact logits vs the framework's own eval logits):")
    print(to_text(verification_table(deployment).drop(columns=["exporter"])))
    cross = cross_table(deployment)
    if not cross.empty:
        print("\ntorch's ONNX vs TensorFlow's ONNX from the same weights (ONNX Runtime):")
        print(to_text(cross))
    serving = serving_table(deployment)
    if not serving.empty:
        print("\nServing (CPU):")
        print(to_text(serving))
    for row in failed_rows(deployment):
        print(f"{row['status']}: {row['label']} {row['format']}: {row['error']}", file=sys.stderr)
    print("\nWritten:")
    for path in written:
        print(f"  {path}")
