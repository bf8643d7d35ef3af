"""Thread pools per framework: inter-op 1 vs 2 vs the framework's default, tf.data's private pool bounded vs default.

Issue 13 §2: intra-op threads are the same for both frameworks (all usable
cores, an audited must-match setting); the inter-op pools (torch's and
TensorFlow's) and tf.data's own pool are not, and this script measures what
they are worth. Each configuration is the fixed fallback
(common.execution.FALLBACK) with one thread setting changed, measured the way
the per-machine search measures a candidate (compare.tune.run_candidate, the
worker's ``tune`` task: its own process, training steps drawn from the real
pipeline, median of the timed steps); configurations and frameworks alternate,
each round in the reverse order of the one before (ABBA). ``os_threads``: the
threads the worker process had started by the end (all pools, idle or not).

The search (compare.tune) varies the same settings per machine, so this
script is the evidence for the fallback's thread settings and for the
README's thread policy.

    .venv/bin/python benchmarks/threads.py            # ~15 minutes on 2 cores
    .venv/bin/python benchmarks/threads.py --quick
"""
from __future__ import annotations

import itertools
import sys

from _common import abba, base_parser, machine_header, median, print_table, split, write_results
from common.config import Recipe, RunSpec
from common.data import load_dataset
from common.execution import fallback
from compare.tune import run_candidate
from compare.tune_resolve import candidate_spec

INTER_OP = (1, 2, None)  # None: the framework's default (one per core)


def configurations(backends: list[str]) -> list[tuple[str, str, object]]:
    """(backend, label, ExecutionConfig): inter-op variants for both, the tf.data pool for TensorFlow."""
    per_backend = []
    for backend in backends:
        base = fallback(backend)
        configs = [(backend, f"inter-op {inter or 'default'}", base.replace(inter_op_threads=inter))
                   for inter in INTER_OP]
        if backend == "tensorflow":
            configs += [(backend, f"tf.data pool {data or 'default'} (inter-op {base.inter_op_threads})",
                         base.replace(data_threads=data)) for data in (None, 1)]
        per_backend.append(configs)
    return [c for group in itertools.zip_longest(*per_backend) for c in group if c is not None]


def summarise(rows: list[dict]) -> list[dict]:
    """Per (backend, model, config): medians over rounds, and each config over the default inter-op's."""
    keys = list(dict.fromkeys((r["backend"], r["model"], r["config"]) for r in rows))
    out = []
    for backend, model, config in keys:
        mine = [r for r in rows if (r["backend"], r["model"], r["config"]) == (backend, model, config)]
        out.append({"backend": backend, "model": model, "config": config,
                    "train_img_s": median(r.get("images_per_sec") for r in mine),
                    "pipeline_img_s": median(r.get("pipeline_images_per_sec") for r in mine),
                    "inter_op_read_back": mine[0].get("inter_op_read_back"),
                    "data_threads_read_back": mine[0].get("data_threads_read_back"),
                    "os_threads": median(r.get("os_threads") for r in mine),
                    "rounds": len([r for r in mine if r.get("images_per_sec")])})
    for row in out:
        default = next((r for r in out if (r["backend"], r["model"], r["config"]) ==
                        (row["backend"], row["model"], "inter-op default")), None)
        row["vs_default_inter_op"] = (row["train_img_s"] / default["train_img_s"]
                                      if default and default["train_img_s"] and row["train_img_s"] else None)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__, "threads.csv")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds, even for a balanced order")
    parser.add_argument("--data", default="synthetic:5000,500", help="dataset SPEC (default %(default)s)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.steps, args.rounds, args.data = 16, 2, 1, "synthetic:256,64"
        args.models = split(args.models)[0]
    dataset = load_dataset(args.data, progress=False)
    steps = (2, 1, args.steps)  # gate steps (the first is the compile step), warm-up, timed
    rows = []
    pairs = [(model, c) for model in split(args.models) for c in configurations(split(args.backends))]
    for round_index, (model, (backend, label, config)) in abba(pairs, args.rounds):
        print(f"round {round_index + 1}/{args.rounds}: {backend} {model} {label}", file=sys.stderr, flush=True)
        spec = RunSpec(model=model, backend=backend, data=args.data, threads=args.threads,
                       recipe=Recipe(batch_size=args.batch_size, eval_batch_size=args.batch_size))
        result = run_candidate(candidate_spec(spec, dataset), config, steps)
        settings = result.get("settings") or {}
        rows.append({"round": round_index + 1, "backend": backend, "model": model, "config": label,
                     "status": result.get("status"), "images_per_sec": result.get("images_per_sec"),
                     "pipeline_images_per_sec": result.get("pipeline_images_per_sec"),
                     "os_threads": result.get("os_threads"), "inter_op_read_back": settings.get("inter_op_threads"),
                     "data_threads_read_back": settings.get("data_threads"), "error": result.get("error")})
    summary = summarise(rows)
    print(machine_header(args.threads))
    print_table(f"training images/s (median of {args.steps} timed steps, median of {args.rounds} round(s)); "
                "intra-op threads: all usable cores for both", summary, list(summary[0]) if summary else [])
    write_results(args.out, summary, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
