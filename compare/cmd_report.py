"""`dualbench report OUT`: re-render tables, plots and report.md/.html from OUT/runs.jsonl alone."""
from __future__ import annotations

import argparse

from common.errors import UserError


def register(parser: argparse.ArgumentParser) -> None:
    """Options of `dualbench report`."""
    parser.add_argument("out", help="results folder written by `dualbench run` (holds runs.jsonl)")
    parser.add_argument("--target-accuracy", type=float, default=None, metavar="FRACTION",
                        help="time to accuracy (head to head, report, scaling table) for this test accuracy, a "
                             "fraction in (0, 1] (default: the runs' --target-accuracy)")
    parser.add_argument("--tensorboard", default=None, metavar="DIR",
                        help="also (re)write every run's TensorBoard logs under DIR/<model>/<backend>/seed<k> "
                             "(default: none)")


def main(args: argparse.Namespace) -> int:
    """Re-render everything; exit 2 when there is nothing to render."""
    from compare.report import render_and_print  # pandas / matplotlib: not needed to build the parser
    from compare.store import ResultsStore

    store = ResultsStore(args.out)
    if not store.root.is_dir():
        raise UserError(f"{store.root} is not a results folder: pass the --out of a `dualbench run`")
    if not store.runs_path.exists():
        raise UserError(f"{store.runs_path} not found: pass the --out folder of a `dualbench run`")
    if args.target_accuracy is not None and not 0 < args.target_accuracy <= 1:
        raise UserError(f"--target-accuracy is a fraction in (0, 1], got {args.target_accuracy:g}")
    if args.tensorboard:
        from compare.tensorboard import write_all

        write_all(args.tensorboard, store.load_runs())
        print(f"TensorBoard logs: tensorboard --logdir {args.tensorboard}")
    render_and_print(store, args.target_accuracy)
    return 0
