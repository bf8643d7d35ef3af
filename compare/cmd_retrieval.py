"""`dualbench retrieval OUT`: image retrieval with every finished run's final weights (compare.retrieval)."""
from __future__ import annotations

import argparse

from common.errors import UserError


def register(parser: argparse.ArgumentParser) -> None:
    """Options of `dualbench retrieval`."""
    parser.add_argument("out", help="results folder of a `dualbench run` (runs.jsonl and weights/); required")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per retrieval worker before it is killed (default: no limit)")


def main(args: argparse.Namespace) -> int:
    """Embed, score, write retrieval.json/.csv and re-render the report; 1 if some run could not be scored."""
    from compare.report import render_and_print
    from compare.retrieval import final_weights, run_retrieval
    from compare.store import ResultsStore

    store = ResultsStore(args.out)
    if not store.runs_path.exists():
        raise UserError(f"{store.runs_path} not found: pass the --out folder of a `dualbench run`")
    if args.timeout is not None and args.timeout <= 0:
        raise UserError(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
    with store.exclusive():
        results = store.load_runs()
        if not any(r.status == "ok" and final_weights(store, r) for r in results):
            raise UserError(f"no run in {store.root} has its final weights (weights/<run_id>.npz): rerun "
                            f"`dualbench run --out {store.root} --force ...` with this version of dualbench")
        tables = run_retrieval(store, results, timeout_s=args.timeout)
        render_and_print(store)
    failed = tables["retrieval"]["status"].ne("ok").any() or not tables["retrieval_agreement"]["agrees"].all()
    return 1 if failed else 0
