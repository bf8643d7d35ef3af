"""Render everything a results folder shows from ``runs.jsonl`` (+ audit.json, manifest.json if present).

``render_all(store)`` writes the tables (CSV + Parquet), the plots, report.md
and report.html. It needs nothing but the folder, so ``dualbench report OUT``
re-renders a finished, interrupted or copied results folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from common.audit import compare_settings
from common.errors import UserError
from common.results import RunResult
from compare import plots, time_to_accuracy, tune_report
from compare import report_sections as sections
from compare.deployment import report_blocks
from compare.document import Block, to_html, to_markdown
from compare.command_line import command_for
from compare.scaling import has_scaling, scaling_blocks, scaling_table
from compare.store import ResultsStore
from compare.tables import (as_configurations, audit_frame, build_tables, by_series, ordered_backends,
                            ordered_models, runs_table)

SPEC_SETTINGS = ("data", "device", "precision", "threads", "channels_last", "deterministic", "allow_tf32",
                 "train_subset", "test_subset", "warmup_steps", "max_steps_per_epoch")


def audit_models(store: ResultsStore, results: list[RunResult]) -> dict[str, dict[str, Any]]:
    """Audit per model from audit.json; models missing there are audited from the runs' settings."""
    stored = store.load_audit()["models"]
    out: dict[str, dict[str, Any]] = {}
    for model in ordered_models(results):
        if model in stored and stored[model].get("rows"):
            out[model] = stored[model]
            continue
        settings: dict[str, dict[str, Any]] = {}
        for r in results:
            if r.model == model and r.settings and r.backend not in settings:
                settings[r.backend] = r.settings
        if settings:
            out[model] = {"backends": ordered_backends([r for r in results if r.backend in settings]),
                          "rows": compare_settings(settings), "source": "runs"}
    return out


def _settings_table(results: list[RunResult]) -> pd.DataFrame:
    spec = next((r.spec for r in results if r.spec), {})
    rows = [{"setting": f"recipe.{k}", "value": json.dumps(v) if isinstance(v, (list, tuple)) else v}
            for k, v in (spec.get("recipe") or {}).items()]
    rows += [{"setting": k, "value": spec.get(k)} for k in SPEC_SETTINGS]
    modes = {r.backend: r.spec.get("mode") for r in results if r.spec}
    rows += [{"setting": f"mode ({b})", "value": m} for b, m in modes.items()]
    return pd.DataFrame([{**row, "value": "none" if row["value"] is None else str(row["value"])}
                         for row in rows], columns=["setting", "value"])


def _environment(manifest: dict[str, Any], results: list[RunResult]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(machine table, per-backend table) from manifest.json or, failing that, the first run's manifest."""
    base = manifest or next((r.manifest for r in results if r.manifest), {})
    keys = ("cpu_model", "cpu_flags", "isa_limits", "cpu_count", "usable_cores", "os", "python", "hostname", "git_commit",
            "data_spec", "data_fingerprint", "data_verification", "train_images", "test_images", "created_utc")
    machine = [{"item": k, "value": ", ".join(map(str, v)) if isinstance(v, list) else str(v)}
               for k in keys if (v := base.get(k)) is not None and v not in ([], {})]
    packages = base.get("packages") or {}
    machine += [{"item": f"package {k}", "value": v} for k, v in packages.items()]
    per_backend = []
    for backend in ordered_backends(results):
        m = next((r.manifest for r in results if r.backend == backend and r.manifest), {})
        per_backend.append({
            "backend": backend,
            "versions": ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items()) or "n/a",
            "effective settings": ", ".join(f"{k}={v}" for k, v in (m.get("effective") or {}).items()) or "n/a",
            "data fingerprint": str(m.get("data_fingerprint") or "n/a")[:16],
        })
    return (pd.DataFrame(machine, columns=["item", "value"]),
            pd.DataFrame(per_backend, columns=["backend", "versions", "effective settings", "data fingerprint"]))


