"""Run every benchmark script in turn (each writes its CSV to benchmarks/results/), then print a digest.

    .venv/bin/python benchmarks/run_all.py                 # ~2.5 hours on 2 cores
    .venv/bin/python benchmarks/run_all.py --quick         # smoke run of every script
    .venv/bin/python benchmarks/run_all.py --only bare_vs_dualbench,memory

Run on a quiet machine: the scripts alternate their sides (ABBA) so slow
drift and position hit both alike, but a busy neighbour still widens every
interval. Extra arguments after ``--`` go to every script (e.g.
``-- --threads 2``).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("machine_noise", "bench_table", "bare_vs_dualbench", "memory", "pipeline_cost", "roofline",
           "mode_matrix", "tf_bn_kernels", "threads", "tune_check", "tune_budget", "best_bare_ratio")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SCRIPTS), help="comma list of scripts (default: all)")
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SCRIPTS))
    if unknown:
        parser.error(f"unknown script(s) {', '.join(unknown)}; choose from {', '.join(SCRIPTS)}")
    failed = []
    for name in names:
        started = time.perf_counter()
        print(f"\n===== benchmarks/{name}.py =====", flush=True)
        code = subprocess.call([sys.executable, str(HERE / f"{name}.py"), *(["--quick"] if args.quick else []),
                                *extra])
        print(f"===== {name}: exit {code}, {time.perf_counter() - started:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
