"""`dualbench scale`: data-parallel runs at several process counts, and the scaling table.

The same as `dualbench run` (every option, one worker process per rank, each
framework's own engine, fairness audit per world size, ABBA order) with
``--nproc`` a list (default 1,2,4); it ends with the scaling table
(compare.scaling: throughput, speedup, efficiency, time to ``--target-accuracy``
and tf/torch per world size), also written to OUT/scaling.csv, report.md/.html
and plots/scaling.png.
"""
from __future__ import annotations

import argparse

from compare import cmd_run

DEFAULT_NPROC = "1,2,4"


def register(parser: argparse.ArgumentParser) -> None:
    """Options of `dualbench scale`: those of `dualbench run`, --nproc a list."""
    cmd_run.register(parser, nproc_default=DEFAULT_NPROC)


def main(args: argparse.Namespace) -> int:
    """Run every process count, then print the scaling table. Returns `dualbench run`'s exit code."""
    code = cmd_run.main(args)
    if args.node_rank > 0:
        return code  # another host's ranks: host 0 writes and prints the results
    from compare.scaling import scaling_table, shared_host_note
    from compare.store import ResultsStore
    from compare.tables import by_series, to_text
    from compare.report import report_target

    store = ResultsStore(args.out)
    runs = by_series(store.load_runs())
    if runs:
        print("\nScaling (all columns in scaling.csv):")
        print(to_text(scaling_table(runs, report_target(store, runs, args.target_accuracy))))
        note = shared_host_note(runs)
        if note:
            print(f"note: {note}")
    return code
