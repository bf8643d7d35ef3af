"""`dualbench export`: make, verify and serve every artifact, each step in its own worker process.

For every job (one set of canonical weights in one framework, compare.export_plan):

1. ``export``, once per format: one converter per process (common.deploy_worker);
2. ``export-reference``: the framework's own eval-mode logits on the verification images
   (for the jobs that produced an artifact);
3. ``export-verify``, once per artifact: the artifact in its own runtime, in a fresh process;
   this process compares its logits with the reference (common.deploy) and names what differs;
4. cross-framework: torch's ONNX and TensorFlow's ONNX made from the same weights (a parity
   transfer: the other framework loads the same canonical weights) agree in ONNX Runtime;
5. ``export-serve``: every verified artifact, each measurement its own process, artifacts in
   ABBA order over the rounds (compare.runner.abba), peak RSS from os.wait4 (compare.process).

Nothing here imports a framework. Row statuses: ``ok`` (made and verified), ``failed``
(not made: the converter's one-line message; the other formats go on), ``mismatch`` (it
computes something else, or cannot take the images; the message says what differs),
``unloadable`` (its own runtime could not load or run it).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

from common.deploy import CROSS_RTOL, Format, compare_logits, diagnose, failures, formats_of, latency_summary
from common.registry import worker_command
from compare.process import run_process, stderr_tail, worker_env
from compare.runner import abba


@dataclass
class ExportJob:
    """One set of canonical weights exported from one framework."""

    label: str  # folder under the export root: the run id, or <model>__<backend> for fresh models
    model: str
    backend: str
    seed: int
    weights: Path  # canonical weights (.npz)
    weights_sha256: str | None  # checked by every process that loads them
    images: Path  # normalised float32 NHWC verification images (.npy)
    num_classes: int
    in_shape: tuple[int, int, int]
    bn_momentum: float = 0.1  # torch convention (eval mode does not read it; the model is built with it)
    bn_epsilon: float = 1e-5
    formats: list[str] | None = None  # None: every format of the backend
    serve: bool = True  # take part in the serving measurement
    missing: str | None = None  # why this job cannot run (e.g. no weights): its rows fail with this


@dataclass
class ExportSettings:
    """How `dualbench export` runs (defaults: the CLI's)."""

    threads: int  # intra-op threads of every runtime (converters, verifiers, servers)
    seconds: float = 1.0  # timed seconds per batch size in each serving process
    rounds: int = 2  # serving processes per artifact, in ABBA order
    batch: int = 64  # the throughput batch size
    warmup: int = 10  # untimed batch-1 calls before timing (batch-N: a fifth of them, at least 1)
    verify_batch: int = 256  # images per call while verifying
    timeout_s: float | None = 1800.0  # per worker process
    jobs: int = 1  # worker processes at once while exporting and verifying (serving: always one)
    formats: list[str] | None = None  # None: every format
    serve: bool = True


@dataclass
class _Step:
    """How one worker process ended: its OUT JSON (or an error) and its peak RSS."""

    response: dict[str, Any] = field(default_factory=dict)
    peak_rss_bytes: int | None = None

    @property
    def ok(self) -> bool:
        return self.response.get("status") == "ok"

    @property
    def error(self) -> str:
        return str(self.response.get("error") or "no result")


def _size_bytes(path: Path) -> int | None:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else None


class Exporter:
    """Runs the export steps of a list of jobs under one export root."""

    def __init__(self, root: Path, settings: ExportSettings):
        self.root, self.settings = Path(root), settings
        self.root.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix=".work-", dir=self.root))
        self.env = worker_env()
        self.launches = 0
        self._lock = threading.Lock()  # guards launches, _running, _interrupted (--jobs threads)
        self._running: set[int] = set()  # process groups of the workers running now
        self._interrupted = False
        self._logits: dict[tuple[str, str], dict[str, np.ndarray]] = {}  # (label, format) -> verify arrays

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def images_path(self, key: str, images: np.ndarray) -> Path:
        """Save one verification image set (normalised float32 NHWC) in the work folder, once per key."""
        path = self.work / f"images-{key}.npy"
        if not path.exists():
            np.save(path, np.ascontiguousarray(images, np.float32))
        return path

    # -- one worker process ---------------------------------------------------------
    def _launch(self, job: ExportJob, task: str, request: dict[str, Any], name: str) -> _Step:
        stem = f"{job.label}.{name}"
        request_path, out_path = self.work / f"{stem}.request.json", self.work / f"{stem}.out.json"
        request_path.write_text(json.dumps(request), encoding="utf-8")
        out_path.unlink(missing_ok=True)
        log = self.root / "logs" / f"{stem}.log"
        argv = [sys.executable, *worker_command(job.backend), task, str(request_path), str(out_path)]
        with self._lock:
            if self._interrupted:
                raise KeyboardInterrupt
            self.launches += 1
        started: list[int] = []

        def register(pid: int) -> None:
            started.append(pid)
            with self._lock:
                self._running.add(pid)

        outcome = run_process(argv, log_path=log, timeout_s=self.settings.timeout_s, env=self.env,
                              on_start=register)
        with self._lock:
            self._running.difference_update(started)
        if outcome.interrupted:
            raise KeyboardInterrupt
        try:
            response = json.loads(out_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            how = "timed out (--timeout)" if outcome.timed_out else (
                f"killed by {outcome.signal_name}" if outcome.signal_name else f"exit {outcome.returncode}")
            last = (stderr_tail(log, 1) or "no output").strip()
            response = {"status": "error", "error": f"worker {how} without a result: {last}"[:500]}
        return _Step(response, outcome.host_peak_rss_bytes)

    def _request(self, job: ExportJob, **extra: Any) -> dict[str, Any]:
        return {"model": job.model, "num_classes": job.num_classes, "in_shape": list(job.in_shape),
                "bn_momentum": job.bn_momentum, "bn_epsilon": job.bn_epsilon, "weights": str(job.weights),
                "weights_sha256": job.weights_sha256, "threads": self.settings.threads,
                "images": str(job.images), **extra}

    def _progress(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    # -- steps ---------------------------------------------------------------------------
    def row_for(self, job: ExportJob, fmt: Format) -> dict[str, Any]:
        """The result row of one artifact, before it is made."""
        artifact = self.root / job.label / fmt.file
        return {"model": job.model, "backend": job.backend, "seed": job.seed, "label": job.label,
                "format": fmt.name, "runtime": fmt.runtime, "input_layout": fmt.layout, "rtol": fmt.rtol,
                "artifact": artifact.relative_to(self.root).as_posix(), "status": "pending", "error": None,
                "serve": job.serve}

    def export_jobs(self, jobs: list[ExportJob], reference: bool = True) -> list[dict[str, Any]]:
        """Every format of every job converted, then the reference logits of each job that produced an
        artifact, then every artifact verified; one row per format.

        With ``settings.jobs`` > 1 that many worker processes run at once within each phase (none of
        these steps is timed; serving always runs one process at a time).
        """
        rows = {job.label: self._rows(job) for job in jobs}
        pending = [(job, row) for job in jobs if not job.missing for row in rows[job.label]]
        self._parallel([partial(self._convert, job, row) for job, row in pending])
        made = [(job, row) for job, row in pending if row["status"] != "failed"]
        needed = list({job.label: job for job, _row in made}.values()) if reference else []
        references = dict(zip([job.label for job in needed],
                              self._parallel([partial(self._reference, job) for job in needed])))
        tasks = []
        for job, row in made:
            logits = references.get(job.label)
            if isinstance(logits, str):  # the reference failed: the artifact cannot be verified
                row.update(status="failed", error=f"not verified: the reference logits failed: {logits}")
            else:
                tasks.append(partial(self.verify, job, row, logits))
        self._parallel(tasks)
        return [row for job in jobs for row in rows[job.label]]

    def _rows(self, job: ExportJob) -> list[dict[str, Any]]:
        chosen = job.formats if job.formats is not None else self.settings.formats
        rows = [self.row_for(job, fmt) for fmt in formats_of(job.backend, chosen)]
        if job.missing:
            return [{**row, "status": "failed", "error": job.missing} for row in rows]
        return rows

    def _reference(self, job: ExportJob) -> np.ndarray | str:
        """The framework's eval logits, or the one-line error of the process that failed to make them."""
        path = self.work / f"{job.label}.reference.npy"
        step = self._launch(job, "export-reference", self._request(job, logits=str(path)), "reference")
        if not step.ok:
            self._progress(f"{job.label}: reference logits failed: {step.error}")
            return step.error
        return np.load(path)

    def _parallel(self, tasks: list[Callable[[], Any]]) -> list[Any]:
        """Results of ``tasks`` in order, ``settings.jobs`` at a time; Ctrl-C stops every running group."""
        if self.settings.jobs <= 1 or len(tasks) <= 1:
            return [task() for task in tasks]
        pool = ThreadPoolExecutor(max_workers=self.settings.jobs)
        futures = [pool.submit(task) for task in tasks]
        try:
            return [future.result() for future in futures]
        except KeyboardInterrupt:
            self._interrupted = True
            for future in futures:
                future.cancel()
            with self._lock:
                for pid in self._running:  # their threads then reap them (compare.process)
                    try:
                        os.killpg(pid, signal.SIGTERM)
                    except (ProcessLookupError, PermissionError):
                        pass
            raise
        finally:
            pool.shutdown(wait=True)

    def _convert(self, job: ExportJob, row: dict[str, Any]) -> None:
        artifact = self.root / row["artifact"]
        artifact.parent.mkdir(parents=True, exist_ok=True)
        if artifact.is_dir():  # a failed conversion must not leave an earlier export's artifact behind
            shutil.rmtree(artifact)
        else:
            artifact.unlink(missing_ok=True)
        request = self._request(job, format=row["format"], artifact=str(artifact))
        step = self._launch(job, "export", request, f"{row['format']}.export")
        if not step.ok:
            row.update(status="failed", error=step.error)
            self._progress(f"{job.label} {row['format']}: FAILED to export: {step.error}")
            return
        row.update({k: step.response.get(k) for k in ("exporter", "fallback_reason", "opset", "convert_s")})
        row["size_bytes"] = _size_bytes(artifact)
        self._progress(f"{job.label} {row['format']}: exported in {row['convert_s']:.1f} s"
                       + (f" (fallback: {row['fallback_reason']})" if row["fallback_reason"] else ""))

    def verify(self, job: ExportJob, row: dict[str, Any], reference: np.ndarray | None) -> None:
        """Verify the artifact of ``row`` in a fresh process of its runtime; updates the row.

        With ``reference`` (the framework's eval logits) the row gets the differences, and
        status ``ok`` or ``mismatch`` with a message saying what differs; without, it only
        records the logits (for the cross-framework check).
        """
        logits_path = self.work / f"{job.label}.{row['format']}.logits.npz"
        request = self._request(job, format=row["format"], artifact=str(self.root / row["artifact"]),
                                logits=str(logits_path), batch=self.settings.verify_batch)
        step = self._launch(job, "export-verify", request, f"{row['format']}.verify")
        response = step.response
        row.update(runtime_version=response.get("runtime_version"),
                   verify_frameworks=response.get("frameworks_loaded"))
        if not step.ok:  # its runtime could not load or run it
            row.update(status="unloadable", error=f"the {row['runtime']} verifier failed: {step.error}",
                       verified=False)
        elif response.get("input_shape_error"):
            row.update(status="mismatch", error=response["input_shape_error"], verified=False)
        else:
            with np.load(logits_path) as data:
                arrays = {key: data[key] for key in data.files}
            self._logits[(job.label, row["format"])] = arrays
            if reference is not None:
                self._judge(row, reference, arrays)
            else:
                row.update(status="ok", verified=None)
        detail = row["error"] or (f"max rel diff {row['max_rel_diff']:.1e}" if row.get("verified") else "")
        self._progress(f"{job.label} {row['format']}: {row['status']}" + (f" ({detail})" if detail else ""))

    def _judge(self, row: dict[str, Any], reference: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        metrics = compare_logits(reference, arrays["logits"])
        row.update({k: metrics.get(k) for k in ("images", "max_abs_diff", "max_rel_diff", "top1_agreement")})
        problems = failures(metrics, row["rtol"])
        if not problems:
            row.update(status="ok", verified=True)
            return
        notes = [] if metrics.get("shape_error") else diagnose(
            reference, arrays["batched"], arrays.get("single"), arrays.get("transposed"))
        row.update(status="mismatch", verified=False,
                   error=f"{row['format']} differs from {row['backend']}'s own eval logits: "
                         + "; ".join(problems + notes))

    # -- cross-framework ONNX -------------------------------------------------------------
    def cross_framework(self, jobs: list[ExportJob], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """torch's ONNX vs TensorFlow's ONNX from the same weights, both in ONNX Runtime, per (model, seed)."""
        out = []
        by_key = {(j.model, j.seed, j.backend): j for j in jobs if not j.missing}
        for (model, seed, backend), source in by_key.items():
            other = by_key.get((model, seed, "tensorflow"))
            if backend != "torch" or other is None or not self._selected("onnx"):
                continue
            result = {"model": model, "seed": seed, "weights_from": source.label, "rtol": CROSS_RTOL}
            torch_logits = self._logits.get((source.label, "onnx"))
            tf_rows = [r for r in rows if r["label"] == other.label and r["format"] == "onnx"]
            if not (other.weights_sha256 and other.weights_sha256 == source.weights_sha256):
                # a parity transfer: TensorFlow builds the model from torch's canonical weights
                transfer = replace(other, label=f"{model}__seed{seed}__tensorflow_from_{source.label}",
                                   weights=source.weights, weights_sha256=source.weights_sha256,
                                   formats=["onnx"], serve=False)
                tf_rows = self.export_jobs([transfer], reference=False)
            tf_logits = self._logits.get((tf_rows[0]["label"], "onnx")) if tf_rows else None
            result["tensorflow_onnx"] = tf_rows[0]["artifact"] if tf_rows else None
            if torch_logits is None or tf_logits is None:
                missing = [r["error"] for r in tf_rows if r.get("error")] or ["an ONNX artifact is missing"]
                result.update(passed=False, error=f"not compared: {missing[0]}")
            else:
                metrics = compare_logits(torch_logits["logits"], tf_logits["logits"])
                problems = failures(metrics, CROSS_RTOL)
                result.update({k: metrics.get(k) for k in ("images", "max_abs_diff", "max_rel_diff",
                                                           "top1_agreement")})
                result.update(passed=not problems, error="; ".join(problems) or None)
            self._progress(f"{model} seed {seed}: torch ONNX vs TensorFlow ONNX: "
                           + ("agree" if result["passed"] else f"DISAGREE ({result['error']})"))
            out.append(result)
        return out

    def _selected(self, name: str) -> bool:
        return self.settings.formats is None or name in self.settings.formats

    # -- serving --------------------------------------------------------------------------
    def serve(self, jobs: list[ExportJob], rows: list[dict[str, Any]]) -> None:
        """Every verified artifact of a serving job, one process per measurement, ABBA over the rounds."""
        by_label = {job.label: job for job in jobs}
        chosen = [row for row in rows if row["status"] == "ok" and row.get("serve")]
        measured: dict[int, list[dict[str, Any]]] = {id(row): [] for row in chosen}
        s = self.settings
        for round_index, row in abba(chosen, s.rounds):
            job = by_label[row["label"]]
            request = self._request(job, format=row["format"], artifact=str(self.root / row["artifact"]),
                                    batch=s.batch, seconds=s.seconds, warmup=s.warmup)
            step = self._launch(job, "export-serve", request, f"{row['format']}.serve{round_index}")
            if step.ok:
                # the process's own VmHWM; the wait4 figure also holds this parent's RSS (see own_peak_rss_bytes)
                measured[id(row)].append({**step.response,
                                          "peak_rss_bytes": step.response.get("peak_rss_bytes") or step.peak_rss_bytes})
            else:
                row["serve_error"] = step.error
            self._progress(f"serve {row['label']} {row['format']} round {round_index + 1}/{s.rounds}: "
                           + ("ok" if step.ok else f"FAILED ({step.error})"))
        for row in chosen:
            rounds = measured[id(row)]
            if rounds:
                row.update(latency_summary(rounds, s.batch))
                row["serve_threads"] = rounds[0].get("settings")
                row["serve_frameworks"] = rounds[0].get("frameworks_loaded")

    def run(self, jobs: list[ExportJob]) -> dict[str, Any]:
        """All steps for ``jobs``: {"rows": [...], "cross_framework": [...]}."""
        rows = self.export_jobs(jobs)
        cross = self.cross_framework(jobs, rows)
        if self.settings.serve:
            self.serve(jobs, rows)
        return {"rows": rows, "cross_framework": cross}
