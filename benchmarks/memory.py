"""Host peak RSS of a dualbench training run over that of the bare loop, per backend and model (target <= 1.15).

The same pairs as benchmarks/bare_vs_dualbench.py, each side in its own
process, reaped by ``compare.process.run_process`` with ``os.wait4``
(ru_maxrss, KiB -> bytes on Linux):

* bare: benchmarks/bare_loops.py (model, optimizer, the training split
  preloaded as normalised float32, the training loop; nothing else);
* dualbench: the backend worker running ``common.worker.execute`` (setup,
  dataset, pipelines, model with common.init weights, train step, the loop,
  one evaluation pass over the test split, the RunResult).

Both train at the same batch size for the same number of steps on the same
data; dualbench evaluates at the training batch size. Sides alternate; the
per-round ratio's median is reported.

Most of either process's RSS is the framework itself (shared libraries, kernels,
allocator pools), so the table also shows each side above an import-only
baseline (``import torch`` / ``import tensorflow, keras`` plus the backend's
models module, in a fresh process): the part the loop itself is responsible for.

    .venv/bin/python benchmarks/memory.py            # a few minutes on 2 cores
    .venv/bin/python benchmarks/memory.py --quick
"""
from __future__ import annotations

import sys

from _common import base_parser, machine_header, median, print_table, run_json, split, write_results
from bare_vs_dualbench import add_measure_options, apply_quick, measure_pairs, summarise

TARGET = 1.15  # dualbench / bare peak RSS
MIB = 2 ** 20
IMPORTS = {"torch": "import torch, torch_impl.models; print('{}')",
           "tensorflow": "import tensorflow, keras, tf_impl.models; print('{}')"}


def import_baseline_mib(backend: str, rounds: int) -> float | None:
    """Median peak RSS (MiB) of a process that only imports the framework and the backend's models."""
    found = [run_json([sys.executable, "-c", IMPORTS[backend]], f"import-{backend}")[1].host_peak_rss_bytes
             for _ in range(rounds)]
    return median(v / MIB for v in found if v)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__, "memory.csv")
    add_measure_options(parser)
    parser.set_defaults(steps=10, rounds=2)  # the peak is reached within the first steps
    args = parser.parse_args(argv)
    apply_quick(args)
    rows = measure_pairs(args)
    for row in rows:
        rss = row.get("host_peak_rss_bytes")
        row["host_peak_rss_mib"] = rss / MIB if rss else None
    summary = summarise(rows, "host_peak_rss_mib", "rss_mib")
    baselines = {b: import_baseline_mib(b, args.rounds) for b in split(args.backends)}
    for row in summary:
        base = baselines.get(row["backend"])
        row["import_only_mib"] = base
        if base and row["bare_rss_mib"] and row["dualbench_rss_mib"]:
            row["bare_above_import_mib"] = row["bare_rss_mib"] - base
            row["dualbench_above_import_mib"] = row["dualbench_rss_mib"] - base
            row["ratio_above_import"] = row["dualbench_above_import_mib"] / row["bare_above_import_mib"]
        row["target"] = f"<= {TARGET}"
        row["meets"] = "yes" if row["ratio"] is not None and row["ratio"] <= TARGET else "NO"
    print(machine_header(args.threads))
    print_table("every measurement", rows, ["round", "model", "backend", "side", "host_peak_rss_mib",
                                            "images_per_sec", "process_wall_s", "status"])
    print_table(f"host peak RSS (MiB, os.wait4 ru_maxrss) of a training process, {args.steps} steps, "
                f"median of {args.rounds} alternating rounds (data {args.data})", summary, list(summary[0]))
    write_results(args.out, summary, rows)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
