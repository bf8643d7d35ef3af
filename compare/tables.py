"""pandas tables from RunResults: summary, head-to-head, per-epoch curves, failures.

The DataFrames keep numbers numeric (NaN = not measured; written as "n/a" in
CSV and in displayed tables, as null in Parquet), so a device peak that was not
measured never shows up as 0.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Iterable

import numpy as np
import pandas as pd

from common.architectures import ARCHITECTURES
from common.config import STYLES, series_name
from common.distributed import configuration_label
from common.registry import REAL_BACKENDS
from common.results import RunResult
from compare import stats, time_to_accuracy

MIB = 1024 * 1024
# train_img_s_seeds_ci_*: 95% t interval across seeds of the runs' images/s (run-to-run spread);
# train_img_s_steps_ci_*: order-statistic interval over the pooled steps (secondary: steps are
# autocorrelated within a run and say nothing about run-to-run spread).
# *_less_data_mib: the peak minus the dataset bytes the pipelines hold in that memory (Backend.data_residency).
SUMMARY_COLUMNS = [
    "model", "backend", "runs_ok", "runs_total", "test_acc_mean_pct", "test_acc_std_pct",
    "train_img_s", "train_img_s_seeds_ci_lo", "train_img_s_seeds_ci_hi", "train_img_s_steps_ci_lo",
    "train_img_s_steps_ci_hi", "pipeline_img_s", "step_ms_p50", "step_ms_p90",
    "compile_s", "startup_s", "epoch_wall_s", "train_data_on", "host_peak_rss_mib", "host_data_mib",
    "host_rss_less_data_mib", "device_peak_mib", "device_data_mib", "device_peak_less_data_mib",
    "trainable_params", "macs_per_image",
]
# Throughput ratios: median of the per-seed paired ratios, 95% t interval across seeds on the log
# ratios (compare.stats.paired_ratio_ci). Accuracy: paired t over seeds (Welch only without pairs).
HEAD_TO_HEAD_COLUMNS = [
    "model", "comparison", "train_img_s_ratio", "train_img_s_ratio_ci_lo", "train_img_s_ratio_ci_hi",
    "train_img_s_ratio_seed_min", "train_img_s_ratio_seed_max", "pipeline_img_s_ratio", "host_rss_ratio",
    "host_rss_less_data_ratio", "device_peak_ratio", "device_peak_less_data_ratio", "acc_diff_pts",
    "acc_diff_ci_lo_pts", "acc_diff_ci_hi_pts", "acc_test", "acc_seed_spread_pts", "seeds", "verdict",
    "target_acc_pct", "tta_base", "tta_other", "tta_ratio",  # time to accuracy (compare.time_to_accuracy)
]
# fit / custom step of one Keras backend (idiom_cost_table): the head-to-head's ratio columns, renamed
IDIOM_RATIO_COLUMNS = ("train_img_s_ratio", "train_img_s_ratio_ci_lo", "train_img_s_ratio_ci_hi",
                       "train_img_s_ratio_seed_min", "train_img_s_ratio_seed_max", "pipeline_img_s_ratio")
IDIOM_COST_COLUMNS = ["model", "backend", *(f"fit_over_custom_{c}" for c in IDIOM_RATIO_COLUMNS),
                      "compile_s_custom", "compile_s_fit", "acc_diff_pts", "seeds", "verdict"]
CURVE_COLUMNS = ["model", "backend", "seed", "status", "epoch", "train_loss", "train_accuracy", "test_loss",
                 "test_accuracy", "wall_s"]
FAILURE_COLUMNS = ["run_id", "status", "exit_code", "error"]


def as_configurations(results: Iterable[RunResult]) -> list[RunResult]:
    """The runs with a data-parallel run's model named by its configuration ("resnet20 (world 2)").

    Every table, figure and audit entry is per model AND world size: runs of different
    sizes are different configurations, never pooled or paired across sizes (the scaling
    table, compare.scaling, puts the sizes side by side).
    """
    out = []
    for r in results:
        label = configuration_label(r.model, r.world_size or 1)
        already = r.model.endswith(f" (world {r.world_size})")  # idempotent
        out.append(r if label == r.model or already else dataclasses.replace(r, model=label))
    return out


def ordered_models(results: Iterable[RunResult]) -> list[str]:
    """Models in registry order (unknown names after, in first-seen order); a model's data-parallel
    configurations right after it, by world size."""
    results = list(results)
    seen = list(dict.fromkeys(r.model for r in results))
    worlds = {r.model: r.world_size or 1 for r in results}
    order = list(ARCHITECTURES)

    def key(name: str) -> tuple[int, int, int]:
        base = name.split(" (world ")[0]
        return (order.index(base) if base in order else len(order), seen.index(name) if base not in order else 0,
                worlds.get(name, 1))

    return sorted(seen, key=key)


def ordered_backends(results: Iterable[RunResult]) -> list[str]:
    """torch, tensorflow, keras-torch first (each followed by its fit series), then others in first-seen order."""
    seen = list(dict.fromkeys(r.backend for r in results))
    order = [series_name(b, style) for b in REAL_BACKENDS for style in STYLES]
    known = [b for b in order if b in seen]
    return known + [b for b in seen if b not in known]


def by_series(results: Iterable[RunResult]) -> list[RunResult]:
    """Copies of ``results`` whose ``backend`` is what the tables compare: the backend, or "<backend>:fit"
    for runs in Keras's fit style (RunSpec.series). Every table, plot and report section groups by it."""
    return [r if ":" in r.backend else  # already a series name (idempotent)
            dataclasses.replace(r, backend=series_name(r.backend, (r.spec or {}).get("style", "custom")))
            for r in results]


