"""Every backend worker process: ``python -m torch_impl.worker TASK ...`` (tasks: ``TASKS``).

The backend workers are thin: they call ``main(backend_name, argv)``; the
training task (``run_training``) is one complete run in this process.
The worker writes its RunResult atomically to OUT.json (also on failure, with
the status and a one-line error) and reports progress on stdout as lines
``DUALBENCH_EVENT {json}`` that the runner turns into progress bars.
Host peak RSS is filled in by the parent from ``os.wait4``.

In a data-parallel run every rank runs the same task under its framework's
engine (``Backend.setup`` joins it, ``Backend.finish`` leaves it after a last
barrier); only the chief (rank 0) reports progress, writes checkpoints and
writes OUT.json. The other ranks' stdout and stderr go to their own logs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from common.architectures import arch_spec
from common.checkpoint import load_checkpoint, save_checkpoint
from common.config import RunSpec
from common.distributed import lr_factor
from common.errors import UserError
from common.init import initial_weights
from common.loop import LoopState, final_report, train
from common.execution import allocator_setting, requested
from common.manifest import collect_manifest
from common.results import RunResult, write_json_atomic
from common.weights import save_weights

EVENT_PREFIX = "DUALBENCH_EVENT "
_PROCESS_START = time.perf_counter()


def emit(event: str, **fields: Any) -> None:
    """One progress line for the parent (flushed: the parent reads it live)."""
    print(EVENT_PREFIX + json.dumps({"event": event, **fields}), flush=True)


def common_settings(spec: RunSpec, dataset: Any) -> dict[str, Any]:
    """Audit values that come from the spec itself rather than from a framework object."""
    r = spec.recipe
    execution = requested(spec)
    return {"init_scheme": r.init_scheme, "lr_schedule": f"{r.schedule} (common.schedules, per step)",
            "batch_size": r.batch_size, "data_fingerprint": dataset.fingerprint, "sampler_seed": spec.seed,
            "host_allocator": allocator_setting(os.environ),  # what this process really started with
            "execution_config": f"{execution.label()} ({execution.source or 'given'})"}


def memory_probe(backend: Any) -> Callable[[], dict[str, Any]]:
    """Host peak RSS of this process and the device allocator peak so far (evaluation rows, TensorBoard)."""
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: KiB on Linux, bytes on macOS

    def probe() -> dict[str, Any]:
        return {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
                "device_peak_bytes": backend.peak_device_memory_bytes()}
    return probe


def build(backend: Any, spec: RunSpec) -> dict[str, Any]:
    """Everything before training: setup, data, model with the initial weights, steps, audit."""
    from common.data import load_dataset
    from common.data.defaults import check_channels

    effective = backend.setup(spec)
    dataset = load_dataset(spec.data, train_subset=spec.train_subset, test_subset=spec.test_subset,
                           subset_seed=spec.seed, progress=False)
    check_channels(spec.recipe, dataset.in_shape)
    arch = arch_spec(spec.model, dataset.num_classes, dataset.in_shape)
    model = backend.build_model(spec.model, dataset.num_classes, dataset.in_shape,
                                bn_momentum=spec.recipe.bn_momentum, bn_epsilon=spec.recipe.bn_epsilon,
                                dropout=spec.recipe.dropout)
    backend.set_weights(model, initial_weights(arch, spec.recipe.init_scheme, spec.seed))
    backend.attach_data(dataset, spec)
    train_step = backend.make_train_step(model, spec)
    settings = {**backend.audit(model, train_step), **common_settings(spec, dataset)}
    return {"effective": effective, "dataset": dataset, "arch": arch, "model": model,
            "train_step": train_step, "settings": settings, "replica": backend.replica()}


def execute(backend: Any, spec: RunSpec) -> RunResult:
    """Set up, build, train and evaluate; returns the filled RunResult (status ok or diverged)."""
    result = RunResult(run_id=spec.run_id(), model=spec.model, backend=spec.backend, seed=spec.seed,
                       spec=spec.to_dict())
    built = build(backend, spec)
    effective, dataset, arch = built["effective"], built["dataset"], built["arch"]
    model, train_step, replica = built["model"], built["train_step"], built["replica"]
    eval_step = backend.make_eval_step(model)
    state = _resume(backend, model, train_step, spec)
    result.settings = built["settings"]
    result.world_size, result.engine = replica.world_size, replica.engine
    if replica.world_size > 1:
        result.distributed = {**replica.to_dict(), "nproc": spec.nproc, "nnodes": spec.nnodes,
                              "per_replica_batch_size": spec.recipe.batch_size,
                              "global_batch_size": spec.recipe.batch_size * replica.world_size,
                              "lr_scaling": spec.lr_scaling, "lr_factor": lr_factor(spec)}
    result.trainable_params = backend.trainable_param_count(model)
    result.buffers = backend.buffer_count(model)
    result.macs_per_image = arch.macs()
    residency = backend.data_residency()
    result.train_data_on, result.data_arrays = residency["train_data"], residency["arrays"]
    result.host_data_bytes, result.device_data_bytes = residency["host_bytes"], residency["device_bytes"]
    result.class_names = list(dataset.class_names)
    result.manifest = collect_manifest(versions=backend.versions(), effective=effective,
                                       data_fingerprint=dataset.fingerprint, data_spec=spec.data,
                                       data_verification=dataset.verification,
                                       train_images=len(dataset.train_labels),
                                       test_images=len(dataset.test_labels), replica=replica.to_dict())
    result.startup_s = time.perf_counter() - _PROCESS_START
    if replica.is_chief:
        emit("ready", run_id=result.run_id, epochs=spec.recipe.epochs, settings=result.settings)

    def on_epoch_end(loop_state: LoopState) -> None:
        if not replica.is_chief:
            return  # the chief's checkpoint and progress speak for the run
        if spec.checkpoint_dir:
            save_checkpoint(spec.checkpoint_dir, backend.get_weights(model), train_step.optimizer_state(),
                            loop_state, spec.run_id())
        emit("epoch", **loop_state.epochs[-1])

    backend.reset_peak_memory()
    loop = train(backend, train_step, eval_step, spec, len(dataset.train_labels), dataset.test_labels,
                 state=state, on_epoch_end=on_epoch_end, replica=replica, memory=memory_probe(backend))
    result.device_peak_bytes = backend.peak_device_memory_bytes()
    result.manifest["fallbacks"] = backend.fallback_notes()  # setup, data and any during training
    result.status, result.diverged_step = loop.status, loop.diverged_step
    result.epochs, result.evaluations = loop.state.epochs, loop.state.evaluations
    result.step_times_s, result.step_batch_sizes = loop.step_times_s, loop.step_batch_sizes
    for key, value in loop.summary().items():
        setattr(result, key, value)
    report = final_report(loop, dataset.test_labels, dataset.num_classes)
    if report and loop.status == "ok":
        result.test_accuracy, result.test_loss = report["accuracy"], report["loss"]
        result.confusion_matrix, result.per_class = report["confusion_matrix"], report["per_class"]
    if loop.status == "diverged":
        result.error = f"loss became NaN/inf at step {loop.diverged_step}"
    if loop.status == "ok" and spec.final_weights_path and replica.is_chief:  # what `dualbench export` exports
        result.final_weights_sha256 = save_weights(spec.final_weights_path, backend.get_weights(model))
        result.final_weights_file = spec.final_weights_path
    return result


def _resume(backend: Any, model: Any, train_step: Any, spec: RunSpec) -> LoopState | None:
    if not spec.checkpoint_dir:
        return None
    saved = load_checkpoint(spec.checkpoint_dir, spec.run_id())
    if saved is None:
        return None
    weights, optimizer, state = saved
    backend.set_weights(model, weights)
    train_step.load_optimizer_state(optimizer)
    emit("resumed", epoch=state.epoch, global_step=state.global_step)
    return state


def run_training(backend_name: str, spec_path: str, out_path: str, audit_only: bool = False) -> int:
    """One training run (or, with ``audit_only``, build and audit without training).

    Writes the RunResult (or ``{'settings': ...}``) to ``out_path`` atomically, also on
    failure; returns the exit code (0 ok, 1 failed, 2 user error).
    """
    spec = RunSpec.from_dict(json.loads(Path(spec_path).read_text()))
    if spec.backend != backend_name:
        raise SystemExit(f"spec is for backend {spec.backend!r}, this worker runs {backend_name!r}")
    from common.registry import get_backend

    backend = None
    try:
        backend = get_backend(backend_name)
        if audit_only:
            settings = build(backend, spec)["settings"]
            backend.finish()
            if backend.replica().is_chief:
                write_json_atomic(out_path, {"run_id": spec.run_id(), "status": "ok", "settings": settings})
            return 0
        result = execute(backend, spec)
        backend.finish()  # a last barrier: every rank got here (a failed peer fails this rank too)
        if not backend.replica().is_chief:
            return 0
        code = 0
    except Exception as exc:  # recorded, never lost: the parent reads OUT.json
        status = "oom" if backend is not None and backend.is_out_of_memory(exc) else "error"
        result = RunResult(run_id=spec.run_id(), model=spec.model, backend=spec.backend, seed=spec.seed,
                           status=status, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:500],
                           spec=spec.to_dict())
        if not isinstance(exc, UserError):
            traceback.print_exc(file=sys.stderr)
        else:
            print(f"dualbench worker: error: {exc}", file=sys.stderr)
        code = 2 if isinstance(exc, UserError) else 1
    write_json_atomic(out_path, result.to_dict())
    return code


def _train_task(backend_name: str, args: argparse.Namespace) -> int:
    return run_training(backend_name, args.spec, args.out)


def _audit_task(backend_name: str, args: argparse.Namespace) -> int:
    return run_training(backend_name, args.spec, args.out, audit_only=True)


def _bench_task(backend_name: str, args: argparse.Namespace) -> int:
    from common.bench import run_bench_request

    return run_bench_request(backend_name, args.request, args.out)


def _tune_task(backend_name: str, args: argparse.Namespace) -> int:
    from common.tuning import run_tune_request

    return run_tune_request(backend_name, args.request, args.out)


def _parity_task(backend_name: str, args: argparse.Namespace) -> int:
    from common.parity import run_parity_request

    return run_parity_request(backend_name, args.request, args.out)


def _step_parity_task(backend_name: str, args: argparse.Namespace) -> int:
    from common.step_parity import run_step_parity_request

    return run_step_parity_request(backend_name, args.request, args.out)


def _retrieval_task(backend_name: str, args: argparse.Namespace) -> int:
    from common.retrieval import run_retrieval_request

    return run_retrieval_request(backend_name, args.request, args.out)


def _deploy_task(task: str) -> Callable[[str, argparse.Namespace], int]:
    def handler(backend_name: str, args: argparse.Namespace) -> int:
        from common.deploy_worker import TASK_HANDLERS, run_task

        return run_task(TASK_HANDLERS[task], backend_name, args.request, args.out)
    return handler


_DEPLOY_ARGUMENTS = [("request", "JSON request written by compare.export"), ("out", "where to write the result JSON")]

# task -> (handler(backend_name, args), help, [(argument, help), ...])
Task = tuple[Callable[[str, argparse.Namespace], int], str, list[tuple[str, str]]]
TASKS: dict[str, Task] = {
    "train": (_train_task, "train and evaluate one RunSpec", [("spec", "RunSpec JSON file"),
                                                             ("out", "where to write the RunResult JSON")]),
    "audit": (_audit_task, "build everything, write {'settings': ...} without training",
              [("spec", "RunSpec JSON file"), ("out", "where to write the settings JSON")]),
    "bench": (_bench_task, "throughput and memory of one configuration (common.bench)",
              [("request", "JSON: {'spec': RunSpec dict, 'steps': int, 'phases': [...]}"),
               ("out", "where to write the rows JSON")]),
    "tune": (_tune_task, "gate outputs and throughput of one execution configuration (common.tuning)",
             [("request", "JSON: {'spec': RunSpec dict with execution, 'gate_steps', 'warmup', 'steps', "
                          "'stop_below'}"),
              ("out", "where to write the result JSON")]),
    "parity": (_parity_task, "forward outputs for given weights (common.parity)",
               [("request", "folder with request.json, images.npy, <model>.weights.npz"),
                ("out", "folder for <model>.npz / <model>.json")]),
    "retrieval": (_retrieval_task, "embed a finished run's test and training splits; retrieval metrics",
                  [("request", "JSON: {'spec': RunSpec dict, 'weights': .npz, 'cross': {name: .npz}}"),
                   ("out", "folder for metrics.json, queries.npy, cross_<name>.npy")]),
    "step-parity": (_step_parity_task, "K training steps, free and replayed from another side's states",
                    [("request", "folder with request.json (cases) and the other side's <case>.free.npz"),
                     ("out", "folder for <case>.free.npz / <case>.replay.npz")]),
    # dualbench export (common.deploy_worker): one converter, verifier or server per process
    "export-reference": (_deploy_task("export-reference"), "the framework's eval logits of given weights",
                         _DEPLOY_ARGUMENTS),
    "export": (_deploy_task("export"), "write one artifact in one format", _DEPLOY_ARGUMENTS),
    "export-verify": (_deploy_task("export-verify"), "one artifact's logits in its own runtime",
                      _DEPLOY_ARGUMENTS),
    "export-serve": (_deploy_task("export-serve"), "one serving latency/throughput measurement",
                     _DEPLOY_ARGUMENTS),
}


def main(backend_name: str, argv: list[str] | None = None, extra_tasks: dict[str, Task] | None = None) -> int:
    """The process entry point of every backend worker: ``python -m <backend>.worker TASK ARGS``.

    Every process dualbench starts for a backend (a training run, its audit, a
    bench measurement, a parity phase) goes through here, so the backend's
    ``worker.py`` is the one place where a reader finds what such a process does.
    """
    tasks = {**TASKS, **(extra_tasks or {})}
    parser = argparse.ArgumentParser(prog=f"python -m <{backend_name} worker>",
                                     description=f"one {backend_name} worker process")
    sub = parser.add_subparsers(dest="task", required=True)
    for name, (_handler, help_text, arguments) in tasks.items():
        task_parser = sub.add_parser(name, help=help_text, description=help_text)
        for argument, argument_help in arguments:
            task_parser.add_argument(argument, help=argument_help)
    args = parser.parse_args(argv)
    return tasks[args.task][0](backend_name, args)

