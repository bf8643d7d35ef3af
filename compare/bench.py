"""`dualbench bench`: throughput and memory sweeps, one subprocess per measurement.

Every (model, backend, precision, batch size) runs the backend worker's
``bench`` task (common.bench) in a fresh process, so its host peak RSS (``os.wait4``) and device peak
are its own. Batch sizes run in ascending order; the first out-of-memory ends
the sweep for that configuration after one retry halfway between the last
batch that fitted and the one that did not (recorded with ``retry_of``), so
the table shows the largest batch that fits.
"""
from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from common.bench import bench_spec
from common.config import RunSpec, series_name
from common.execution import ExecutionConfig, requested
from common.registry import worker_command
from compare.process import run_process, stderr_tail, worker_env

COLUMNS = ["model", "backend", "mode", "style", "precision", "batch_size", "phase", "measure", "status", "images_per_sec",
           "images_per_sec_ci", "step_time_p50_s", "step_time_p90_s", "compile_s", "host_peak_rss_bytes",
           "device_peak_bytes", "train_data_on", "host_data_bytes", "device_data_bytes", "resolved_mode",
           "execution", "data_format", "device", "threads", "retry_of", "error", "fallbacks"]


@dataclass(frozen=True)
class BenchConfig:
    """One sweep: every batch size of one (model, backend, precision)."""

    model: str
    backend: str
    precision: str
    mode: str  # execution mode for this backend (RunSpec.mode)
    batch_sizes: tuple[int, ...]
    base: RunSpec  # mode, device, threads, data... (model/backend/batch set per measurement)
    style: str = "custom"  # execution style (RunSpec.style): the custom step or Keras's fit
    execution: ExecutionConfig | None = None  # resolved for --mode auto / pins (compare.tune_resolve)


def measure_once(config: BenchConfig, batch_size: int, steps: int, phases: tuple[str, ...],
                 timeout_s: float | None, workdir: Path) -> list[dict[str, Any]]:
    """Run one measurement subprocess and return its rows (with host peak RSS added)."""
    spec = replace(config.base, model=config.model, backend=config.backend, precision=config.precision,
                   mode=config.mode, style=config.style, execution=config.execution,
                   recipe=replace(config.base.recipe, batch_size=batch_size, eval_batch_size=batch_size))
    tag = f"{config.model}__{config.backend}__{config.mode}__{config.style}__{config.precision}__b{batch_size}"
    request, out = workdir / f"{tag}.request.json", workdir / f"{tag}.out.json"
    request.write_text(json.dumps({"spec": spec.to_dict(), "steps": steps, "phases": list(phases)}))
    argv = [sys.executable, *worker_command(config.backend), "bench", str(request), str(out)]
    outcome = run_process(argv, log_path=workdir / f"{tag}.stderr.log", timeout_s=timeout_s,
                          env=worker_env(requested(spec)))
    if outcome.interrupted:
        raise KeyboardInterrupt
    base = {"model": config.model, "backend": config.backend, "precision": config.precision, "mode": config.mode,
            "style": config.style, "batch_size": batch_size, "host_peak_rss_bytes": outcome.host_peak_rss_bytes,
            "execution": requested(spec).label()}
    if out.exists():
        return [{**row, **base} for row in json.loads(out.read_text())["rows"]]
    status = "timeout" if outcome.timed_out else "crashed"
    reason = outcome.signal_name or f"exit {outcome.returncode}"
    tail = stderr_tail(workdir / f"{tag}.stderr.log").strip().splitlines()
    return [{**base, "status": status, "error": f"{status} ({reason}): {tail[-1] if tail else ''}"[:300]}]


def sweep(config: BenchConfig, steps: int, phases: tuple[str, ...], timeout_s: float | None,
          on_rows: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """All batch sizes of ``config`` in ascending order, stopping at the out-of-memory boundary."""
    rows: list[dict[str, Any]] = []
    last_ok = 0
    with tempfile.TemporaryDirectory(prefix="dualbench-bench-") as tmp:
        for batch_size in sorted(config.batch_sizes):
            found = measure_once(config, batch_size, steps, phases, timeout_s, Path(tmp))
            rows += found
            if on_rows:
                on_rows(found)
            if not any(r.get("status") == "oom" for r in found):
                last_ok = batch_size if all(r.get("status") == "ok" for r in found) else last_ok
                continue
            retry = (last_ok + batch_size) // 2
            if retry > last_ok and retry != batch_size:
                again = [dict(r, retry_of=batch_size) for r in
                         measure_once(config, retry, steps, phases, timeout_s, Path(tmp))]
                rows += again
                if on_rows:
                    on_rows(again)
            break
    return rows


def largest_fitting_batch(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], int | None]:
    """(model, backend series, precision) -> the largest batch size measured without error."""
    best: dict[tuple[str, str, str], int | None] = {}
    for row in rows:
        key = (row["model"], series_name(row["backend"], row.get("style", "custom")), row["precision"])
        best.setdefault(key, None)
        if row.get("status") == "ok":
            best[key] = max(best[key] or 0, row["batch_size"])
    return best


def default_base(**overrides: Any) -> RunSpec:
    """The RunSpec template of a bench sweep (warm-up 5 steps, synthetic data by default)."""
    return replace(bench_spec("seed_cnn", "torch", 32, "synthetic"), **overrides)


def fit_ratio_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """fit over custom training images/s, per (model, Keras backend, mode, precision, batch size, measure):
    the cost of Keras's idiom, from one bench sweep that measured both styles."""
    key = ("model", "backend", "mode", "precision", "batch_size", "measure")
    found: dict[tuple, dict[str, float]] = {}
    for row in rows:
        if row.get("status") == "ok" and row.get("phase") == "train" and row.get("images_per_sec"):
            found.setdefault(tuple(row.get(k) for k in key), {})[row.get("style", "custom")] = row["images_per_sec"]
    return [{**dict(zip(key, k)), "custom_img_s": v["custom"], "fit_img_s": v["fit"],
             "fit_over_custom": v["fit"] / v["custom"]} for k, v in found.items() if {"custom", "fit"} <= set(v)]
