"""Time to accuracy (DAWNBench, MLPerf Training): the training wall-clock at the first evaluation
that reaches the target test accuracy.

The clock is the run's training clock (common.loop): compile step, pipeline build and
teardown and every training step included; evaluations, process start-up and data loading
excluded (evaluation cost is reported apart, ``eval_s``). A run is evaluated at epoch ends
and, with ``--eval-every-steps S``, every S optimiser steps, so the time is an upper bound
by at most one evaluation interval. A seed that never reaches the target is "not reached";
the median over seeds counts it as infinitely slow, so the median is "not reached" when
half the seeds or more did not reach the target.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import pandas as pd

from common.results import RunResult

NOT_REACHED = "not reached"
SEED_COLUMNS = ["model", "backend", "seed", "status", "target_acc_pct", "reached", "tta_s", "tta_step",
                "tta_epoch", "best_acc_pct", "evaluations", "eval_every_steps", "eval_s_total"]
SUMMARY_COLUMNS = ["model", "backend", "target_acc_pct", "seeds_reached", "tta_median", "tta_per_seed",
                   "tta_median_s", "eval_every_steps", "eval_s_total_median"]


def evaluation_rows(result: RunResult) -> list[dict[str, Any]]:
    """Every evaluation of a run (older results without ``evaluations``: their epoch rows)."""
    return list(result.evaluations or result.epochs or [])


def first_reaching(result: RunResult, target: float) -> dict[str, Any] | None:
    """The first evaluation row with test accuracy >= ``target``, or None."""
    for row in evaluation_rows(result):
        accuracy = row.get("test_accuracy")
        if accuracy is not None and accuracy >= target and row.get("wall_s") is not None:
            return row
    return None


def target_of(results: Iterable[RunResult], override: float | None = None) -> float | None:
    """The target accuracy: ``override`` if given, else the one the runs were started with (None: none)."""
    if override is not None:
        return float(override)
    targets = {r.spec.get("target_accuracy") for r in results if r.spec and r.spec.get("target_accuracy")}
    return max(targets) if targets else None  # runs started with different targets: the strictest


def seed_table(results: list[RunResult], target: float | None) -> pd.DataFrame:
    """One row per ok run: when (clock, step, epoch) it first reached ``target``, NaN when it did not."""
    rows = []
    for r in results:
        if target is None or r.status != "ok":
            continue
        hit = first_reaching(r, target)
        evaluations = evaluation_rows(r)
        accuracies = [row["test_accuracy"] for row in evaluations if row.get("test_accuracy") is not None]
        rows.append({"model": r.model, "backend": r.backend, "seed": r.seed, "status": r.status,
                     "target_acc_pct": 100 * target, "reached": hit is not None,
                     "tta_s": hit["wall_s"] if hit else math.nan, "tta_step": hit.get("step") if hit else None,
                     "tta_epoch": hit.get("epoch") if hit else math.nan,
                     "best_acc_pct": 100 * max(accuracies) if accuracies else math.nan,
                     "evaluations": len(evaluations), "eval_every_steps": (r.spec or {}).get("eval_every_steps"),
                     "eval_s_total": sum(row.get("eval_s") or 0.0 for row in evaluations)})
    frame = pd.DataFrame(rows, columns=SEED_COLUMNS)
    frame["tta_step"] = frame["tta_step"].astype("Int64")
    frame["eval_every_steps"] = frame["eval_every_steps"].astype("Int64")
    return frame


def median_time(times: list[float]) -> float:
    """Median seconds with not-reached (NaN) counted as infinite; NaN when that median is not reached."""
    if not times:
        return math.nan
    median = float(np.median([t if math.isfinite(t) else math.inf for t in times]))
    return median if math.isfinite(median) else math.nan


def seconds_text(value: float) -> str:
    """'41.2 s', or 'not reached' for NaN."""
    return f"{value:.1f} s" if math.isfinite(value) else NOT_REACHED


def summary_table(seeds: pd.DataFrame) -> pd.DataFrame:
    """Per model and backend: seeds reached, the median and every seed's time, as text and seconds."""
    rows = []
    for (model, backend), runs in seeds.groupby(["model", "backend"], sort=False):
        runs = runs.sort_values("seed")
        times = [float(t) for t in runs["tta_s"]]
        median = median_time(times)
        every = runs["eval_every_steps"].dropna()
        rows.append({"model": model, "backend": backend, "target_acc_pct": float(runs["target_acc_pct"].iloc[0]),
                     "seeds_reached": f"{int(runs['reached'].sum())}/{len(runs)}",
                     "tta_median": seconds_text(median),
                     "tta_per_seed": ", ".join(f"seed {s}: {seconds_text(t)}" for s, t in zip(runs["seed"], times)),
                     "tta_median_s": median, "eval_every_steps": int(every.iloc[0]) if len(every) else pd.NA,
                     "eval_s_total_median": float(np.median(runs["eval_s_total"]))})
    frame = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    frame["eval_every_steps"] = frame["eval_every_steps"].astype("Int64")
    return frame


def head_to_head_columns(summary: pd.DataFrame, model: str, base: str, other: str) -> dict[str, Any]:
    """The time-to-accuracy cells of one head-to-head row (empty text and NaN without a target)."""
    index = summary.set_index(["model", "backend"]) if not summary.empty else None
    if index is None or (model, base) not in index.index or (model, other) not in index.index:
        return {"target_acc_pct": math.nan, "tta_base": "", "tta_other": "", "tta_ratio": math.nan}
    a, b = index.loc[(model, base)], index.loc[(model, other)]
    ratio = b["tta_median_s"] / a["tta_median_s"] if a["tta_median_s"] > 0 else math.nan
    return {"target_acc_pct": a["target_acc_pct"],
            "tta_base": f"median {a['tta_median']} ({a['seeds_reached']} seeds reached; {a['tta_per_seed']})",
            "tta_other": f"median {b['tta_median']} ({b['seeds_reached']} seeds reached; {b['tta_per_seed']})",
            "tta_ratio": ratio}
