"""The scaling table and figure: each framework's throughput as the world grows (weak scaling).

Weak scaling: the per-replica batch stays fixed, so N replicas train a global batch N times
larger. Per model, framework and world size N (medians over the ok seeds):

* ``train_img_s``: compute-only training images/s of the whole run (global batch / step time,
  measured on the chief's clock), ``pipeline_img_s`` the pipeline-inclusive figure;
* ``speedup`` = throughput_N / throughput_1 and ``efficiency`` E_N = throughput_N / (N x throughput_1),
  where the same model and framework also ran with one process;
* ``time_to_target_s``: training wall time (evaluation excluded) until the first evaluation
  (every epoch end, and every ``--eval-every-steps`` steps) whose test accuracy reached the target,
  when one is given (``--target-accuracy``, the runs' own unless `dualbench report` overrides it);
  the median over seeds, "not reached" (n/a) when half the seeds or more never reached it
  (compare.time_to_accuracy, the same definition as the head-to-head's);
* ``tf_over_torch``: TensorFlow's throughput over torch's at the same N.

When every rank of every run shared one host, the N processes split that host's cores: the
figures then measure each engine's mechanism and overhead, not how the hardware scales
(``shared_host_note`` says so in the report).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.results import RunResult
from compare import time_to_accuracy

SCALING_COLUMNS = ["model", "backend", "world_size", "hosts", "per_replica_batch", "global_batch", "runs_ok",
                   "train_img_s", "speedup", "efficiency", "pipeline_img_s", "time_to_target_s", "test_acc_pct",
                   "tf_over_torch"]


def _median(values: list[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.median(values)) if values else math.nan


def _hosts(result: RunResult) -> list[str]:
    """Every rank's host (a single process: the manifest's host name)."""
    hosts = (result.distributed or {}).get("hosts")
    if hosts:
        return list(hosts)
    name = (result.manifest or {}).get("hostname")
    return [name] if name else []


def time_to_target(result: RunResult, target: float | None) -> float:
    """Training seconds at the run's first evaluation (mid-epoch ones included, ``--eval-every-steps``) at or
    above ``target`` test accuracy; NaN: never, or no target. The one definition is
    compare.time_to_accuracy's (the head-to-head and the report's time-to-accuracy section use it too)."""
    if target is None:
        return math.nan
    hit = time_to_accuracy.first_reaching(result, target)
    return float(hit["wall_s"]) if hit is not None else math.nan


def scaling_table(results: list[RunResult], target_accuracy: float | None = None) -> pd.DataFrame:
    """One row per (model, backend, world size) over the ok runs (RunResults with their real model names)."""
    from compare.tables import ordered_backends, ordered_models

    ok = [r for r in results if r.status == "ok"]
    rows = []
    for model in ordered_models(ok):
        for backend in ordered_backends(ok):
            runs = [r for r in ok if r.model == model and r.backend == backend]
            for world in sorted({r.world_size or 1 for r in runs}):
                group = [r for r in runs if (r.world_size or 1) == world]
                spec = group[0].spec or {}
                batch = (spec.get("recipe") or {}).get("batch_size")
                rows.append({
                    "model": model, "backend": backend, "world_size": world,
                    "hosts": len({h for r in group for h in _hosts(r)}) or 1,
                    "per_replica_batch": batch, "global_batch": batch * world if batch else None,
                    "runs_ok": len(group),
                    "train_img_s": _median([r.train_images_per_sec for r in group]),
                    "pipeline_img_s": _median([r.pipeline_images_per_sec for r in group]),
                    # a seed that never reached the target counts as infinitely slow (compare.time_to_accuracy)
                    "time_to_target_s": time_to_accuracy.median_time([time_to_target(r, target_accuracy)
                                                                      for r in group]),
                    "test_acc_pct": 100 * _median([r.test_accuracy for r in group]),
                })
    frame = pd.DataFrame(rows, columns=[c for c in SCALING_COLUMNS if c not in ("speedup", "efficiency",
                                                                                   "tf_over_torch")])
    return _derived(frame)


def _derived(frame: pd.DataFrame) -> pd.DataFrame:
    """Speedup and efficiency against N = 1 of the same model and backend; tf/torch at the same N."""
    speedup, efficiency, ratio = [], [], []
    for _, row in frame.iterrows():
        same = frame[(frame["model"] == row["model"]) & (frame["backend"] == row["backend"])]
        single = same[same["world_size"] == 1]["train_img_s"]
        base = float(single.iloc[0]) if len(single) else math.nan
        speedup.append(row["train_img_s"] / base if base > 0 else math.nan)
        efficiency.append(speedup[-1] / row["world_size"])
        torch_row = frame[(frame["model"] == row["model"]) & (frame["backend"] == "torch")
                          & (frame["world_size"] == row["world_size"])]["train_img_s"]
        torch_img_s = float(torch_row.iloc[0]) if len(torch_row) else math.nan
        ratio.append(row["train_img_s"] / torch_img_s if row["backend"] == "tensorflow" and torch_img_s > 0
                     else math.nan)
    frame = frame.assign(speedup=speedup, efficiency=efficiency, tf_over_torch=ratio)
    return frame[SCALING_COLUMNS]


def shared_host_note(results: list[RunResult]) -> str | None:
    """The caveat for data-parallel runs whose ranks all ran on one host (None when some spanned hosts)."""
    parallel = [r for r in results if (r.world_size or 1) > 1 and r.status == "ok"]
    if not parallel:
        return None
    hosts = {h for r in parallel for h in _hosts(r)}
    if len(hosts) > 1 or any(len(set(_hosts(r))) > 1 for r in parallel):
        return None
    host = next(iter(hosts), "one host")
    return (f"Every rank of every data-parallel run ran on one host ({host}): the N processes shared its "
            "cores (each got cores / N threads), so these figures show each engine's mechanism and its "
            "overhead (collectives, extra processes), not how the hardware scales. Scaling needs one device "
            "or host per replica.")


def has_scaling(results: list[RunResult]) -> bool:
    """Whether the folder holds a data-parallel run (and so a scaling table)."""
    return any((r.world_size or 1) > 1 for r in results)


def scaling_blocks(results: list[RunResult], table: pd.DataFrame, plots_dir: Path, root: Path,
                   target: float | None) -> list[Any]:
    """The report's "Scaling" section from ``scaling_table(results, target)``, with its figure."""
    from compare.document import Block
    from compare.plots import plot_scaling

    blocks = [Block("h2", "Scaling"),
              Block("p", "Weak scaling: the per-replica batch is fixed, the global batch grows with the world "
                         "size. train_img_s is the whole run's compute-only images/s (global batch / step time "
                         "on the chief); speedup and efficiency are against one process of the same framework; "
                         "tf_over_torch compares the frameworks at the same world size"
                         + (f"; time_to_target_s is the training time to {100 * target:g}% test accuracy."
                            if target is not None else ".")),
              Block("table", table=table)]
    note = shared_host_note(results)
    if note:
        blocks.append(Block("p", f"**{note}**"))
    path = plot_scaling(table, plots_dir / "scaling.png")
    if path is not None:
        blocks.append(Block("image", text="scaling", path=path, link=str(path.relative_to(root))))
    return blocks
