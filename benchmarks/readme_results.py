"""Generate the README's "Results on this machine" section from real outputs.

Reads a `dualbench run` results folder (summary.csv, head_to_head.csv,
manifest.json) and the CSVs the benchmark scripts wrote, and prints Markdown;
with ``--write README.md`` it replaces the text between the two markers
``<!-- results:begin -->`` and ``<!-- results:end -->`` (``--marker NAME``: between
``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``). Time to accuracy and image retrieval
are shown where the run measured them (``--target-accuracy``, ``--retrieval``).

    python benchmarks/readme_results.py results/cifar10 --bench-dir benchmarks/results --write README.md
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

import _common  # noqa: F401  (puts the project root on sys.path)
from run_all import SCRIPTS  # the scripts' canonical order (benchmarks/ is on sys.path)

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
SUMMARY_COLUMNS = {
    "model": "model", "backend": "backend", "runs_ok": "runs ok", "test_acc_mean_pct": "test acc %",
    "test_acc_std_pct": "± std", "train_img_s": "train img/s (median)",
    "train_img_s_seeds_ci_lo": "95% CI lo (seeds)", "train_img_s_seeds_ci_hi": "95% CI hi (seeds)",
    "train_img_s_steps_ci_lo": "step-level CI lo", "train_img_s_steps_ci_hi": "step-level CI hi",
    "pipeline_img_s": "pipeline img/s", "step_ms_p50": "step ms p50", "compile_s": "compile s",
    "epoch_wall_s": "epoch wall s", "train_data_on": "data on", "host_peak_rss_mib": "host RSS MiB",
    "host_data_mib": "host data MiB", "device_peak_mib": "device peak MiB", "device_data_mib": "device data MiB",
}
H2H_COLUMNS = {
    # every ratio and difference is the comparison's: "tensorflow/torch" = tensorflow over (minus) torch
    "model": "model", "comparison": "comparison", "train_img_s_ratio": "train img/s ratio (median of seeds)",
    "train_img_s_ratio_ci_lo": "95% CI lo (seeds)", "train_img_s_ratio_ci_hi": "95% CI hi (seeds)",
    "pipeline_img_s_ratio": "pipeline ratio", "host_rss_ratio": "host RSS ratio",
    "host_rss_less_data_ratio": "host RSS less data", "device_peak_less_data_ratio": "device peak less data",
    "acc_diff_pts": "acc diff (pts)", "acc_diff_ci_lo_pts": "95% CI lo", "acc_diff_ci_hi_pts": "95% CI hi",
    "acc_test": "test", "acc_seed_spread_pts": "seed spread (pts)", "verdict": "verdict",
}


def _table(frame: pd.DataFrame, columns: dict[str, str] | None = None) -> str:
    """Markdown of ``frame`` (only and renamed as ``columns`` when given)."""
    present = [c for c in columns if c in frame.columns] if columns else list(frame.columns)
    shown = frame[present].rename(columns=columns or {})
    shown = shown.astype(object).where(shown.notna(), "")  # blank, not "nan", where nothing was measured
    return shown.to_markdown(index=False, floatfmt=".4g")


def run_section(results: Path) -> list[str]:
    manifest = json.loads((results / "manifest.json").read_text())
    packages = manifest.get("packages", {})
    versions = ", ".join(f"{k} {packages[k]}" for k in ("torch", "tensorflow", "keras", "numpy", "pandas")
                         if k in packages)
    flags = manifest.get("cpu_flags")
    features = f"CPU features {', '.join(flags)}" if flags else "CPU features not recorded"
    lines = [
        f"Measured {manifest.get('created_utc', '?')} on {manifest.get('cpu_model', '?')} "
        f"({manifest.get('usable_cores', '?')} usable cores, no GPU; {features}), "
        f"Python {manifest.get('python', '?')}, {versions}; git {manifest.get('git_commit', '?')}; "
        f"data fingerprint `{manifest.get('data_fingerprint', '?')}`.",
        "", "```bash", manifest.get("command", "?"), "```", "",
        "**Summary** (mean over seeds; throughput medians over all steady-state steps of all seeds, 95% "
        "interval across seeds; the step-level interval is secondary):", "",
        _table(pd.read_csv(results / "summary.csv"), SUMMARY_COLUMNS), "",
        "**Head to head**:", "", _table(pd.read_csv(results / "head_to_head.csv"), H2H_COLUMNS), "",
    ]
    return lines + tuning_section(results) + observability_section(results) + deployment_section(results / "export")


def tuning_section(results: Path) -> list[str]:
    """The execution configuration each framework ran in (tuning.json), when the folder has one."""
    try:
        tuning = json.loads((results / "tuning.json").read_text())
    except (OSError, ValueError):
        return []
    from compare.tune_report import choices_frame

    frame = choices_frame(tuning.get("resolutions") or [])
    if frame.empty:
        return []
    return ["**Execution configuration per framework** (`--mode auto`; best_over_default: the chosen "
            "configuration's training images/s over the framework's own defaults, both measured by the search "
            "on this machine; the full search table is in the results folder's tuning.csv):", "",
            _table(frame), ""]


TTA_COLUMNS = {"model": "model", "backend": "backend", "target_acc_pct": "target %", "seeds_reached": "seeds reached",
               "tta_median": "median training time to target", "tta_per_seed": "per seed",
               "eval_every_steps": "eval every (steps; blank: epoch ends)"}
RETRIEVAL_COLUMNS = ["model", "backend", "seed", "status", "recall@1", "recall@5", "recall@10", "map@r",
                     "embedding_dim", "queries", "gallery"]
AGREEMENT_COLUMNS = ["model", "seed", "weights_of", "embedded_by", "max_rel_diff", "rtol", "agrees"]


def observability_section(results: Path) -> list[str]:
    """Time to accuracy and image retrieval, where the run measured them ([] otherwise)."""
    from compare.time_to_accuracy import summary_table

    lines = []
    if (results / "time_to_accuracy.csv").exists():
        seeds = pd.read_csv(results / "time_to_accuracy.csv")
        lines += ["**Time to accuracy** (training wall-clock, evaluation excluded, at the first evaluation "
                  "reaching the target; the median counts a seed that never reached it as infinitely slow):", "",
                  _table(summary_table(seeds), TTA_COLUMNS), ""]
    if (results / "retrieval.csv").exists():
        lines += ["**Image retrieval** (queries: the test split, gallery: the training split, penultimate-layer "
                  "embeddings, cosine similarity; relevant = same class):", "",
                  _table(pd.read_csv(results / "retrieval.csv"), {c: c for c in RETRIEVAL_COLUMNS}), ""]
    if (results / "retrieval_agreement.csv").exists():
        lines += ["**The same weights embedded by both frameworks** (max |diff| / max |embedding|):", "",
                  _table(pd.read_csv(results / "retrieval_agreement.csv"), {c: c for c in AGREEMENT_COLUMNS}), ""]
    return lines


VERIFY_COLUMNS = ["model", "backend", "format", "runtime", "status", "images", "max_abs_diff", "max_rel_diff",
                  "rtol", "top1_agreement", "size_mib"]
SERVE_COLUMNS = ["model", "backend", "format", "runtime", "threads", "load_s", "latency_p50_ms", "latency_p90_ms",
                 "latency_p99_ms", "batch64_img_s", "peak_rss_mib"]


def deployment_section(export: Path) -> list[str]:
    """The tables `dualbench export` wrote under ``export`` ([] when it did not run there)."""
    try:
        deployment = json.loads((export / "deployment.json").read_text())
    except (OSError, ValueError):
        return []
    frame = pd.read_csv(export / "deployment.csv", na_values=["n/a"])
    serving = frame[frame["latency_p50_ms"].notna()] if "latency_p50_ms" in frame else frame.iloc[:0]
    lines = [f"**Deployment: every artifact verified against its framework's eval logits** "
             f"(`{deployment.get('command', 'dualbench export')}`, {deployment.get('created_utc', '?')}):", "",
             _table(frame, {c: c for c in VERIFY_COLUMNS}), ""]
    if (export / "cross_framework.csv").exists():
        lines += ["**torch's ONNX vs TensorFlow's ONNX from the same weights, in ONNX Runtime**:", "",
                  _table(pd.read_csv(export / "cross_framework.csv", na_values=["n/a"])), ""]
    if not serving.empty:
        lines += ["**Serving on the CPU** (each measurement its own process, ABBA order):", "",
                  _table(serving, {c: c for c in SERVE_COLUMNS}), ""]
    return lines


CAPTIONS = {
    "bench_table": "`dualbench bench`: throughput and memory per batch size, phase and measure",
    "bare_vs_dualbench": "dualbench's loop over a bare hand-written loop (target >= 0.95)",
    "memory": "host peak RSS of a dualbench run over the bare loop's (target <= 1.15)",
    "pipeline_cost": "pipeline-inclusive over compute-only training throughput (target >= 0.9)",
    "roofline": "achieved training GFLOP/s against the machine's fp32 matmul peak",
    "mode_matrix": "execution modes per framework: the evidence behind the fallback (`--mode best`)",
    "threads": "thread pools per framework: inter-op 1 / 2 / default, tf.data's pool bounded / default",
    "tune_check": "the search's choice against an exhaustive measurement in the same sitting (target >= 0.95)",
    "best_bare_ratio": "tf/torch ratio of `dualbench run --mode auto` against the best bare loops' (target within 10%)",
    "tf_bn_kernels": "TensorFlow BatchNorm kernel per mode",
    "parity_margins": "worst measured parity values against their criteria, per CPU kernel family",
    "gpu_check": "torch CUDA paths on one GPU (benchmarks/gpu_check.py)",
}


def _meta(csv: Path) -> dict[str, str]:
    """The command and finish time the script stored beside its CSV ({} when absent or unreadable)."""
    try:
        meta = json.loads(csv.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def bench_section(bench_dir: Path) -> list[str]:
    """Every benchmark CSV, as written by its script (one table each), in run_all's order."""
    order = {name: i for i, name in enumerate(SCRIPTS)}
    lines = []
    for csv in sorted(bench_dir.glob("*.csv"), key=lambda p: (order.get(p.stem, len(order)), p.stem)):
        frame = pd.read_csv(csv)
        caption = CAPTIONS.get(csv.stem, csv.stem)
        meta = _meta(csv)
        command = meta.get("command") or f".venv/bin/python benchmarks/{csv.stem}.py"
        when = f", {meta['finished_utc']}" if meta.get("finished_utc") else ""
        lines += [f"**{caption}** (`{command}`{when}):", "",
                  _table(frame), ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a `dualbench run --out` folder")
    parser.add_argument("--bench-dir", type=Path, default=None, help="folder of benchmark CSVs")
    parser.add_argument("--write", type=Path, default=None, help="README to update between the markers")
    parser.add_argument("--marker", default="results",
                        help="write between <!-- MARKER:begin --> and <!-- MARKER:end --> (default results)")
    args = parser.parse_args(argv)
    begin, end = f"<!-- {args.marker}:begin -->", f"<!-- {args.marker}:end -->"
    lines = run_section(args.results)
    if args.bench_dir and args.bench_dir.is_dir():
        lines += bench_section(args.bench_dir)
    text = "\n".join(lines).rstrip() + "\n"
    if args.write is None:
        print(text)
        return 0
    readme = args.write.read_text()
    if begin not in readme or end not in readme:
        raise SystemExit(f"{args.write} has no {begin} ... {end} markers")
    head, rest = readme.split(begin, 1)
    _, tail = rest.split(end, 1)
    args.write.write_text(f"{head}{begin}\n{text}{end}{tail}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
