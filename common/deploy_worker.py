"""The worker tasks behind `dualbench export`, one process each (``python -m <backend>.worker TASK REQ OUT``).

* ``export-reference``: the framework's own eval-mode logits of the weights on the verification images;
* ``export``: one artifact in one format: every converter call gets its own process (the LiteRT
  converter leaks memory per call, tensorflow issue 122598; a crash costs one format, not the others);
* ``export-verify``: one artifact loaded by its own runtime in a fresh process, its logits on every
  verification image plus the probes of common.deploy.diagnose;
* ``export-serve``: one serving measurement (batch-1 latency, batch-N throughput) of one artifact.

REQ is a JSON file written by compare.export; OUT receives ``{"status": "ok", ...}`` or
``{"status": "error", "error": one line}`` atomically, also on failure. A process that
serves an ONNX or LiteRT file imports only that runtime (common.runtimes), never torch or
TensorFlow, so its load time and peak RSS are the runtime's own.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

from common.deploy import FRAMEWORK_MODULES, PROBE_IMAGES, Format, format_of, to_layout
from common.results import write_json_atomic

_STARTED = time.perf_counter()
# Which module loads each runtime's artifacts (imported, and timed, by the verifier and the server).
_RUNTIME_MODULES = {"onnxruntime": "onnxruntime", "litert": "ai_edge_litert.interpreter"}


def export_module(backend_name: str) -> Any:
    """The backend's export module (``torch_impl.export`` / ``tf_impl.export``), imported now."""
    from common.registry import worker_command

    package = worker_command(backend_name)[1].rsplit(".", 1)[0]
    return importlib.import_module(f"{package}.export")


def _build_model(backend_name: str, request: dict[str, Any]) -> tuple[Any, Any]:
    """(backend, model with the request's weights): CPU, float32, eval-ready, ``threads`` threads."""
    from common.config import RunSpec
    from common.registry import get_backend
    from common.weights import load_weights

    backend = get_backend(backend_name)
    backend.setup(RunSpec(model=request["model"], backend=backend_name, device="cpu", mode="eager",
                          channels_last=False, threads=request["threads"]))
    model = backend.build_model(request["model"], request["num_classes"], tuple(request["in_shape"]),
                                bn_momentum=request["bn_momentum"], bn_epsilon=request["bn_epsilon"])
    backend.set_weights(model, load_weights(request["weights"], request.get("weights_sha256")))
    return backend, model


def reference(backend_name: str, request: dict[str, Any]) -> dict[str, Any]:
    """The framework's eval-mode logits (``backend.predict``) on every verification image -> request['logits']."""
    backend, model = _build_model(backend_name, request)
    images = np.load(request["images"])
    np.save(request["logits"], backend.predict(model, images, training=False).astype(np.float32))
    return {"images": len(images), "versions": backend.versions()}


def convert(backend_name: str, request: dict[str, Any]) -> dict[str, Any]:
    """One artifact, written under a staging name and renamed into place only when complete."""
    _backend, model = _build_model(backend_name, request)
    target = Path(request["artifact"])
    staging = target.with_name(f".partial-{target.name}")  # keeps the suffix converters insist on
    _remove(staging)
    started = time.perf_counter()
    try:
        made = export_module(backend_name).export_artifact(model, request["format"], staging,
                                                           tuple(request["in_shape"]))
    except BaseException:
        _remove(staging)
        raise
    seconds = time.perf_counter() - started
    _remove(target)
    os.replace(staging, target)
    return {**made, "convert_s": seconds}


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _load(backend_name: str, fmt: Format, path: str, threads: int) -> tuple[Any, float, float, dict]:
    """(LoadedArtifact, import seconds, load seconds, thread settings) in the format's own runtime."""
    from common import runtimes

    started = time.perf_counter()
    if fmt.runtime in _RUNTIME_MODULES:
        importlib.import_module(_RUNTIME_MODULES[fmt.runtime])
        imported = time.perf_counter()
        loader = runtimes.load_onnx if fmt.runtime == "onnxruntime" else runtimes.load_litert
        artifact = loader(path, threads)
        settings = artifact.settings
    else:
        module = export_module(backend_name)
        imported = time.perf_counter()
        settings = module.set_threads(threads)
        artifact = module.load_artifact(fmt.name, path)
    return artifact, imported - started, time.perf_counter() - imported, settings


def _shape_problem(declared: list[int | None], expected: list[int]) -> str | None:
    """A message when the artifact's declared input shape cannot take the images (None dims are free)."""
    if len(declared) == len(expected) and all(d is None or d == e for d, e in zip(declared[1:], expected[1:])):
        return None
    shown = ["batch" if d is None else d for d in declared]
    return f"the artifact's input shape is {shown}, the verification images are {['batch', *expected[1:]]}"


