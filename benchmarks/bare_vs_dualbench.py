"""dualbench's training loop vs a bare hand-written loop, per backend and model (target: ratio >= 0.95).

Both sides train the same model (the backend's ``create_model``) at the same
batch size with the same thread pools on the same data bytes, each in its own
subprocess:

* bare: benchmarks/bare_loops.py (torch eager + channels_last + SGD; Keras
  ``tf.function`` step + ``keras.optimizers.SGD`` on preloaded tensors);
* dualbench: the backend worker, i.e. the real ``common.worker.execute`` ->
  ``common.loop.train`` path with the backend's pipeline (augmentation
  included) and train step in ``--mode best``; both sides run in that fixed
  fallback configuration (common.execution.FALLBACK).

Figure compared: steady-state, pipeline-inclusive images/s (compile step and
warm-up excluded, one clock over the same number of steps on both sides).
The two sides alternate for ``--rounds`` rounds, each pair's order flipping
every round (bare then dualbench, dualbench then bare, ...: ABBA, so neither
side always runs right after the other framework); the ratio dualbench/bare
is taken per round and its median reported.

    .venv/bin/python benchmarks/bare_vs_dualbench.py            # a few minutes on 2 cores
    .venv/bin/python benchmarks/bare_vs_dualbench.py --quick    # smoke run
"""
from __future__ import annotations

import sys
from typing import Any

from _common import (abba, base_parser, machine_header, median, print_table, run_bare, run_dualbench, split,
                     write_results)
from common.execution import fallback  # (_common puts the project root on sys.path)

TARGET = 0.95  # dualbench / bare throughput
SIDES = {"bare": run_bare, "dualbench": run_dualbench}


def add_measure_options(parser) -> None:
    """Options shared with benchmarks/memory.py (which runs the same pairs)."""
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps after the compile step")
    parser.add_argument("--rounds", type=int, default=4,
                        help="bare/dualbench rounds, even for a balanced order (default %(default)s)")
    parser.add_argument("--data", default="synthetic:5000,500",
                        help="dataset SPEC; one epoch must hold 1 + warmup + steps batches (default %(default)s)")


def apply_quick(args) -> None:
    if args.quick:
        args.batch_size, args.steps, args.warmup, args.rounds, args.data = 16, 3, 1, 1, "synthetic"


def check_one_epoch(args) -> None:
    """Both sides must time the same steps: dualbench's capped epoch has to hold them all."""
    from common.data import load_dataset

    images = len(load_dataset(args.data, progress=False).train_labels)
    needed = (1 + args.warmup + args.steps) * args.batch_size
    if images < needed:
        raise SystemExit(f"--data {args.data} has {images} training images; (1 + warmup + steps) x batch size "
                         f"= {needed} must fit in one epoch: use e.g. --data synthetic:{needed},500")


def measure_pairs(args) -> list[dict[str, Any]]:
    """One row per (round, model, backend, side), sides alternating within each round."""
    check_one_epoch(args)
    pairs = [(model, backend, side) for model in split(args.models) for backend in split(args.backends)
             for side in SIDES]
    rows = []
    for round_index, (model, backend, side) in abba(pairs, args.rounds):
        print(f"round {round_index + 1}/{args.rounds}: {side} {backend} {model}", file=sys.stderr, flush=True)
        # both sides in the same execution configuration: the fixed fallback (mode, memory format,
        # oneDNN, malloc, inter-op threads), so the loop is all that differs
        found = SIDES[side](backend, model, args.batch_size, args.steps, args.warmup, args.threads, args.data,
                            execution=fallback(backend))
        rows.append({"round": round_index + 1, "model": model, "backend": backend, "side": side,
                     "batch_size": args.batch_size, "steps": args.steps, **found})
    return rows


def summarise(rows: list[dict[str, Any]], value: str, unit: str) -> list[dict[str, Any]]:
    """Per (model, backend): median of each side (``bare_<unit>``...) and of the per-round dualbench/bare ratios."""
    out = []
    for key in dict.fromkeys((r["model"], r["backend"]) for r in rows):
        mine = [r for r in rows if (r["model"], r["backend"]) == key]
        by_round: dict[int, dict[str, float]] = {}
        for r in mine:
            by_round.setdefault(r["round"], {})[r["side"]] = r.get(value)
        ratios = [s["dualbench"] / s["bare"] for s in by_round.values()
                  if s.get("dualbench") is not None and s.get("bare")]
        out.append({"model": key[0], "backend": key[1], "batch_size": mine[0]["batch_size"],
                    f"bare_{unit}": median(r.get(value) for r in mine if r["side"] == "bare"),
                    f"dualbench_{unit}": median(r.get(value) for r in mine if r["side"] == "dualbench"),
                    "ratio": median(ratios), "per_round": " ".join(f"{x:.3f}" for x in ratios)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__, "bare_vs_dualbench.csv")
    add_measure_options(parser)
    args = parser.parse_args(argv)
    apply_quick(args)
    rows = measure_pairs(args)
    summary = summarise(rows, "images_per_sec", "img_s")
    for row in summary:
        row["target"] = f">= {TARGET}"
        row["meets"] = "yes" if row["ratio"] is not None and row["ratio"] >= TARGET else "NO"
    print(machine_header(args.threads))
    print_table("every measurement", rows, ["round", "model", "backend", "side", "images_per_sec",
                                            "compute_images_per_sec", "compile_s", "status"])
    print_table(f"pipeline-inclusive steady-state training images/s, {args.steps} timed steps, "
                f"median of {args.rounds} alternating rounds (data {args.data})", summary, list(summary[0]))
    write_results(args.out, summary, rows)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
