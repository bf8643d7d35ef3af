"""What the input pipeline costs: pipeline-inclusive over compute-only training throughput (target >= 0.9).

Both figures come from ``dualbench bench --json`` rows of the same
measurement process (phase train, ``--mode best``): "compute" steps one
device-resident batch repeatedly (median of per-step images/s); "pipeline"
draws every batch from the backend's real training pipeline (augmentation
included) under one clock. In common.bench the compute block runs right
before the pipeline block, seconds apart; the ratio is taken per process and
its median over ``--rounds`` rounds reported, the backends alternating within
every round.

Default data ``synthetic:10000,500``: 78 batches of 128 per epoch, so the
timed steps stay inside one epoch as in real CIFAR-10 training (390 batches
per epoch), where building an epoch's pipeline is amortised over many steps.

    .venv/bin/python benchmarks/pipeline_cost.py            # a few minutes on 2 cores
    .venv/bin/python benchmarks/pipeline_cost.py --quick
"""
from __future__ import annotations

import sys

from _common import (abba, base_parser, dualbench_bench, machine_header, median, print_table, split,
                     write_results)

TARGET = 0.9  # pipeline-inclusive / compute-only


def run_bench(backend: str, args) -> list[dict]:
    bench_args = ["--models", args.models, "--backends", backend, "--batch-size", str(args.batch_size),
                  "--phases", "train", "--steps", str(args.steps), "--measure-warmup-steps", str(args.warmup),
                  "--data", args.data]
    if args.threads:
        bench_args += ["--threads", str(args.threads)]
    return dualbench_bench(bench_args, f"bench-{backend}")


def ratios(rows: list[dict]) -> list[dict]:
    """One row per (round, model, backend): compute, pipeline and their ratio."""
    out = []
    for key in dict.fromkeys((r["round"], r["model"], r["backend"]) for r in rows):
        mine = {r["measure"]: r for r in rows if (r["round"], r["model"], r["backend"]) == key}
        compute, pipeline = (mine.get(m, {}).get("images_per_sec") for m in ("compute", "pipeline"))
        out.append({"round": key[0], "model": key[1], "backend": key[2], "compute": compute, "pipeline": pipeline,
                    "ratio": pipeline / compute if compute and pipeline else None,
                    "resolved_mode": mine.get("compute", {}).get("resolved_mode"),
                    "batch_size": mine.get("compute", {}).get("batch_size")})
    return out


def summarise(per_round: list[dict]) -> list[dict]:
    out = []
    for model, backend in dict.fromkeys((r["model"], r["backend"]) for r in per_round):
        mine = [r for r in per_round if (r["model"], r["backend"]) == (model, backend)]
        ratio = median(r["ratio"] for r in mine)
        out.append({"model": model, "backend": backend, "mode": mine[0]["resolved_mode"],
                    "batch_size": mine[0]["batch_size"], "compute_img_s": median(r["compute"] for r in mine),
                    "pipeline_img_s": median(r["pipeline"] for r in mine), "ratio": ratio,
                    "per_round": " ".join(f"{r['ratio']:.3f}" for r in mine if r["ratio"] is not None),
                    "target": f">= {TARGET}", "meets": "yes" if ratio is not None and ratio >= TARGET else "NO"})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__, "pipeline_cost.csv")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measure (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps after the compile step")
    parser.add_argument("--rounds", type=int, default=4,
                        help="alternating rounds, even for a balanced order (default %(default)s)")
    parser.add_argument("--data", default="synthetic:10000,500", help="dataset SPEC (default %(default)s)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.steps, args.warmup, args.rounds, args.data = 16, 3, 1, 1, "synthetic"
    rows = []
    for round_index, backend in abba(split(args.backends), args.rounds):
        print(f"round {round_index + 1}/{args.rounds}: {backend}", file=sys.stderr, flush=True)
        rows += [{"round": round_index + 1, **r} for r in run_bench(backend, args)]
    per_round = ratios([r for r in rows if r.get("status") == "ok"])
    print(machine_header(args.threads))
    summary = summarise(per_round)
    print_table(f"training images/s, --mode best fp32, {args.steps} timed steps, "
                f"median of {args.rounds} rounds (data {args.data})", summary, list(summary[0]) if summary else [])
    write_results(args.out, summary, rows)
    return 0 if per_round and all(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
