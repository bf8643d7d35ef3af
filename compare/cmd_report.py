"""`dualbench report OUT`: re-render tables, plots and report.md/.html from OUT/runs.jsonl alone."""
from __future__ import annotations

import argparse

from common.errors import UserError


def register(parser: argparse.ArgumentParser) -> None:
    """Options of `dualbench report`."""
    parser.add_argument("out", help="results folder written by `dualbench run` (holds runs.jsonl)")


def main(args: argparse.Namespace) -> int:
    """Re-render everything; exit 2 when there is nothing to render."""
    from compare.report import render_and_print  # pandas / matplotlib: not needed to build the parser
    from compare.store import ResultsStore

    store = ResultsStore(args.out)
    if not store.root.is_dir():
        raise UserError(f"{store.root} is not a results folder: pass the --out of a `dualbench run`")
    if not store.runs_path.exists():
        raise UserError(f"{store.runs_path} not found: pass the --out folder of a `dualbench run`")
    render_and_print(store)
    return 0