def caveats(results: list[RunResult], tables: dict[str, pd.DataFrame], audit: dict[str, Any]) -> list[str]:
    """Everything a reader must know before trusting a number in this report."""
    notes = []
    failed = [r for r in results if r.status != "ok"]
    if failed:
        listed = ", ".join(f"{r.run_id} ({r.status})" for r in failed)
        notes.append(f"{len(failed)} of {len(results)} runs did not finish ok and are excluded from the "
                     f"figures: {listed}. See the failures table and OUT/logs/.")
    for model, entry in audit.items():
        flagged = [row["setting"] for row in entry.get("rows", []) if row.get("asymmetry")]
        if flagged:
            notes.append(f"**Fairness audit: {model} has asymmetries in {', '.join(flagged)}**; "
                         "the comparison is not like for like until they are fixed.")
    summary = tables["summary"]
    oks = summary["runs_ok"].tolist() if not summary.empty else []
    if oks and min(oks) < 3:
        notes.append(f"Only {min(oks)} ok seed(s) for some model/backend: "
                     + ("one seed gives no noise estimate, so an accuracy difference cannot be judged."
                        if min(oks) < 2 else "the seed-noise intervals are wide; use --seeds with 3 or more."))
    if not summary.empty and summary["device_peak_mib"].isna().any():
        notes.append("Device memory is n/a where the run was on the CPU (or not measured): only GPU "
                     "allocator peaks are recorded, never a 0 for 'not measured'.")
    notes.append("Throughput excludes the first (compile/tracing) step and the warm-up steps after it; "
                 "compile_s is reported on its own, startup_s covers process start to ready-to-train. "
                 "Compute-only step windows start after the batch is produced and synchronized; "
                 "pipeline-inclusive epoch times count the pipeline's build and teardown on both sides.")
    notes.append("Host peak RSS is the whole worker process (framework runtime, data arrays, model), "
                 "measured by the parent from os.wait4. Where a framework keeps its copy of the dataset "
                 "differs (torch on a GPU: device memory; TensorFlow: host tf.Variables); the *_less_data "
                 "columns subtract each framework's own copy from the memory that holds it.")
    spec = next((r.spec for r in results if r.spec), {})
    if spec.get("max_steps_per_epoch"):
        notes.append(f"Epochs were capped at {spec['max_steps_per_epoch']} steps (--max-steps-per-epoch): "
                     "accuracies are not those of full training.")
    if spec.get("train_subset") or spec.get("test_subset"):
        notes.append("Training/test subsets were used (--train-subset/--test-subset).")
    recipes = {json.dumps(r.spec.get("recipe"), sort_keys=True) for r in results if r.spec}
    if len(recipes) > 1:
        notes.append("**Runs in this folder do not all share one recipe**; the settings table shows the first.")
    return notes


def _title(results: list[RunResult]) -> str:
    return "dualbench report: " + " vs ".join(ordered_backends(results))


def build_document(results: list[RunResult], tables: dict[str, pd.DataFrame], plot_paths: list[Path],
                   store: ResultsStore, scaling: list[Block] | None = None) -> list[Block]:
    """The report, as blocks (rendered to Markdown and HTML); ``scaling``: compare.scaling's section."""
    models, backends = ordered_models(results), ordered_backends(results)
    manifest = store.load_manifest()
    audit = audit_models(store, results)
    machine, per_backend = _environment(manifest, results)
    device = next((r.spec.get("device") for r in results if r.spec), "auto")
    blocks = [
        Block("h1", _title(results)),
        Block("p", f"**Question:** for {', '.join(models)}, on this machine (device `{device}`, "
                   f"{machine_value(machine, 'cpu_model')}), how do {' and '.join(backends)} compare in accuracy, "
                   "speed and memory when trained with the same recipe, the same initial weights and the same "
                   "data order?"),
        Block("h2", "Summary"),
        Block("p", "Accuracy: final-epoch top-1 on the test split, mean and sample std over seeds (%). "
                   "Throughput: median images/s of the pooled steady-state steps; train_img_s_seeds_ci_lo/hi is "
                   "the 95% t interval across seeds of the runs' images/s (run-to-run spread); "
                   "train_img_s_steps_ci_lo/hi, the interval over pooled steps, is secondary: steps within a run "
                   "are autocorrelated and understate run-to-run spread. Memory: median over runs of each run's "
                   "peak, in MiB; train_data_on says where the framework keeps the training images, "
                   "host_data_mib/device_data_mib how much dataset its pipelines hold there, and the "
                   "*_less_data_mib columns the peak without it (the training's own memory). runs_ok/runs_total "
                   "count seeds."),
        Block("table", table=tables["summary"]),
        Block("h2", "Head to head"),
        Block("p", "Every pair of backends, the later one over the earlier (above 1: it is faster or uses "
                   "more memory); '<backend>:fit' is Keras's model.fit on that backend. "
                   "The seed pairs the two frameworks' runs (same initial weights, same data order, run back to "
                   "back). Throughput ratios are the median of the per-seed ratios; ci_lo/ci_hi is the 95% t "
                   "interval across seeds of the log ratio; seed_min/seed_max the extreme per-seed ratios. "
                   "Memory ratios are given with and without the dataset bytes each framework holds in that "
                   "memory. The accuracy difference (points) is tested as acc_test says: a paired t test over "
                   "the seeds both frameworks ran, Welch's interval only where runs do not pair. acc_seed_spread_pts "
                   "is the pooled standard deviation of each framework's accuracy across seeds: a difference "
                   "whose 95% interval lies inside +-that spread is within seed noise even where the interval "
                   "excludes 0 (the verdict then says so)."),
        Block("table", table=tables["head_to_head"]),
        *_idiom_blocks(tables["idiom_cost"]),
        *(scaling or []),
        *sections.time_to_accuracy_blocks(tables),
        *sections.retrieval_blocks(store, results),
        *sections.data_blocks(results, manifest),
        Block("h2", "Runs"),
        Block("table", table=runs_table(results)),
    ]
    if not tables["failures"].empty:
        blocks += [Block("h2", "Failures"), Block("table", table=tables["failures"])]
        for r in results:
            if r.status != "ok" and r.stderr_tail:
                blocks += [Block("p", f"`{r.run_id}`: last lines of the worker's stderr"),
                           Block("code", text=r.stderr_tail)]
    blocks += _per_class_blocks(tables["per_class"])
    blocks += sections.tensorboard_blocks(manifest)
    blocks.append(Block("h2", "Plots"))
    for path in plot_paths:
        blocks.append(Block("image", text=path.stem.replace("_", " "), path=path,
                            link=str(path.relative_to(store.root))))
    blocks += report_blocks(store.root / "export", store.root)  # `dualbench export`, if it ran here
    blocks += [Block("h2", "Settings used"), Block("table", table=_settings_table(results))]
    blocks += _audit_blocks(audit)
    blocks += tune_report.report_blocks(_read_json(store.root / "tuning.json"))
    blocks += [Block("h2", "Environment"), Block("table", table=machine), Block("table", table=per_backend)]
    blocks += [Block("h2", "Caveats"), Block("list", items=caveats(results, tables, audit))]
    command = manifest.get("command") or command_for([r.spec for r in results if r.spec], str(store.root))
    blocks += [Block("h2", "How to reproduce"), Block("code", text=command),
               Block("p", f"Re-render this report from the results alone: `dualbench report {store.root}`")]
    return blocks


