"""TensorFlow BatchNorm kernel per execution mode: the evidence behind tf_impl.optim._BN_IMPLEMENTATION.

tf_impl's BatchNorm computes training-mode statistics either with TF's
FusedBatchNormV3 kernel ("fused") or with two-pass composed ops
("composed", which XLA fuses; used under XLA because XLA's lowering of the
fused op computes a cancelling one-pass variance). This measures both kernels
in graph and xla mode with dualbench's own measurement (``common.bench.measure``,
phase train, compute-only images/s, compile step and warm-up excluded), each
configuration in its own process, configurations alternating for ``--rounds``
rounds. (The execution modes themselves: benchmarks/mode_matrix.py.)

    .venv/bin/python benchmarks/tf_bn_kernels.py            # ~3 minutes on 2 cores
    .venv/bin/python benchmarks/tf_bn_kernels.py --quick
"""
from __future__ import annotations

import argparse
import json
import sys

from _common import abba, base_parser, machine_header, median, print_table, run_json, split, write_results

MODES = ("graph", "xla")
KERNELS = ("fused", "composed")


def measure_one(model: str, mode: str, kernel: str, args) -> dict:
    """In this (fresh) process: dualbench's train compute measurement with the BN kernel forced."""
    from common.bench import bench_spec, measure
    from common.registry import get_backend
    from tf_impl import optim

    optim._BN_IMPLEMENTATION[mode] = kernel  # read when the train step is traced (first call)
    spec = bench_spec(model, "tensorflow", args.batch_size, "synthetic", mode=mode, threads=args.threads,
                      warmup_steps=args.warmup)
    rows = measure(get_backend("tensorflow"), spec, args.steps, ("train",))
    compute = next(r for r in rows if r["measure"] == "compute")
    return {"images_per_sec": compute["images_per_sec"], "compile_s": compute["compile_s"]}


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__, "tf_bn_kernels.csv")
    parser.set_defaults(models="resnet20", backends="tensorflow")  # seed_cnn has no BatchNorm
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the compile step")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (default %(default)s)")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "MODE", "KERNEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(*args.one, args)), flush=True)
        return 0
    if args.quick:
        args.batch_size, args.steps, args.warmup, args.rounds = 16, 2, 1, 1
    configs = [(m, mode, k) for m in split(args.models) for mode in MODES for k in KERNELS]
    rows = []
    for round_index, (model, mode, kernel) in abba(configs, args.rounds):
        print(f"round {round_index + 1}/{args.rounds}: {model} {mode} {kernel}", file=sys.stderr, flush=True)
        argv_one = [sys.executable, __file__, "--one", model, mode, kernel, "--batch-size", str(args.batch_size),
                    "--steps", str(args.steps), "--warmup", str(args.warmup)]
        if args.threads:
            argv_one += ["--threads", str(args.threads)]
        result, _ = run_json(argv_one, f"{model}-{mode}-{kernel}")
        rows.append({"round": round_index + 1, "model": model, "mode": mode, "bn_kernel": kernel,
                     "batch_size": args.batch_size, **(result or {"status": "failed"})})
    summary = []
    for model, mode, kernel in configs:
        mine = [r for r in rows if (r["model"], r["mode"], r["bn_kernel"]) == (model, mode, kernel)]
        summary.append({"model": model, "mode": mode, "bn_kernel": kernel, "batch_size": args.batch_size,
                        "train_img_s": median(r.get("images_per_sec") for r in mine),
                        "compile_s": median(r.get("compile_s") for r in mine)})
    print(machine_header(args.threads))
    print_table(f"TensorFlow compute-only training images/s by BatchNorm kernel, {args.steps} timed steps, "
                f"median of {args.rounds} round(s)", summary, list(summary[0]))
    write_results(args.out, summary, rows)
    return 0 if all(r.get("images_per_sec") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
