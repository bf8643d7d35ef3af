"""The versioned RunResult schema and atomic JSON / JSONL writers.

A RunResult is one flat JSON object per run; lists (epochs, step times,
confusion matrix) are nested. Readers ignore unknown keys, writers always set
``schema_version``. Nothing is ever half-written: every write goes to a temp
file in the same folder, is fsync'ed, then ``os.replace``d over the target.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

SCHEMA_VERSION = 1
STATUSES = ("ok", "diverged", "crashed", "timeout", "oom", "error", "interrupted")


@dataclass
class RunResult:
    """Everything one backend run produced. Times in seconds, memory in bytes, accuracy in [0, 1]."""

    run_id: str  # "<model>__<backend>__seed<seed>"
    model: str
    backend: str  # "torch" or "tensorflow"
    seed: int
    status: str = "ok"  # one of STATUSES
    schema_version: int = SCHEMA_VERSION
    error: str | None = None  # one-line reason when status != ok
    exit_code: int | None = None  # worker exit code (set by the runner)
    stderr_tail: str | None = None  # last lines of the worker's stderr when it failed
    diverged_step: int | None = None  # global step whose loss was NaN/inf
    test_accuracy: float | None = None  # final-epoch top-1 on the full test split
    test_loss: float | None = None  # final-epoch mean cross-entropy (no smoothing)
    train_images_per_sec: float | None = None  # median compute-only throughput, steady state
    train_images_per_sec_ci: list[float] | None = None  # 95% CI of that median [lo, hi]
    pipeline_images_per_sec: float | None = None  # steady-state images / train wall time (pipeline included)
    eval_images_per_sec: float | None = None  # inference throughput during evaluation
    step_time_p50_s: float | None = None
    step_time_p90_s: float | None = None
    compile_s: float | None = None  # first training step (tracing / compilation / autotune)
    eval_compile_s: float | None = None  # first evaluation batch
    startup_s: float | None = None  # process start -> ready to train (imports, data, model build)
    train_time_s: float | None = None  # training wall time, evaluation excluded
    epoch_wall_s: float | None = None  # median pipeline-inclusive training time per epoch
    host_peak_rss_bytes: int | None = None  # worker peak RSS (parent's wait4 rusage)
    device_peak_bytes: int | None = None  # allocator peak on GPU; None on CPU
    train_data_on: str | None = None  # "host" | "device": where the pipeline keeps the training images
    host_data_bytes: int | None = None  # dataset bytes the pipelines hold in host memory (inside host_peak_rss_bytes)
    device_data_bytes: int | None = None  # dataset bytes the pipelines hold on the device (inside device_peak_bytes)
    data_arrays: dict[str, list] = field(default_factory=dict)  # {array: [where, bytes]} (Backend.data_residency)
    final_weights_file: str | None = None  # final canonical weights (.npz), relative to the results folder
    final_weights_sha256: str | None = None  # SHA-256 of that file as written
    trainable_params: int | None = None
    buffers: int | None = None  # non-trainable values (BN statistics)
    macs_per_image: int | None = None  # forward multiply-accumulates per image
    epochs: list[dict[str, Any]] = field(default_factory=list)  # per-epoch rows (EPOCH_KEYS)
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # every evaluation (common.loop.EVALUATION_KEYS)
    step_times_s: list[float] = field(default_factory=list)  # steady-state compute-only step times
    step_batch_sizes: list[int] = field(default_factory=list)  # images in each of those steps
    class_names: list[str] = field(default_factory=list)
    per_class: dict[str, list[float]] = field(default_factory=dict)  # precision/recall/f1/support
    confusion_matrix: list[list[int]] = field(default_factory=list)  # rows true, columns predicted
    world_size: int = 1  # data-parallel replicas (processes) of the run
    engine: str | None = None  # distributed engine ("none" for one process; common.distributed.Replica)
    distributed: dict[str, Any] = field(default_factory=dict)  # ranks, hosts, collective backend, batches, launch
    spec: dict[str, Any] = field(default_factory=dict)  # the RunSpec
    settings: dict[str, Any] = field(default_factory=dict)  # fairness-audit values (common.audit)
    manifest: dict[str, Any] = field(default_factory=dict)  # versions, machine, git, data fingerprint

    def to_dict(self) -> dict[str, Any]:
        return _finite(asdict(self))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RunResult":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


EPOCH_KEYS = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "wall_s")


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: store them as None (a diverged loss is recorded by status)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _default_file_mode() -> int:
    umask = os.umask(0o022)  # os has no umask getter: set, read, restore
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as pretty JSON to ``path`` atomically."""
    _atomic_write_text(Path(path), json.dumps(_finite(obj), indent=2, sort_keys=True) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete JSON lines of ``path`` ([] if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    text = "".join(json.dumps(_finite(r), sort_keys=True) + "\n" for r in rows)
    _atomic_write_text(Path(path), text)


def upsert_jsonl_atomic(path: str | os.PathLike, row: dict[str, Any], key: str = "run_id") -> None:
    """Replace the row with the same ``key`` (or append) and rewrite the file atomically."""
    rows = [r for r in read_jsonl(path) if r.get(key) != row.get(key)]
    rows.append(row)
    write_jsonl_atomic(path, rows)


def load_results(path: str | os.PathLike) -> list[RunResult]:
    return [RunResult.from_dict(r) for r in read_jsonl(path)]
