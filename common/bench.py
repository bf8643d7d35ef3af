"""Throughput and memory without full training: the measurement `dualbench bench` runs per subprocess.

For one (backend, model, batch size, mode, precision) it measures, with the
same clock rules as common.loop (synchronize before every clock read, the
first call timed apart as compile time, warm-up steps excluded):

* train/compute: the same device-resident batch stepped repeatedly (Keras's fit style: fit's own
  per-step windows over the real pipeline, ``_fit_timed``);
* train/pipeline: batches drawn from the real pipeline, one per step;
* infer/compute: the eval step on a device-resident batch;
* infer/pipeline: the eval step over the eval pipeline, batches produced inside the window.

A pipeline measure synchronizes after every step, as common.loop does, so its
step_time_p50_s is the median of per-step windows that each include producing
the step's batch.

The worker task ``python -m torch_impl.worker bench REQUEST.json OUT.json`` writes one
JSON object with a list of measurements; an out-of-memory error is recorded
as status "oom" for that batch size (the runner then stops growing it).
"""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from common.audit import fallbacks_text
from common.config import Recipe, RunSpec
from common.metrics import median_ci, percentile
from common.results import write_json_atomic
from common.loop import plan_for


def _timed(backend: Any, call: Callable[[], Any], steps: int, warmup: int, batch: int) -> dict[str, Any]:
    """Time ``steps`` calls after ``warmup`` untimed ones; the very first call is compile time."""
    backend.synchronize()
    t0 = time.perf_counter()
    call()
    backend.synchronize()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        call()
    backend.synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        call()
        backend.synchronize()
        times.append(time.perf_counter() - t0)
    median, lo, hi = median_ci([batch / t for t in times])
    return {"images_per_sec": median, "images_per_sec_ci": [lo, hi], "compile_s": compile_s,
            "step_time_p50_s": percentile(times, 50), "step_time_p90_s": percentile(times, 90),
            "steps": steps}


def _pipeline_timed(backend: Any, step: Callable[[Any, Any], Any], batches: Iterator, steps: int, warmup: int,
                    batch: int) -> dict[str, Any]:
    """Wall time per step including producing its batch from the pipeline (after warm-up).

    ``batches`` is consumed lazily, so each step's window (from the previous clock read to
    after this step's synchronize) holds the production of its batch as well as the step.
    """
    iterator = iter(batches)
    for _ in range(warmup):
        step(*next(iterator))
    backend.synchronize()
    images, times = 0, []
    last = time.perf_counter()
    for _ in range(steps):
        x, y = next(iterator)
        step(x, y)
        backend.synchronize()
        now = time.perf_counter()
        times.append(now - last)
        last = now
        images += int(y.shape[0])  # the images this step really saw (a short batch counts as short)
    return {"images_per_sec": images / sum(times), "images_per_sec_ci": None, "compile_s": None,
            "step_time_p50_s": percentile(times, 50), "step_time_p90_s": percentile(times, 90), "steps": steps}


