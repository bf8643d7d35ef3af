"""Measure the TensorFlow execution modes (eager / graph / xla) to choose tf_impl's "best" per device.

Each (model, mode) runs in its own subprocess (TF's thread pools and XLA
caches are per process). A run: setup -> build -> load common.init weights
-> one batch of normalised random images on the device -> the first train
step timed alone (trace + compile) -> warm-up steps -> timed steps, with
``synchronize()`` before every clock read. Prints one JSON line per run:
median images/s over the timed steps and the compile time.

    .venv/bin/python benchmarks/tf_modes.py --models resnet20,seed_cnn --batch-size 128
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_one(model_name: str, mode: str, batch: int, steps: int, warmup: int, threads: int | None,
            device: str, precision: str, bn: str | None) -> dict:
    import numpy as np

    from common.config import Recipe, RunSpec
    from common.init import initial_weights
    from common.registry import get_backend

    backend = get_backend("tensorflow")
    spec = RunSpec(model=model_name, backend="tensorflow", mode=mode, threads=threads, device=device,
                   precision=precision, recipe=Recipe(batch_size=batch))
    settings = backend.setup(spec)
    if bn:  # override the BN kernel tf_impl.optim picks for this mode
        from tf_impl import optim

        optim.BN_IMPLEMENTATION[mode] = bn
    model = backend.build_model(model_name, 10, (32, 32, 3))
    backend.set_weights(model, initial_weights(model.arch_spec, "torch_default", 0))
    step = backend.make_train_step(model, spec)
    import tensorflow as tf

    rng = np.random.default_rng(0)
    with tf.device(backend.device):
        images = tf.constant(rng.standard_normal((batch, 32, 32, 3)).astype(np.float32))
        labels = tf.constant(rng.integers(0, 10, batch).astype(np.int64))
    backend.synchronize()
    t0 = time.perf_counter()
    step(images, labels, 0.05)
    backend.synchronize()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        step(images, labels, 0.05)
    times = []
    for i in range(steps):
        backend.synchronize()
        t0 = time.perf_counter()
        step(images, labels, 0.05 * (1 - i / steps))
        backend.synchronize()
        times.append(time.perf_counter() - t0)
    from tf_impl.optim import BN_IMPLEMENTATION

    return {"model": model_name, "mode": mode, "bn": BN_IMPLEMENTATION[mode], "batch": batch, "precision": precision,
            "device": settings["device"], "threads": settings["intra_op_threads"],
            "images_per_sec": batch / statistics.median(times), "step_s_median": statistics.median(times),
            "step_s_min": min(times), "compile_s": compile_s, "steps": steps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,seed_cnn")
    parser.add_argument("--modes", default="graph,xla,eager")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eager-steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--bn", default=None, help="force the BN kernel: fused | composed")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        model_name, mode = args.one
        steps = args.eager_steps if mode == "eager" else args.steps
        warmup = 1 if mode == "eager" else args.warmup
        print(json.dumps(run_one(model_name, mode, args.batch_size, steps, warmup, args.threads,
                                 args.device, args.precision, args.bn)), flush=True)
        return 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    for model_name in args.models.split(","):
        for mode in args.modes.split(","):
            argv = [sys.executable, __file__, "--one", model_name, mode, "--batch-size", str(args.batch_size),
                    "--steps", str(args.steps), "--eager-steps", str(args.eager_steps),
                    "--warmup", str(args.warmup), "--device", args.device, "--precision", args.precision]
            if args.bn:
                argv += ["--bn", args.bn]
            if args.threads:
                argv += ["--threads", str(args.threads)]
            out = subprocess.run(argv, env=env, capture_output=True, text=True)
            lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
            print(lines[-1] if lines else json.dumps({"model": model_name, "mode": mode,
                                                      "error": out.stderr.strip().splitlines()[-1:]}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