def _values(runs: list[RunResult], name: str) -> list[float]:
    out = []
    for r in runs:
        value = getattr(r, name)
        if value is not None and isinstance(value, (int, float)) and math.isfinite(value):
            out.append(float(value))
    return out


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else math.nan


def _pooled_step_throughputs(runs: list[RunResult]) -> tuple[list[float], list[float]]:
    """(images/s per steady-state step, step seconds) pooled over ``runs``."""
    throughputs, times = [], []
    for r in runs:
        for seconds, batch in zip(r.step_times_s or [], r.step_batch_sizes or []):
            if seconds and seconds > 0:
                throughputs.append(batch / seconds)
                times.append(seconds)
    return throughputs, times


def _throughput(runs: list[RunResult]) -> dict[str, float]:
    """Median images/s of the pooled steady-state steps, its interval across seeds and over the pooled steps.

    Falls back to the median of the per-run medians (step interval n/a) when no run
    stored its step times.
    """
    _, seeds_lo, seeds_hi = stats.mean_ci(_values(runs, "train_images_per_sec"))
    per_step, step_times = _pooled_step_throughputs(runs)
    if per_step:
        median, lo, hi = stats.median_with_ci(per_step)
        p50, p90 = np.percentile(step_times, [50, 90])
        return {"train_img_s": median, "train_img_s_seeds_ci_lo": seeds_lo, "train_img_s_seeds_ci_hi": seeds_hi,
                "train_img_s_steps_ci_lo": lo, "train_img_s_steps_ci_hi": hi,
                "step_ms_p50": 1000 * float(p50), "step_ms_p90": 1000 * float(p90)}
    return {"train_img_s": _median(_values(runs, "train_images_per_sec")), "train_img_s_seeds_ci_lo": seeds_lo,
            "train_img_s_seeds_ci_hi": seeds_hi, "train_img_s_steps_ci_lo": math.nan,
            "train_img_s_steps_ci_hi": math.nan, "step_ms_p50": 1000 * _median(_values(runs, "step_time_p50_s")),
            "step_ms_p90": 1000 * _median(_values(runs, "step_time_p90_s"))}


def _mib(values: list[float]) -> float:
    return _median(values) / MIB if values else math.nan


def _memory(runs: list[RunResult]) -> dict[str, Any]:
    """Peaks, the dataset bytes inside them, and the peaks less the data (medians over runs, MiB).

    None on CPU stays n/a (never 0): a device figure exists only where the run measured a device peak.
    """
    host_less = [r.host_peak_rss_bytes - r.host_data_bytes for r in runs
                 if r.host_peak_rss_bytes and r.host_data_bytes is not None]
    device_less = [r.device_peak_bytes - r.device_data_bytes for r in runs
                   if r.device_peak_bytes is not None and r.device_data_bytes is not None]
    places = sorted({r.train_data_on for r in runs if r.train_data_on})
    return {"train_data_on": "/".join(places) if places else pd.NA,
            "host_peak_rss_mib": _mib(_values(runs, "host_peak_rss_bytes")),
            "host_data_mib": _mib(_values(runs, "host_data_bytes")),
            "host_rss_less_data_mib": _mib(host_less),
            "device_peak_mib": _mib(_values(runs, "device_peak_bytes")),
            "device_data_mib": _mib([float(r.device_data_bytes) for r in runs if r.device_peak_bytes is not None
                                     and r.device_data_bytes is not None]),
            "device_peak_less_data_mib": _mib(device_less)}


