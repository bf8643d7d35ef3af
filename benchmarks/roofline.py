"""Achieved training FLOP/s per backend and model against the machine's measured fp32 matmul peak.

Peak: a large square float32 matmul (``--size``, default 2048) timed in
torch, numpy and TensorFlow, each in its own process (median GFLOP/s of
``--repeats`` products after two untimed ones, 2*n^3 FLOPs each, same thread
count as training). The REFERENCE peak is the highest of the three medians:
the best fp32 GEMM rate this machine delivers through any of these libraries
(the one that wins is named in the output).

Achieved: training FLOPs per image = 3 x 2 x MACs (forward = 2 x MACs FLOPs,
backward ~ twice the forward; MACs from ``common.architectures.arch_spec(model).macs()``)
times the compute-only training images/s that ``dualbench bench --json``
measures (``--mode best``, phase train, measure compute; median over rounds).
Matmul and training measurements alternate within every round.

    .venv/bin/python benchmarks/roofline.py            # a few minutes on 2 cores
    .venv/bin/python benchmarks/roofline.py --quick
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from _common import (abba, base_parser, dualbench_bench, machine_header, median, print_table, run_json, split,
                     write_results)

LIBRARIES = ("torch", "numpy", "tensorflow")


def matmul_gflops(library: str, size: int, repeats: int, threads: int | None) -> dict:
    """Median GFLOP/s of ``size`` x ``size`` float32 products in ``library`` (run in a fresh process)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    if library == "torch":
        import torch

        if threads:
            torch.set_num_threads(threads)
        a, b = torch.from_numpy(a), torch.from_numpy(b)
        product, version = (lambda: torch.mm(a, b)), torch.__version__
    elif library == "tensorflow":
        import tensorflow as tf

        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
        a, b = tf.constant(a), tf.constant(b)
        product, version = (lambda: tf.linalg.matmul(a, b).numpy()), tf.__version__  # .numpy(): wait for it
    else:  # numpy's BLAS reads its thread count from the environment (OMP/OPENBLAS_NUM_THREADS) at import
        product, version = (lambda: a @ b), np.__version__
    for _ in range(2):  # untimed: thread pool start-up, page faults of the output
        product()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        product()
        times.append(time.perf_counter() - t0)
    flops = 2.0 * size ** 3
    return {"library": library, "version": version, "size": size, "gflops": flops / statistics.median(times) / 1e9,
            "gflops_best": flops / min(times) / 1e9, "repeats": repeats}


def run_matmul(library: str, args) -> dict:
    argv = [sys.executable, __file__, "--one-matmul", library, "--size", str(args.size),
            "--repeats", str(args.repeats)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    result, _ = run_json(argv, f"matmul-{library}", env_extra=_blas_threads(args.threads))
    return result or {"library": library, "gflops": None}


def _blas_threads(threads: int | None) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)} if threads else {}


def run_training(backend: str, args) -> list[dict]:
    bench_args = ["--models", args.models, "--backends", backend, "--batch-size", str(args.batch_size),
                  "--phases", "train", "--steps", str(args.steps), "--measure-warmup-steps", str(args.warmup)]
    if args.threads:
        bench_args += ["--threads", str(args.threads)]
    rows = dualbench_bench(bench_args, f"bench-{backend}")
    return [r for r in rows if r.get("measure") == "compute" and r.get("status") == "ok"]


def macs_per_image(model: str) -> int:
    from common.architectures import arch_spec

    return arch_spec(model).macs()


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__, "roofline.csv")
    parser.add_argument("--size", type=int, default=2048, help="matmul side (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=10, help="timed matmuls per process (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed training steps after the compile step")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (default %(default)s)")
    parser.add_argument("--one-matmul", choices=LIBRARIES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one_matmul:
        print(json.dumps(matmul_gflops(args.one_matmul, args.size, args.repeats, args.threads)), flush=True)
        return 0
    if args.quick:
        args.size, args.repeats, args.batch_size, args.steps, args.warmup, args.rounds = 512, 3, 16, 3, 1, 1
    sides = [("matmul", lib) for lib in LIBRARIES] + [("train", b) for b in split(args.backends)]
    matmuls, trainings = [], []
    for round_index, (kind, name) in abba(sides, args.rounds):
        print(f"round {round_index + 1}/{args.rounds}: {kind} {name}", file=sys.stderr, flush=True)
        if kind == "matmul":
            matmuls.append({"round": round_index + 1, **run_matmul(name, args)})
        else:
            trainings += [{"round": round_index + 1, **r} for r in run_training(name, args)]
    peaks = [{"library": lib, "version": next((m.get("version") for m in matmuls if m["library"] == lib), None),
              "gflops": median(m["gflops"] for m in matmuls if m["library"] == lib)} for lib in LIBRARIES]
    reference = max((p for p in peaks if p["gflops"]), key=lambda p: p["gflops"], default=None)
    table = achieved_table(trainings, reference)
    print(machine_header(args.threads))
    print_table(f"fp32 matmul {args.size}x{args.size}, median GFLOP/s of {args.repeats} repeats, "
                f"median of {args.rounds} rounds", peaks, ["library", "version", "gflops"])
    if reference:
        print(f"\nreference peak: {reference['gflops']:.1f} GFLOP/s ({reference['library']})")
    print_table(f"training, --mode best fp32, compute-only (dualbench bench), FLOPs/image = 6 x MACs, "
                f"median of {args.rounds} rounds", table, list(table[0]) if table else [])
    write_results(args.out, table, [{"kind": "matmul", **m} for m in matmuls] +
                  [{"kind": "train", **t} for t in trainings])
    return 0 if reference and table else 1


def achieved_table(trainings: list[dict], reference: dict | None) -> list[dict]:
    """Per (model, backend): median images/s -> achieved GFLOP/s and fraction of the reference peak."""
    peak_gflops = reference["gflops"] if reference else None
    out = []
    for model, backend in dict.fromkeys((t["model"], t["backend"]) for t in trainings):
        mine = [t for t in trainings if (t["model"], t["backend"]) == (model, backend)]
        images_per_sec = median(t["images_per_sec"] for t in mine)
        per_image = 6.0 * macs_per_image(model) / 1e9
        achieved = images_per_sec * per_image if images_per_sec else None
        out.append({"model": model, "backend": backend, "mode": mine[0].get("resolved_mode"),
                    "data_format": mine[0].get("data_format"), "batch_size": mine[0].get("batch_size"),
                    "train_img_s": images_per_sec, "gflop_per_image": per_image, "achieved_gflops": achieved,
                    "peak_gflops": peak_gflops, "peak_from": f"{reference['library']} matmul" if reference else None,
                    "fraction_of_peak": achieved / peak_gflops if achieved and peak_gflops else None})
    return out


if __name__ == "__main__":
    sys.exit(main())
