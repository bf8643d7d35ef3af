"""Image retrieval for finished runs: one ``retrieval`` worker per run, then the tables.

Each ok run's final weights (OUT/weights/<run_id>.npz) are loaded into a fresh model of
its framework, which embeds the test split (queries) and the training split (gallery)
with the penultimate layer (``Backend.embed``); common.retrieval ranks the gallery by
cosine similarity and scores recall@1/5/10 and mAP@R by class label.

Cross-framework agreement: the same worker also embeds the queries with the final weights
of the other frameworks' runs of the same model and seed, so every set of weights is
embedded by both frameworks. Their difference, max |a - b| / max(|a|, |b|) over all query
embeddings, is judged against the forward-parity criterion (compare.parity.DEFAULT_RTOL):
identical weights must give the same embeddings up to float32 rounding.

Outputs: OUT/retrieval.json (both tables and the criterion), retrieval.csv and
retrieval_agreement.csv (+ .parquet); the report's "Image retrieval" section reads the JSON.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.config import series_name
from common.distributed import configuration_label
from common.registry import worker_command
from common.results import RunResult
from compare.parity import DEFAULT_RTOL, relative_diff
from compare.process import run_process, stderr_tail, worker_env

RESULTS_FILE = "retrieval.json"
METRIC_COLUMNS = ["model", "backend", "seed", "status", "recall@1", "recall@5", "recall@10", "map@r",
                  "embedding_dim", "queries", "gallery", "embed_s", "weights_sha256", "error"]
AGREEMENT_COLUMNS = ["model", "seed", "weights_of", "embedded_by", "max_rel_diff", "max_abs_diff",
                     "embedding_scale", "rtol", "agrees"]


def final_weights(store: Any, result: RunResult) -> Path | None:
    """The run's final canonical weights (``RunResult.final_weights_file``, relative to OUT), if on disk."""
    name = getattr(result, "final_weights_file", None)
    if not name:
        return None
    path = Path(name) if Path(name).is_absolute() else store.root / name
    return path if path.is_file() else None


def _launch(store: Any, result: RunResult, work: Path, cross: dict[str, Path], timeout_s: float | None,
            sha256: dict[str, str | None]) -> tuple[dict[str, Any] | None, str | None]:
    """Run one retrieval worker; (its metrics, None) or (None, a one-line error).

    ``sha256``: {weights path: the SHA-256 its run recorded}; the worker refuses a file that differs."""
    request, out = work / f"{result.run_id}.request.json", work / result.run_id
    request.write_text(json.dumps({"spec": result.spec, "weights": str(final_weights(store, result)),
                                   "cross": {name: str(path) for name, path in cross.items()},
                                   "sha256": sha256}))
    argv = [sys.executable, *worker_command(result.backend), "retrieval", str(request), str(out)]
    log = store.log_path(f"retrieval__{result.run_id}")
    outcome = run_process(argv, log_path=log, timeout_s=timeout_s, env=worker_env())
    if outcome.interrupted:
        raise KeyboardInterrupt
    try:
        return json.loads((out / "metrics.json").read_text()), None
    except (OSError, ValueError):
        tail = [line for line in stderr_tail(log, 5).splitlines() if line.strip()]
        how = "timed out" if outcome.timed_out else f"exit {outcome.returncode}"
        return None, f"{how}: {tail[-1] if tail else 'no output'} (see {log})"


def _configuration(result: RunResult) -> str:
    """The run's configuration as tables name it: the model, "<model> (world N)" for a data-parallel run
    (runs of different world sizes have different weights: never compared or pooled)."""
    world = result.world_size or 1
    if world > 1 and result.model.endswith(f" (world {world})"):  # already labelled (tables.as_configurations)
        return result.model
    return configuration_label(result.model, world)


def _series(result: RunResult) -> str:
    """The run's series as the tables name it: the backend, "<backend>:fit" for Keras's fit style."""
    return series_name(result.backend, (result.spec or {}).get("style", "custom"))


def _metric_row(result: RunResult, metrics: dict[str, Any] | None, error: str | None) -> dict[str, Any]:
    row = {"model": _configuration(result), "backend": _series(result), "seed": result.seed,
           "status": "ok" if metrics else "error", "weights_sha256": result.final_weights_sha256, "error": error}
    for key in METRIC_COLUMNS[4:12]:
        row[key] = (metrics or {}).get(key, math.nan)
    return row