def _summary_row(model: str, backend: str, runs: list[RunResult]) -> dict[str, Any]:
    ok = [r for r in runs if r.status == "ok"]
    accuracies = [100 * a for a in _values(ok, "test_accuracy")]
    params = _values(runs, "trainable_params")
    macs = _values(runs, "macs_per_image")
    return {
        "model": model, "backend": backend, "runs_ok": len(ok), "runs_total": len(runs),
        "test_acc_mean_pct": stats.mean(accuracies), "test_acc_std_pct": stats.sample_std(accuracies),
        **_throughput(ok),
        "pipeline_img_s": _median(_values(ok, "pipeline_images_per_sec")),
        "compile_s": _median(_values(ok, "compile_s")),
        "startup_s": _median(_values(ok, "startup_s")),
        "epoch_wall_s": _median(_values(ok, "epoch_wall_s")),
        **_memory(ok),
        "trainable_params": int(params[0]) if params else pd.NA,
        "macs_per_image": int(macs[0]) if macs else pd.NA,
    }


def summary_table(results: list[RunResult]) -> pd.DataFrame:
    """One row per model x backend (a pair with only failed runs still gets a row, all n/a)."""
    rows = []
    for model in ordered_models(results):
        for backend in ordered_backends(results):
            runs = [r for r in results if r.model == model and r.backend == backend]
            if runs:
                rows.append(_summary_row(model, backend, runs))
    frame = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    for column in ("trainable_params", "macs_per_image"):
        frame[column] = frame[column].astype("Int64")
    return frame


