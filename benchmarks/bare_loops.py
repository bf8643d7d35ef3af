"""Bare training loops: what a competent user writes by hand, the baseline dualbench is compared against.

Same model as dualbench (built with the backend's ``create_model``), same
data bytes (``common.data.load_dataset``), same batch size and thread pools;
only the loop differs. The dataset is preloaded once as normalised float32
tensors; a batch is one gather from a per-epoch permutation (no augmentation:
dualbench's pipeline does more work per batch than this one, which is part
of what the comparison charges to dualbench).

* torch: eager, channels_last, ``torch.optim.SGD(momentum, nesterov,
  weight_decay, fused=True)`` (the same optimizer kernel dualbench uses on the
  CPU: a plain for-loop SGD would make the baseline slower, not dualbench
  faster); zero_grad -> forward -> ``F.cross_entropy`` -> backward -> step.
* tensorflow: a ``tf.function``-compiled train step (GradientTape, Keras
  ``SparseCategoricalCrossentropy(from_logits=True)``, ``keras.optimizers.SGD``
  momentum/nesterov/weight_decay) on preloaded tensors, ``tf.gather`` per batch.
  Not ``model.fit`` on tf.data: that adds Keras's callback machinery and a
  prefetch thread competing for the same cores.

Configurations (what benchmarks/best_bare_ratio.py sweeps to find each
framework's best hand-written loop): ``--mode`` (torch eager / compile:
``torch.compile(model)``; TensorFlow eager / graph: ``tf.function`` / xla:
``tf.function(jit_compile=True)``), ``--channels-last on|off`` (torch) and
``--inter-op N`` (default: the framework's own). The process-level settings
come from the environment the caller starts it with (benchmarks/_common.py
``run_bare`` uses compare.process.worker_env(config): oneDNN
``TF_ENABLE_ONEDNN_OPTS``, glibc malloc tuning); the output reads them back
(``onednn``: TensorFlow's IsMklEnabled() / torch.backends.mkldnn).

Timing mirrors common.loop: the first step is compile time; ``--warmup`` steps
follow untimed; then ONE wall clock around ``--steps`` steps including each
batch fetch, stopped after the last loss is read to the host (a sync):
``images_per_sec``. On the CPU, where a step call returns when its work is
done, each step call is also timed alone (fetch excluded, as common.loop's
compute-only step time): ``step_median_images_per_sec`` = batch / the median
step time, the statistic ``dualbench run`` reports as train img/s (None on a
GPU, whose calls return before the work ends).

    python benchmarks/bare_loops.py --backend torch --model resnet20 --batch-size 128 --steps 30

prints one JSON object (images_per_sec = steady-state, pipeline-inclusive).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from common.config import Recipe  # noqa: E402  (numpy/stdlib only; no framework import)
from common.execution import allocator_setting  # noqa: E402
from common.manifest import usable_cores  # noqa: E402

LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4  # the Recipe defaults dualbench trains with


def timed_loop(step: Callable[[Any, Any], Any], batches: Iterator, steps: int, warmup: int,
               batch_size: int, to_host: Callable[[Any], float], synchronous: bool = True) -> dict[str, Any]:
    """Compile step alone, ``warmup`` untimed steps, then one clock over ``steps`` steps (fetch included).

    ``synchronous``: a step call returns when its work is done (CPU), so each call's own time is its
    compute time; then ``step_median_images_per_sec`` is batch / the median of those times.
    """
    t0 = time.perf_counter()
    to_host(step(*next(batches)))  # reading the loss waits for the step (sync)
    compile_s = time.perf_counter() - t0
    loss = None
    for _ in range(warmup):
        loss = step(*next(batches))
    if loss is not None:
        to_host(loss)
    step_times = []
    t0 = time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        called = time.perf_counter()
        loss = step(*batch)
        step_times.append(time.perf_counter() - called)
    final_loss = to_host(loss)
    wall = time.perf_counter() - t0
    median_step = statistics.median(step_times) if synchronous and step_times else None
    return {"images_per_sec": steps * batch_size / wall, "wall_s": wall, "compile_s": compile_s,
            "step_median_images_per_sec": batch_size / median_step if median_step else None,
            "final_loss": final_loss}


def load_normalised(data: str) -> tuple[Any, Any]:
    """Training images as float32 NHWC ``(x/255 - mean)/std`` and int64 labels (numpy)."""
    import numpy as np

    from common.data import load_dataset

    dataset = load_dataset(data, progress=False)
    recipe = Recipe()
    mean, std = np.asarray(recipe.mean, np.float32), np.asarray(recipe.std, np.float32)
    images = (dataset.train_images.astype(np.float32) / 255.0 - mean) / std
    return images, dataset.train_labels.astype(np.int64)


def torch_loop(model_name: str, data: str, batch_size: int, steps: int, warmup: int, threads: int,
               mode: str = "eager", channels_last: bool = True, inter_op: int | None = None) -> dict:
    import torch
    import torch.nn.functional as F

    from torch_impl.models import create_model

    torch.set_num_threads(threads)
    if inter_op:
        torch.set_num_interop_threads(inter_op)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(model_name).to(device, memory_format=memory_format).train()
    forward = torch.compile(model) if mode == "compile" else model
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True,
                                weight_decay=WEIGHT_DECAY, fused=True)
    images, labels = load_normalised(data)
    images, labels = torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)

    def batches():
        while True:
            order = torch.randperm(len(labels), device=device)
            for start in range(0, len(labels) - batch_size + 1, batch_size):
                index = order[start:start + batch_size]
                # NHWC buffer viewed as NCHW = channels_last memory format, no copy
                x = images[index].permute(0, 3, 1, 2)
                yield (x if channels_last else x.contiguous()), labels[index]

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()
        return loss

    result = timed_loop(step, batches(), steps, warmup, batch_size, lambda loss: float(loss.item()),
                        synchronous=device.type == "cpu")
    return {**result, "framework": f"torch {torch.__version__}", "threads": torch.get_num_threads(),
            "inter_op_threads": torch.get_num_interop_threads(),
            "onednn": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
            "device": str(device), "loop": f"{mode} {'channels_last' if channels_last else 'NCHW'}, "
                                            "torch.optim.SGD(fused=True)"}


def tf_loop(model_name: str, data: str, batch_size: int, steps: int, warmup: int, threads: int,
            mode: str = "graph", channels_last: bool = True, inter_op: int | None = None) -> dict:
    import tf_impl  # noqa: F401  (chooses Keras's backend before keras loads)
    import keras
    import tensorflow as tf
    from tensorflow.python.util import _pywrap_util_port

    from tf_impl.models import create_model

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(inter_op or 0)  # 0: TensorFlow's default
    model = create_model(model_name)
    optimizer = keras.optimizers.SGD(learning_rate=LR, momentum=MOMENTUM, nesterov=True,
                                     weight_decay=WEIGHT_DECAY)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    images_np, labels_np = load_normalised(data)
    images, labels = tf.constant(images_np), tf.constant(labels_np)
    del images_np, labels_np

    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "xla")

    def batches():
        n = int(labels.shape[0])
        while True:
            order = tf.random.shuffle(tf.range(n))
            for start in range(0, n - batch_size + 1, batch_size):
                index = order[start:start + batch_size]
                yield tf.gather(images, index), tf.gather(labels, index)

    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    result = timed_loop(step, batches(), steps, warmup, batch_size, lambda loss: float(loss.numpy()),
                        synchronous=not on_gpu)
    return {**result, "framework": f"tensorflow {tf.__version__} / keras {keras.__version__}",
            "threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
            "onednn": bool(_pywrap_util_port.IsMklEnabled()),
            "device": "gpu" if on_gpu else "cpu",
            "loop": f"{mode} step, keras.optimizers.SGD, preloaded tensors"}


LOOPS = {"torch": torch_loop, "tensorflow": tf_loop}
MODES = {"torch": ("eager", "compile"), "tensorflow": ("eager", "graph", "xla")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One bare training loop (no dualbench loop, pipeline or "
                                     "train step); prints a JSON result.")
    parser.add_argument("--backend", choices=tuple(LOOPS), required=True)
    parser.add_argument("--model", default="resnet20", help="a dualbench model name (default resnet20)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="timed steps after warm-up")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps after the compile step")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all usable cores)")
    parser.add_argument("--data", default="synthetic:5000,500", help="dataset SPEC (common.data)")
    parser.add_argument("--mode", default=None, help="torch: eager | compile (default eager); tensorflow: "
                        "eager | graph | xla (default graph)")
    parser.add_argument("--channels-last", choices=("on", "off"), default="on", help="torch memory format")
    parser.add_argument("--inter-op", type=int, default=None, help="inter-op threads (default: the framework's)")
    args = parser.parse_args(argv)
    mode = args.mode or MODES[args.backend][1 if args.backend == "tensorflow" else 0]
    if mode not in MODES[args.backend]:
        parser.error(f"--mode {mode} does not exist for {args.backend}: choose from {', '.join(MODES[args.backend])}")
    threads = args.threads or usable_cores()
    result = LOOPS[args.backend](args.model, args.data, args.batch_size, args.steps, args.warmup, threads,
                                 mode=mode, channels_last=args.channels_last == "on", inter_op=args.inter_op)
    print(json.dumps({"backend": args.backend, "model": args.model, "batch_size": args.batch_size,
                      "steps": args.steps, "warmup": args.warmup, "data": args.data, "mode": mode,
                      "malloc": allocator_setting(os.environ), **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