def _agreement_rows(group: list[RunResult], work: Path) -> list[dict[str, Any]]:
    """For each run's weights: its own framework's query embeddings against every other framework's."""
    rows = []
    for owner in group:
        own = work / owner.run_id / "queries.npy"
        for other in group:
            crossed = work / other.run_id / f"cross_{owner.run_id}.npy"
            if other is owner or not own.is_file() or not crossed.is_file():
                continue
            a, b = np.load(own), np.load(crossed)
            scale = float(max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0)))
            rel = relative_diff(a, b) if a.shape == b.shape else math.inf
            rows.append({"model": _configuration(owner), "seed": owner.seed, "weights_of": _series(owner),
                         "embedded_by": f"{_series(owner)} vs {_series(other)}", "max_rel_diff": rel,
                         "max_abs_diff": float(np.abs(a - b).max()) if a.shape == b.shape else math.inf,
                         "embedding_scale": scale, "rtol": DEFAULT_RTOL, "agrees": bool(rel <= DEFAULT_RTOL)})
    return rows


def run_retrieval(store: Any, results: list[RunResult], timeout_s: float | None = None,
                  progress: Any = print) -> dict[str, pd.DataFrame]:
    """Retrieval metrics of every ok run with final weights, and the cross-framework agreement.

    Writes OUT/retrieval.json and the CSV/Parquet tables; returns {"retrieval", "retrieval_agreement"}.
    """
    usable = [r for r in results if r.status == "ok" and final_weights(store, r) is not None]
    groups: dict[tuple[str, int], list[RunResult]] = {}
    for result in usable:  # per configuration (a data-parallel run is "<model> (world N)") and seed
        groups.setdefault((_configuration(result), result.seed), []).append(result)
    metric_rows, agreement_rows = [], []
    work = Path(tempfile.mkdtemp(prefix=".work-retrieval-", dir=store.root))  # swept by the next run if killed
    try:
        for group in groups.values():
            for result in group:
                cross = {other.run_id: final_weights(store, other) for other in group if other is not result}
                progress(f"retrieval: {result.run_id} (embedding {len(cross) + 1} set(s) of weights) ...")
                sha256 = {str(final_weights(store, run)): run.final_weights_sha256 for run in group}
                metrics, error = _launch(store, result, work, cross, timeout_s, sha256)
                metric_rows.append(_metric_row(result, metrics, error))
            agreement_rows += _agreement_rows(group, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tables = {"retrieval": pd.DataFrame(metric_rows, columns=METRIC_COLUMNS),
              "retrieval_agreement": pd.DataFrame(agreement_rows, columns=AGREEMENT_COLUMNS)}
    store.write_json(RESULTS_FILE, {"rtol": DEFAULT_RTOL, "metrics": metric_rows, "agreement": agreement_rows,
                                    "skipped": sorted({r.run_id for r in results} - {r.run_id for r in usable})})
    for name, frame in tables.items():
        store.write_table(name, frame)
    return tables


def load_retrieval(store: Any) -> dict[str, Any] | None:
    """OUT/retrieval.json as {"metrics": DataFrame, "agreement": DataFrame, "rtol", "skipped"}; None if absent."""
    try:
        raw = json.loads((store.root / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return {"metrics": pd.DataFrame(raw.get("metrics") or [], columns=METRIC_COLUMNS),
            "agreement": pd.DataFrame(raw.get("agreement") or [], columns=AGREEMENT_COLUMNS),
            "rtol": raw.get("rtol", DEFAULT_RTOL), "skipped": raw.get("skipped") or []}


def stale_runs(retrieval: dict[str, Any], results: list[RunResult]) -> list[str]:
    """Runs whose weights changed since their retrieval metrics were computed (rerun since)."""
    current = {(_configuration(r), r.backend, r.seed): (r.run_id, r.final_weights_sha256) for r in results}
    return [current[key][0] for key, sha in
            (((row.model, row.backend, row.seed), row.weights_sha256) for row in retrieval["metrics"].itertuples())
            if key in current and current[key][1] not in (None, sha)]