def _idiom_blocks(idiom_cost: pd.DataFrame) -> list[Block]:
    """The cost of Keras's idiom, when the run had both styles of a Keras backend."""
    if idiom_cost.empty:
        return []
    return [Block("h2", "The cost of the idiom: Keras fit vs the custom step"),
            Block("p", "Same backend, model, pipeline, optimizer, loss and seeds, measured in this run: "
                       "model.compile + model.fit (the learning rate set per step by a callback from "
                       "common.schedules, each step timed by a callback between synchronised clock reads) over "
                       "the hand-written training step. Below 1: fit is slower. Compile times are each style's "
                       "first step."),
            Block("table", table=idiom_cost)]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def machine_value(machine: pd.DataFrame, item: str) -> str:
    """One value of the machine table ('unknown CPU' when absent)."""
    match = machine[machine["item"] == item]["value"]
    return str(match.iloc[0]) if len(match) else "unknown CPU"


def _per_class_blocks(per_class: pd.DataFrame) -> list[Block]:
    """Per-class F1 side by side (one table per model: classes x backends)."""
    if per_class.empty:
        return []
    blocks = [Block("h2", "Per-class F1"),
              Block("p", "F1 of each class on the test split (mean over ok seeds); precision and recall are in "
                         "per_class.csv.")]
    for model, frame in per_class.groupby("model", sort=False):
        classes = list(dict.fromkeys(frame["class"]))  # label order, not alphabetical
        wide = frame.pivot(index="class", columns="backend", values="f1").reindex(classes).reset_index()
        wide = wide[["class", *[b for b in frame["backend"].unique()]]]
        wide.columns.name = None
        blocks += [Block("h3", model), Block("table", table=wide)]
    return blocks


def _audit_blocks(audit: dict[str, Any]) -> list[Block]:
    blocks = [Block("h2", "Fairness audit"),
              Block("p", "Each backend reports the settings it actually built (read back from its layers, "
                         "optimizer and framework flags). 'must match' settings that differ are asymmetries "
                         "(highlighted); 'framework-native' ones are expected to differ.")]
    if not audit:
        return blocks + [Block("p", "No audit available (no run reported its settings).")]
    frame = audit_frame(audit)
    flagged = frame["asymmetry"].tolist()
    found = sum(flagged)
    blocks.append(Block("p", f"**{found} asymmetr{'y' if found == 1 else 'ies'} found.**" if found
                        else "No asymmetries: every must-match setting is identical."))
    return blocks + [Block("table", table=frame, highlight=flagged)]