def _number(value: Any) -> float:
    """float(value), NaN for None / pd.NA / text."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _ratio(b: Any, a: Any) -> float:
    a, b = _number(a), _number(b)
    return b / a if math.isfinite(a) and math.isfinite(b) and a > 0 else math.nan


def _by_seed(results: list[RunResult], model: str, backend: str, name: str) -> dict[int, float]:
    """{seed: value of ``name``} over the ok runs of (model, backend): what pairs the two frameworks."""
    return {r.seed: getattr(r, name) for r in results
            if r.model == model and r.backend == backend and r.status == "ok" and getattr(r, name) is not None}


def _head_to_head_row(results: list[RunResult], model: str, base: str, other: str,
                      a: pd.Series, b: pd.Series, tta: pd.DataFrame) -> dict[str, Any]:
    """``other`` against ``base``: paired per seed (the runner runs one seed's two runs back to back)."""
    def pair(name: str) -> tuple[dict[int, float], dict[int, float]]:
        return _by_seed(results, model, base, name), _by_seed(results, model, other, name)

    speed = stats.paired_ratio_ci(*pair("train_images_per_sec"))
    pipeline = stats.paired_ratio_ci(*pair("pipeline_images_per_sec"))
    accuracies = pair("test_accuracy")
    ci = stats.seed_diff_ci(*accuracies)
    spread = stats.seed_spread(*(values.values() for values in accuracies))
    return {
        "model": model, "comparison": f"{other}/{base}",
        "train_img_s_ratio": speed.median, "train_img_s_ratio_ci_lo": speed.lo, "train_img_s_ratio_ci_hi": speed.hi,
        "train_img_s_ratio_seed_min": speed.seed_min, "train_img_s_ratio_seed_max": speed.seed_max,
        "pipeline_img_s_ratio": pipeline.median,
        "host_rss_ratio": _ratio(b["host_peak_rss_mib"], a["host_peak_rss_mib"]),
        "host_rss_less_data_ratio": _ratio(b["host_rss_less_data_mib"], a["host_rss_less_data_mib"]),
        "device_peak_ratio": _ratio(b["device_peak_mib"], a["device_peak_mib"]),
        "device_peak_less_data_ratio": _ratio(b["device_peak_less_data_mib"], a["device_peak_less_data_mib"]),
        "acc_diff_pts": 100 * ci.diff, "acc_diff_ci_lo_pts": 100 * ci.lo, "acc_diff_ci_hi_pts": 100 * ci.hi,
        "acc_test": ci.method, "acc_seed_spread_pts": 100 * spread, "seeds": f"{ci.n_a}/{ci.n_b}",
        "verdict": stats.verdict(ci, base, other, spread=spread),
        **time_to_accuracy.head_to_head_columns(tta, model, base, other),
    }


def head_to_head_table(results: list[RunResult], tta: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per model, every pair of backends (series): the later one in ``ordered_backends`` over the earlier.

    ``tta``: compare.time_to_accuracy.summary_table (its columns stay empty without one).
    """
    tta = pd.DataFrame() if tta is None else tta
    summary = summary_table(results).set_index(["model", "backend"])
    backends = ordered_backends(results)
    rows = []
    for model in ordered_models(results):
        present = [b for b in backends if (model, b) in summary.index]
        for base, other in itertools.combinations(present, 2):
            rows.append(_head_to_head_row(results, model, base, other, summary.loc[(model, base)],
                                          summary.loc[(model, other)], tta))
    return pd.DataFrame(rows, columns=HEAD_TO_HEAD_COLUMNS)


def idiom_cost_table(head_to_head: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """The cost of Keras's idiom: per model and Keras backend, fit over the custom step, measured in one run.

    The rows of the head-to-head whose comparison is "<backend>:fit/<backend>" (same backend,
    same everything else, paired per seed), with both styles' compile step beside them.
    """
    rows = []
    compile_s = summary.set_index(["model", "backend"])["compile_s"] if not summary.empty else pd.Series()
    for _, row in head_to_head.iterrows():
        other, _, base = row["comparison"].partition("/")
        if other != series_name(base, "fit"):
            continue
        rows.append({"model": row["model"], "backend": base, **{
            f"fit_over_custom_{key}": row[key] for key in IDIOM_RATIO_COLUMNS},
            "compile_s_custom": compile_s.get((row["model"], base), math.nan),
            "compile_s_fit": compile_s.get((row["model"], other), math.nan),
            "acc_diff_pts": row["acc_diff_pts"], "seeds": row["seeds"], "verdict": row["verdict"]})
    return pd.DataFrame(rows, columns=IDIOM_COST_COLUMNS)


def curves_table(results: list[RunResult]) -> pd.DataFrame:
    """Tidy per-epoch rows of every run that recorded epochs (failed runs keep their partial curve)."""
    rows = []
    for r in results:
        for epoch in r.epochs or []:
            rows.append({"model": r.model, "backend": r.backend, "seed": r.seed, "status": r.status,
                         **{k: epoch.get(k) for k in CURVE_COLUMNS[4:]}})
    frame = pd.DataFrame(rows, columns=CURVE_COLUMNS)
    for column in CURVE_COLUMNS[5:]:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    return frame


def failures_table(results: list[RunResult]) -> pd.DataFrame:
    """One row per run that did not finish ok: run_id, status, exit_code, error."""
    rows = [{"run_id": r.run_id, "status": r.status, "exit_code": r.exit_code, "error": r.error}
            for r in results if r.status != "ok"]
    frame = pd.DataFrame(rows, columns=FAILURE_COLUMNS)
    frame["exit_code"] = frame["exit_code"].astype("Int64")
    return frame


def runs_table(results: list[RunResult]) -> pd.DataFrame:
    """One short row per run (for the report's list of runs)."""
    rows = [{"run_id": r.run_id, "status": r.status,
             "test_acc_pct": 100 * r.test_accuracy if r.test_accuracy is not None else math.nan,
             "train_img_s": r.train_images_per_sec if r.train_images_per_sec is not None else math.nan,
             "host_peak_rss_mib": r.host_peak_rss_bytes / MIB if r.host_peak_rss_bytes else math.nan}
            for r in results]
    return pd.DataFrame(rows, columns=["run_id", "status", "test_acc_pct", "train_img_s", "host_peak_rss_mib"])


def per_class_table(results: list[RunResult]) -> pd.DataFrame:
    """Per model, backend and class: precision, recall and F1 (mean over the ok seeds) and support."""
    rows = []
    for model in ordered_models(results):
        for backend in ordered_backends(results):
            runs = [r for r in results if r.model == model and r.backend == backend and r.status == "ok"
                    and r.per_class.get("f1")]
            for index in range(len(runs[0].per_class["f1"]) if runs else 0):
                name = runs[0].class_names[index] if index < len(runs[0].class_names) else str(index)
                scores = {k: stats.mean(r.per_class[k][index] for r in runs if len(r.per_class.get(k, [])) > index)
                          for k in ("precision", "recall", "f1")}
                rows.append({"model": model, "backend": backend, "class": name, **scores,
                             "support": runs[0].per_class.get("support", [None] * (index + 1))[index]})
    return pd.DataFrame(rows, columns=["model", "backend", "class", "precision", "recall", "f1", "support"])


def build_tables(results: list[RunResult], target_accuracy: float | None = None) -> dict[str, pd.DataFrame]:
    """All tables by name (the file stem they are written to), per configuration (``as_configurations``)
    and series (``by_series``: a Keras backend's fit runs apart from its custom-step runs).

    ``target_accuracy``: the time-to-accuracy target (default: the one the runs were started with).
    """
    results = by_series(as_configurations(results))
    target = time_to_accuracy.target_of(results, target_accuracy)
    tta_seeds = time_to_accuracy.seed_table(results, target)
    tta = time_to_accuracy.summary_table(tta_seeds)
    summary, head_to_head = summary_table(results), head_to_head_table(results, tta)
    return {"summary": summary, "head_to_head": head_to_head, "idiom_cost": idiom_cost_table(head_to_head, summary),
            "curves": curves_table(results), "per_class": per_class_table(results),
            "failures": failures_table(results), "time_to_accuracy": tta_seeds, "time_to_accuracy_summary": tta}


def format_value(value: Any) -> str:
    """Human-readable cell: 'n/a' for missing, thousands separators for big numbers."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}" if abs(int(value)) >= 10_000 else str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.2f}" if abs(value) >= 0.1 or value == 0 else f"{value:.3g}"
    return str(value)


def display_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy with every cell formatted as text (for terminal, Markdown and HTML tables)."""
    return pd.DataFrame({c: [format_value(v) for v in frame[c].tolist()] for c in frame.columns},
                        columns=list(frame.columns))


def to_text(frame: pd.DataFrame, fmt: str = "simple") -> str:
    """A table for the terminal (``fmt``: a tabulate format; 'pipe' gives Markdown)."""
    if frame.empty:
        return "(no rows)"
    return display_frame(frame).to_markdown(index=False, tablefmt=fmt, disable_numparse=True)


def _cell(value: Any) -> str:
    """Audit values may be numbers, strings, lists or dicts: one readable string each."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    return str(value)


def audit_frame(audit_models: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Long audit table: one row per (model, setting) with each backend's value as text.

    ``audit_models``: {model: {"backends": [...], "rows": common.audit.compare_settings(...)}}.
    """
    rows = []
    backends = list(dict.fromkeys(b for entry in audit_models.values() for b in entry.get("backends", [])))
    for model, entry in audit_models.items():
        for row in entry.get("rows", []):
            rows.append({"model": model, "setting": row["setting"],
                         **{b: _cell(row[b]) if b in row else "" for b in backends},
                         "kind": row.get("kind", ""), "asymmetry": bool(row.get("asymmetry"))})
    return pd.DataFrame(rows, columns=["model", "setting", *backends, "kind", "asymmetry"])


def terminal_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary's key columns, merged into readable text cells for an 80-160 column terminal."""
    f = format_value
    rows = []
    for _, r in summary.iterrows():
        rows.append({
            "model": r["model"], "backend": r["backend"], "runs ok": f"{r['runs_ok']}/{r['runs_total']}",
            "test acc %": f"{f(r['test_acc_mean_pct'])} ± {f(r['test_acc_std_pct'])}",
            "train img/s [95% CI, seeds]": (f"{f(r['train_img_s'])} [{f(r['train_img_s_seeds_ci_lo'])}, "
                                            f"{f(r['train_img_s_seeds_ci_hi'])}]"),
            "pipeline img/s": f(r["pipeline_img_s"]),
            "step ms p50/p90": f"{f(r['step_ms_p50'])}/{f(r['step_ms_p90'])}",
            "compile s": f(r["compile_s"]), "data on": f(r["train_data_on"]),
            "host RSS MiB (less data)": f"{f(r['host_peak_rss_mib'])} ({f(r['host_rss_less_data_mib'])})",
            "device MiB (less data)": f"{f(r['device_peak_mib'])} ({f(r['device_peak_less_data_mib'])})",
        })
    return pd.DataFrame(rows)