def verify(backend_name: str, request: dict[str, Any]) -> dict[str, Any]:
    """The artifact's logits on every image (in batches) and the probes -> request['logits'] (.npz)."""
    fmt = format_of(backend_name, request["format"])
    artifact, import_s, load_s, settings = _load(backend_name, fmt, request["artifact"], request["threads"])
    images = np.load(request["images"], mmap_mode="r")
    out: dict[str, Any] = {"runtime_version": artifact.runtime_version, "settings": settings,
                           "input_shape": artifact.input_shape, "import_s": import_s, "load_s": load_s}
    problem = _shape_problem(artifact.input_shape, list(to_layout(images[:1], fmt.layout).shape))
    if problem:
        return {**out, "input_shape_error": problem}
    batch, started = request["batch"], time.perf_counter()
    logits = np.concatenate([artifact.predict(to_layout(images[i:i + batch], fmt.layout))
                             for i in range(0, len(images), batch)])
    probe = np.asarray(images[:PROBE_IMAGES])
    arrays = {"logits": logits, "batched": logits[:len(probe)],
              "single": np.concatenate([artifact.predict(to_layout(probe[i:i + 1], fmt.layout))
                                        for i in range(len(probe))])}
    if probe.shape[1] == probe.shape[2]:  # square images: the transposed-layout probe has the same shape
        arrays["transposed"] = artifact.predict(to_layout(probe.transpose(0, 2, 1, 3), fmt.layout))
    np.savez(request["logits"], **{k: np.asarray(v, np.float32) for k, v in arrays.items()})
    return {**out, "verify_s": time.perf_counter() - started, "frameworks_loaded": _frameworks_loaded()}


def _frameworks_loaded() -> list[str]:
    return sorted(name for name in FRAMEWORK_MODULES if name in sys.modules)


def own_peak_rss_bytes() -> int | None:
    """This process's peak RSS since it started (Linux VmHWM), None where /proc is missing.

    Not the parent's ``os.wait4`` figure: Linux carries the forking parent's RSS over
    ``exec`` into the child's ``ru_maxrss``, which would add dualbench's own memory
    to a small runtime's.
    """
    try:
        status = Path("/proc/self/status").read_text(encoding="ascii")
    except OSError:
        return None
    line = next((line for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return int(line.split()[1]) * 1024 if line else None  # reported in kB


def _timed_calls(predict: Callable, images: np.ndarray, warmup: int, seconds: float, min_calls: int) -> list[float]:
    """Seconds of each timed call after ``warmup`` untimed ones; at least ``min_calls``, about ``seconds`` in all."""
    for _ in range(warmup):
        predict(images)
    times: list[float] = []
    while len(times) < min_calls or sum(times) < seconds:
        started = time.perf_counter()
        predict(images)  # numpy in, numpy out: every runtime pays its own conversions
        times.append(time.perf_counter() - started)
    return times


def serve(backend_name: str, request: dict[str, Any]) -> dict[str, Any]:
    """Load the artifact, then batch-1 latency and batch-N throughput on verification images."""
    fmt = format_of(backend_name, request["format"])
    artifact, import_s, load_s, settings = _load(backend_name, fmt, request["artifact"], request["threads"])
    images = np.load(request["images"], mmap_mode="r")
    batch = request["batch"]
    many = to_layout(np.resize(np.asarray(images[:batch]), (batch, *images.shape[1:])), fmt.layout)
    one = np.ascontiguousarray(many[:1])
    started = time.perf_counter()
    artifact.predict(one)
    first_call_s = time.perf_counter() - started
    seconds, warmup = request["seconds"], request["warmup"]
    return {"runtime_version": artifact.runtime_version, "settings": settings, "import_s": import_s,
            "load_s": load_s, "first_call_s": first_call_s, "startup_s": time.perf_counter() - _STARTED,
            "batch1_s": _timed_calls(artifact.predict, one, warmup, seconds, min_calls=20),
            "batch_s": _timed_calls(artifact.predict, many, max(1, warmup // 5), seconds, min_calls=3),
            "frameworks_loaded": _frameworks_loaded(), "peak_rss_bytes": own_peak_rss_bytes()}


def run_task(handler: Callable[[str, dict[str, Any]], dict[str, Any]], backend_name: str, request_path: str,
             out_path: str) -> int:
    """Run one task: OUT gets its result (status ok) or a one-line error (status error, exit 1)."""
    request = json.loads(Path(request_path).read_text(encoding="utf-8"))
    try:
        response, code = {"status": "ok", **handler(backend_name, request)}, 0
    except Exception as exc:  # recorded, never lost: the parent reads OUT
        traceback.print_exc(file=sys.stderr)
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        response, code = {"status": "error", "error": message[:500]}, 1
    write_json_atomic(out_path, response)
    return code


TASK_HANDLERS = {"export-reference": reference, "export": convert, "export-verify": verify, "export-serve": serve}
