"""Measure the torch execution configurations (eager / compile x NCHW / channels_last) to choose "best".

Each (model, configuration) runs in its own subprocess (inductor state and
thread pools are per process). A run: setup -> build -> load common.init
weights -> batches from the real TrainPipeline over random uint8 images -> the
first train step timed alone (compile) -> warm-up steps -> timed steps, with
``synchronize()`` before every clock read. The pipeline's own cost per batch is
timed separately (building the next batch, synchronised). One JSON line per run.

    .venv/bin/python benchmarks/torch_modes.py --models resnet20,seed_cnn --batch-size 128 --rounds 2
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
CONFIGS = {"eager": ("eager", False), "eager+cl": ("eager", True),
           "compile": ("compile", False), "compile+cl": ("compile", True)}


def run_one(model_name: str, config: str, batch: int, steps: int, warmup: int, threads: int | None,
            device: str, precision: str) -> dict:
    import numpy as np

    from common.config import Recipe, RunSpec
    from common.init import initial_weights
    from common.sampler import epoch_plan
    from torch_impl.backend import Backend
    from torch_impl.data import TrainPipeline

    mode, channels_last = CONFIGS[config]
    backend = Backend()
    spec = RunSpec(model=model_name, backend="torch", mode=mode, channels_last=channels_last, threads=threads,
                   device=device, precision=precision, recipe=Recipe(batch_size=batch))
    settings = backend.setup(spec)
    model = backend.build_model(model_name, 10, (32, 32, 3))
    backend.set_weights(model, initial_weights(model.arch_spec, "torch_default", 0))
    step = backend.make_train_step(model, spec)
    n = batch * (steps + warmup + 2)
    rng = np.random.default_rng(0)
    pipeline = TrainPipeline(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n),
                             backend.device, crop_padding=4, mean=spec.recipe.mean, std=spec.recipe.std,
                             channels_last=channels_last)
    batches = pipeline.batches(epoch_plan(0, 0, n, batch))
    pipeline_times, step_times = [], []

    def next_batch():
        backend.synchronize()
        t0 = time.perf_counter()
        out = next(batches)
        backend.synchronize()
        pipeline_times.append(time.perf_counter() - t0)
        return out

    def timed_step(lr):
        images, labels = next_batch()
        backend.synchronize()
        t0 = time.perf_counter()
        loss, _ = step(images, labels, lr)
        backend.synchronize()
        float(loss)
        return time.perf_counter() - t0

    compile_s = timed_step(0.05)
    for _ in range(warmup):
        timed_step(0.05)
    step_times = [timed_step(0.05 * (1 - i / steps)) for i in range(steps)]
    return {"model": model_name, "config": config, "batch": batch, "precision": precision,
            "device": settings["device"], "threads": settings["intra_op_threads"],
            "images_per_sec": batch / statistics.median(step_times), "step_s_median": statistics.median(step_times),
            "step_s_min": min(step_times), "compile_s": compile_s, "steps": steps,
            "pipeline_s_median": statistics.median(pipeline_times)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,seed_cnn")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole sweep (configs interleaved)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one, args.batch_size, args.steps, args.warmup, args.threads,
                                 args.device, args.precision)), flush=True)
        return 0
    forwarded = ["--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
                 "--device", args.device, "--precision", args.precision]
    if args.threads:
        forwarded += ["--threads", str(args.threads)]
    for _ in range(args.rounds):
        for model in args.models.split(","):
            for config in args.configs.split(","):
                proc = subprocess.run([sys.executable, __file__, "--one", model, config, *forwarded], cwd=ROOT,
                                      capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
                lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
                print(lines[-1] if lines else json.dumps({"model": model, "config": config,
                                                          "error": proc.stderr.strip()[-500:]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
