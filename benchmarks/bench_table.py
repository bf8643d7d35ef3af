"""The `dualbench bench` table: throughput and memory per model, backend, batch size, phase and measure.

One ``dualbench bench --json`` call (``--mode best``, fp32; each (model, backend,
batch size) measured in its own process, the backends alternating): training and
inference, compute-only (a device-resident batch) and pipeline-inclusive (the
real pipeline), warm-up excluded, compile time apart, host peak RSS of the
measurement process. A batch size that does not fit is retried smaller and the
retry recorded. The same table ``dualbench bench --out`` writes, plus the machine.

    .venv/bin/python benchmarks/bench_table.py            # ~10 minutes on 2 cores
    .venv/bin/python benchmarks/bench_table.py --quick
"""
from __future__ import annotations

import sys

from _common import base_parser, dualbench_bench, machine_header, print_table, write_results

MIB = 2 ** 20
COLUMNS = ["model", "backend", "mode", "batch_size", "phase", "measure", "images_per_sec", "step_ms_p50",
           "compile_s", "host_peak_rss_mib", "status"]


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__, "bench_table.csv")
    parser.add_argument("--batch-sizes", default="32,128,512", help="comma list (default %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measure (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps after the compile step")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.steps, args.warmup = "8,16", 2, 1
    bench_args = ["--models", args.models, "--backends", args.backends, "--batch-size", args.batch_sizes,
                  "--steps", str(args.steps), "--measure-warmup-steps", str(args.warmup)]
    if args.threads:
        bench_args += ["--threads", str(args.threads)]
    rows = dualbench_bench(bench_args, "bench")
    summary = []
    for r in rows:
        rss = r.get("host_peak_rss_bytes")
        p50 = r.get("step_time_p50_s")
        summary.append({"model": r.get("model"), "backend": r.get("backend"), "mode": r.get("resolved_mode"),
                        "batch_size": r.get("batch_size"), "phase": r.get("phase"), "measure": r.get("measure"),
                        "images_per_sec": r.get("images_per_sec"), "step_ms_p50": p50 * 1e3 if p50 else None,
                        "compile_s": r.get("compile_s"), "host_peak_rss_mib": rss / MIB if rss else None,
                        "status": r.get("status")})
    print(machine_header(args.threads))
    print_table(f"dualbench bench: images/s (compute: median over {args.steps} steps; pipeline: one clock), "
                "--mode best fp32", summary, COLUMNS)
    if not summary:
        print("no measurements", file=sys.stderr)
        return 1
    write_results(args.out, summary, rows)
    return 0 if all(r["status"] == "ok" for r in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