def _fit_timed(backend: Any, train_step: Any, plans: Iterator, steps: int, warmup: int, lr: float
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The train/compute and train/pipeline measures of Keras's ``fit`` style, from ``fit`` itself.

    ``fit`` runs over the real pipeline (epoch after epoch if one is too short); its StepClock
    callback gives each step's own window (compute) and its end time, so the time between
    consecutive step ends is the pipeline-inclusive window, as ``_pipeline_timed``'s. The first
    step is the compile step, the next ``warmup`` are left out.
    """
    windows, ends, sizes = [], [], []

    def on_step(_index: int, start: float, end: float, _logs: dict) -> bool:
        windows.append(end - start)
        ends.append(end)
        return False

    total = 1 + warmup + steps
    while len(windows) < total:
        plan = next(plans)
        count = min(plan.num_batches, total - len(windows))
        sizes += plan.batch_sizes()[:count]
        train_step.fit_epoch(plan, [lr] * count, on_step)
    first = 1 + warmup
    compute_times, images = windows[first:], sizes[first:]
    pipeline_times = [b - a for a, b in zip(ends[first - 1:-1], ends[first:])]
    median, lo, hi = median_ci([n / t for n, t in zip(images, compute_times)])
    compute = {"images_per_sec": median, "images_per_sec_ci": [lo, hi], "compile_s": windows[0],
               "step_time_p50_s": percentile(compute_times, 50), "step_time_p90_s": percentile(compute_times, 90),
               "steps": steps}
    piped = {"images_per_sec": sum(images) / sum(pipeline_times), "images_per_sec_ci": None, "compile_s": None,
             "step_time_p50_s": percentile(pipeline_times, 50), "step_time_p90_s": percentile(pipeline_times, 90),
             "steps": steps}
    return compute, piped


def eval_stream(backend: Any, batch: int) -> Iterator[tuple[Any, Any]]:
    """Eval batches produced on demand from the eval pipeline, pass after pass, for the infer/pipeline measure.

    Only batches of exactly ``batch`` images are handed out (a pass's last batch is usually
    short: stepping it would put a second trace, a new input shape, and a short step inside
    the timed window); a pass with no full batch (a test set smaller than ``batch``) hands
    out what it has. A short batch that is skipped is still produced, inside the window.
    """
    while True:
        full_seen = produced = False
        for images, labels in backend.eval_batches():
            produced = True
            if int(labels.shape[0]) == batch:
                full_seen = True
                yield images, labels
            elif not full_seen:
                yield images, labels
        if not produced:
            raise ValueError("the eval pipeline produced no batch")


def measure(backend: Any, spec: RunSpec, steps: int, phases: tuple[str, ...] = ("train", "infer")) -> list[dict]:
    """All measurements for one spec (the backend process is fresh: memory figures are its own)."""
    from common.worker import build

    batch = spec.recipe.batch_size
    built = build(backend, spec)
    model, train_step, dataset = built["model"], built["train_step"], built["dataset"]
    warmup = spec.warmup_steps
    plans = (plan_for(spec, e, len(dataset.train_labels)) for e in itertools.count())
    pipeline = (b for plan in plans for b in backend.train_batches(plan))
    first_images, first_labels = next(iter(backend.train_batches(next(plans))))
    lr = spec.recipe.lr
    rows = []
    backend.reset_peak_memory()
    if "train" in phases and getattr(train_step, "style", "custom") == "fit":
        compute, piped = _fit_timed(backend, train_step, plans, steps, warmup, lr)
        rows += [{"phase": "train", "measure": "compute", **compute}, {"phase": "train", "measure": "pipeline", **piped}]
    elif "train" in phases:
        compute = _timed(backend, lambda: train_step(first_images, first_labels, lr), steps, warmup, batch)
        rows.append({"phase": "train", "measure": "compute", **compute})
        piped = _pipeline_timed(backend, lambda x, y: train_step(x, y, lr), pipeline, steps, warmup, batch)
        rows.append({"phase": "train", "measure": "pipeline", **piped})
    if "infer" in phases:
        eval_step = backend.make_eval_step(model)
        compute = _timed(backend, lambda: eval_step(first_images), steps, warmup, batch)
        rows.append({"phase": "infer", "measure": "compute", **compute})
        piped = _pipeline_timed(backend, lambda x, y: eval_step(x), eval_stream(backend, batch), steps, warmup,
                                batch)
        rows.append({"phase": "infer", "measure": "pipeline", **piped})
    device_peak = backend.peak_device_memory_bytes()
    residency = backend.data_residency()  # the dataset's own bytes inside those peaks, shown apart
    common = {"train_data_on": residency["train_data"], "host_data_bytes": residency["host_bytes"],
              "device_data_bytes": residency["device_bytes"],
              "model": spec.model, "backend": spec.backend, "batch_size": batch, "mode": spec.mode,
              "style": spec.style,
              "resolved_mode": built["settings"].get("execution_mode"), "precision": spec.precision,
              "data_format": built["settings"].get("data_format"), "device": built["settings"].get("device"),
              "threads": built["settings"].get("intra_op_threads"), "device_peak_bytes": device_peak,
              "fallbacks": fallbacks_text(backend.fallback_notes()), "status": "ok"}
    return [{**common, **row} for row in rows]


def run_bench_request(backend_name: str, request_path: str, out_path: str) -> int:
    """The ``bench`` worker task: measure the request's spec, write ``{'rows': [...]}`` to ``out_path``."""
    request = json.loads(Path(request_path).read_text())
    spec = RunSpec.from_dict(request["spec"])
    from common.registry import get_backend

    backend = get_backend(backend_name)
    try:
        rows = measure(backend, spec, int(request["steps"]), tuple(request.get("phases", ("train", "infer"))))
        code = 0
    except Exception as exc:  # an OOM is a result (the boundary), anything else an error row
        status = "oom" if backend.is_out_of_memory(exc) else "error"
        rows = [{"model": spec.model, "backend": spec.backend, "batch_size": spec.recipe.batch_size,
                 "mode": spec.mode, "style": spec.style, "precision": spec.precision, "status": status,
                 "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}]
        code = 0 if status == "oom" else 1
    write_json_atomic(out_path, {"rows": rows})
    return code


def bench_spec(model: str, backend: str, batch_size: int, data: str, **overrides: Any) -> RunSpec:
    """The RunSpec a bench measurement uses: one epoch, eval batches the same size as training ones."""
    recipe = Recipe(batch_size=batch_size, eval_batch_size=batch_size, epochs=1)
    return replace(RunSpec(model=model, backend=backend, data=data, recipe=recipe), **overrides)