def report_target(store: Any, runs: list[RunResult], override: float | None = None) -> float | None:
    """The time-to-accuracy target of the report and the scaling table: ``override`` (`--target-accuracy`),
    else the runs' own (compare.time_to_accuracy.target_of); a folder written before the target was a
    RunSpec field kept it in its manifest."""
    return time_to_accuracy.target_of(runs, override) or store.load_manifest().get("target_accuracy")


def render_all(store: ResultsStore, target_accuracy: float | None = None) -> list[Path]:
    """Tables, plots and reports for the folder; returns every path written.

    ``target_accuracy``: time to accuracy (also the scaling table's) for this target instead of the one
    the runs were started with.
    """
    runs = by_series(store.load_runs())  # a Keras backend's fit runs are their own series
    if not runs:
        raise UserError(f"no results in {store.runs_path}: run `dualbench run --out {store.root} ...` first")
    results = as_configurations(runs)  # per model and world size
    target = report_target(store, runs, target_accuracy)
    tables = build_tables(results, target)
    written: list[Path] = []
    for name in ("summary", "head_to_head", "idiom_cost", "curves", "per_class"):
        written += store.write_table(name, tables[name])
    if not tables["time_to_accuracy"].empty:
        written += store.write_table("time_to_accuracy", tables["time_to_accuracy"])
    resolutions = _read_json(store.root / "tuning.json").get("resolutions") or []
    if resolutions:  # the search table, beside tuning.json (which keeps every record in full)
        written += store.write_table("tuning", tune_report.search_frame(resolutions), parquet=False)
    scaling: list[Block] = []
    if has_scaling(runs):
        table = scaling_table(runs, target)
        written += store.write_table("scaling", table)
        scaling = scaling_blocks(runs, table, store.plots_dir, store.root, target)
    failures_csv = store.root / "failures.csv"
    if not tables["failures"].empty:
        written += store.write_table("failures", tables["failures"], parquet=False)
    elif failures_csv.exists():
        failures_csv.unlink()  # stale from an earlier invocation whose failures were since rerun ok
    plot_paths = plots.render_plots(results, tables, store.plots_dir, ordered_models(results),
                                    ordered_backends(results))
    written += plot_paths
    blocks = build_document(results, tables, plot_paths, store, scaling)
    written += [block.path for block in scaling if block.path is not None]
    written.append(store.write_text("report.md", to_markdown(blocks)))
    written.append(store.write_text("report.html", to_html(blocks, _title(results))))
    return written


def render_and_print(store: Any, target_accuracy: float | None = None) -> None:
    """Render every output of ``store`` and print the summary, head-to-head, time-to-accuracy,
    retrieval and failures tables."""
    from compare.retrieval import load_retrieval
    from compare.tables import build_tables, terminal_summary, to_text

    written = render_all(store, target_accuracy)
    runs = by_series(store.load_runs())
    tables = build_tables(runs, report_target(store, runs, target_accuracy))
    print("\nSummary (all columns in summary.csv):")
    print(to_text(terminal_summary(tables["summary"])))
    print("\nHead to head (time to accuracy: the table below; all columns in head_to_head.csv):")
    print(to_text(tables["head_to_head"].drop(columns=["tta_base", "tta_other"])))
    if not tables["idiom_cost"].empty:
        print("\nThe cost of the idiom (Keras fit over the custom step, same backend):")
        print(to_text(tables["idiom_cost"]))
    if not tables["time_to_accuracy_summary"].empty:
        print("\nTime to accuracy (training wall-clock, evaluation excluded):")
        print(to_text(tables["time_to_accuracy_summary"].drop(columns=["tta_median_s"])))
    retrieval = load_retrieval(store)
    if retrieval is not None and not retrieval["metrics"].empty:
        print("\nImage retrieval (test queries against the training split, cosine similarity):")
        print(to_text(retrieval["metrics"].drop(columns=["weights_sha256", "error"])))
        if not retrieval["agreement"].empty:
            print(to_text(retrieval["agreement"]))
    if not tables["failures"].empty:
        print("\nFailures:")
        print(to_text(tables["failures"]))
    print("\nWritten:")
    extra = [store.root / name for name in ("retrieval.json", "retrieval.csv", "retrieval_agreement.csv")]
    for path in [store.runs_path, store.manifest_path, store.audit_json, store.audit_csv, *extra, *written]:
        if path.exists():
            print(f"  {path}")
