"""One candidate of the execution-configuration search, measured in its own worker process.

``python -m <backend>.worker tune REQUEST.json OUT.json`` (compare.tune starts
it) builds the run exactly as a training run would (``common.worker.build``:
setup with the candidate's ``RunSpec.execution``, the dataset, the model with
the seed's initial weights, the train step) and then, in this order:

1. correctness outputs for the gate, from that fixed state: eval-mode logits
   of the first evaluation batch (the candidate's own eval step), the losses
   of the first ``gate_steps`` training steps on the sampler's first batches
   (training-mode forward + backward + update, compiled as the candidate
   compiles them; the first loss is the training-mode forward of the initial
   weights), and the first update itself (every canonical weight tensor,
   BN statistics included, sampled at ``SAMPLES_PER_TENSOR`` evenly spaced
   positions, after minus before);
2. throughput: ``warmup`` untimed steps, then up to ``steps`` timed steps with
   the same clock rules as common.loop (the batch comes from the real
   pipeline, which keeps running as in training; ``synchronize()`` before
   every clock read; the first step of the process, a gate step, is the
   compile step). The score is the median of the per-step images/s, the
   figure a run reports as ``train_img_s``. Once ``min_steps`` are timed,
   a candidate whose running median is below ``stop_below`` images/s stops
   early: it has lost clearly.

The OUT file holds the measurements, the gate outputs and the settings read
back from the framework (the audit), which say what really ran.
"""
from __future__ import annotations

import itertools
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from common.config import RunSpec
from common.results import write_json_atomic
from common.sampler import epoch_plan

MIN_TIMED_STEPS = 3  # timed steps before a candidate may stop early


SAMPLES_PER_TENSOR = 256  # values of each weight tensor compared by the gate (evenly spaced)


def weight_sample(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Evenly spaced values of every canonical weight tensor (BN statistics included)."""
    sample = {}
    for name, value in weights.items():
        flat = np.asarray(value, np.float64).ravel()
        sample[name] = flat[np.linspace(0, flat.size - 1, min(flat.size, SAMPLES_PER_TENSOR)).astype(np.int64)]
    return sample


def _first_eval_batch(backend: Any) -> Any:
    for images, _labels in backend.eval_batches():
        return images
    raise ValueError("the evaluation split is empty")


def _training_batches(backend: Any, spec: RunSpec, num_train: int):
    """The sampler's batches, epoch after epoch, through the backend's real pipeline."""
    batch = spec.recipe.batch_size
    for epoch in itertools.count():
        plan = epoch_plan(spec.seed, epoch, num_train, batch, augment=spec.recipe.augment,
                          crop_padding=spec.recipe.crop_padding, horizontal_flip=spec.recipe.horizontal_flip)
        yield from backend.train_batches(plan)


def measure_candidate(backend: Any, spec: RunSpec, *, gate_steps: int, warmup: int, steps: int,
                      stop_below: float | None = None) -> dict[str, Any]:
    """Gate outputs and steady-state throughput of ``spec`` (its ``execution`` set) in this process."""
    from common.worker import build

    built = build(backend, spec)
    model, train_step, dataset = built["model"], built["train_step"], built["dataset"]
    eval_step = backend.make_eval_step(model)
    lr = spec.recipe.lr
    eval_images = _first_eval_batch(backend)
    t0 = time.perf_counter()
    logits_before = backend.to_numpy(eval_step(eval_images)).astype(np.float32)
    eval_compile_s = time.perf_counter() - t0
    batches = _training_batches(backend, spec, len(dataset.train_labels))
    losses, compile_s, first_update = [], None, {}
    initial = weight_sample(backend.get_weights(model))
    for index in range(max(1, gate_steps)):
        images, labels = next(batches)
        backend.synchronize()
        t0 = time.perf_counter()
        loss, _correct = train_step(images, labels, lr)
        losses.append(float(backend.to_numpy(loss)))  # a host read: waits for the step
        if index == 0:
            compile_s = time.perf_counter() - t0
        if index == 0:  # the first update: gradients, optimizer and BN statistics from the initial state
            after = weight_sample(backend.get_weights(model))
            first_update = {name: (after[name] - initial[name]).tolist() for name in sorted(initial)}
    for _ in range(warmup):
        train_step(*next(batches), lr)
    timed, stopped_early, started = [], False, time.perf_counter()
    batch = spec.recipe.batch_size
    for _ in range(steps):
        images, labels = next(batches)
        backend.synchronize()  # the batch is produced; its work is not charged to the step
        t0 = time.perf_counter()
        train_step(images, labels, lr)
        backend.synchronize()
        timed.append(time.perf_counter() - t0)
        if stop_below and len(timed) >= MIN_TIMED_STEPS and batch / statistics.median(timed) < stop_below:
            stopped_early = True
            break
    wall = time.perf_counter() - started
    return {"os_threads": _os_threads(),
        "status": "ok", "images_per_sec": batch / statistics.median(timed) if timed else None,
        "pipeline_images_per_sec": batch * len(timed) / wall if timed and wall > 0 else None,
        "step_times_s": timed, "stopped_early": stopped_early, "compile_s": compile_s,
        "eval_compile_s": eval_compile_s, "settings": built["settings"], "effective": built["effective"],
        "gate": {"eval_logits": logits_before.tolist(), "train_losses": losses, "first_update": first_update},
    }


def _os_threads() -> int | None:
    """Threads this process has started by now (thread pools of the framework, tf.data, Python)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # not Linux
        return None


def run_tune_request(backend_name: str, request_path: str, out_path: str) -> int:
    """The ``tune`` worker task: measure the request's candidate, write the result to ``out_path``.

    REQUEST: ``{"spec": RunSpec dict, "gate_steps": int, "warmup": int, "steps": int,
    "stop_below": float | null}``. Failures are results too (status error / oom, one line).
    """
    request = json.loads(Path(request_path).read_text())
    spec = RunSpec.from_dict(request["spec"])
    from common.registry import get_backend

    backend = get_backend(backend_name)
    try:
        result = measure_candidate(backend, spec, gate_steps=int(request["gate_steps"]),
                                   warmup=int(request["warmup"]), steps=int(request["steps"]),
                                   stop_below=request.get("stop_below"))
        code = 0
    except Exception as exc:  # recorded for the search table: a candidate that cannot run is excluded
        traceback.print_exc(file=sys.stderr)  # the parent keeps the tail of stderr
        status = "oom" if backend.is_out_of_memory(exc) else "error"
        result = {"status": status, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
        code = 1
    write_json_atomic(out_path, result)
    return code
