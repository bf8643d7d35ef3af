"""The Deployment outputs of `dualbench export`: deployment.json/.csv, the latency plot, the report section.

Everything is read back from ``deployment.json`` in the export folder
(``OUT/export/`` of a results folder), so `dualbench report OUT` re-renders the
Deployment section without exporting again.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pandas as pd

from common.results import write_json_atomic
from compare.store import write_file_atomic

DEPLOYMENT_JSON, DEPLOYMENT_CSV, CROSS_CSV, LATENCY_PLOT = ("deployment.json", "deployment.csv",
                                                           "cross_framework.csv", "latency.png")
_MIB = 1024 * 1024
VERIFY_COLUMNS = ["model", "backend", "seed", "format", "runtime", "input_layout", "status", "images",
                  "max_abs_diff", "max_rel_diff", "rtol", "top1_agreement", "size_mib", "exporter", "opset"]
SERVE_COLUMNS = ["model", "backend", "seed", "format", "runtime", "threads", "size_mib", "load_s",
                 "first_call_s", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "throughput_img_s",
                 "peak_rss_mib", "rounds"]
CROSS_COLUMNS = ["model", "seed", "weights_from", "images", "max_abs_diff", "max_rel_diff", "rtol",
                 "top1_agreement", "passed"]


def _threads(settings: dict[str, Any] | None) -> str | None:
    if not settings:
        return None
    keys = ("intra_op_threads", "inter_op_threads", "num_threads")
    return ", ".join(f"{k.replace('_threads', '')}={settings[k]}" for k in keys if k in settings)


def deployment_frame(deployment: dict[str, Any]) -> pd.DataFrame:
    """One row per artifact with every recorded column (deployment.csv)."""
    rows = []
    batch = deployment.get("settings", {}).get("batch", 64)
    for row in deployment.get("rows", []):
        flat = {k: v for k, v in row.items() if not isinstance(v, (dict, list))}
        flat["size_mib"] = row["size_bytes"] / _MIB if row.get("size_bytes") is not None else None
        flat["peak_rss_mib"] = row["peak_rss_bytes"] / _MIB if row.get("peak_rss_bytes") is not None else None
        flat["throughput_img_s"] = row.get(f"batch{batch}_img_s")
        flat["threads"] = _threads(row.get("serve_threads"))
        flat["round_p50_ms"] = " ".join(f"{v:.3g}" for v in row.get("round_p50_ms") or [])
        rows.append(flat)
    return pd.DataFrame(rows)


def _pick(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    return frame.reindex(columns=columns) if not frame.empty else pd.DataFrame(columns=columns)


def verification_table(deployment: dict[str, Any]) -> pd.DataFrame:
    """Per artifact: how far its logits are from the framework's own, and whether that passes."""
    return _pick(deployment_frame(deployment), VERIFY_COLUMNS)


def serving_table(deployment: dict[str, Any]) -> pd.DataFrame:
    """Per served artifact: size, load time, batch-1 latency percentiles, batch-N throughput, peak RSS."""
    frame = deployment_frame(deployment)
    if frame.empty or "latency_p50_ms" not in frame:
        return pd.DataFrame(columns=SERVE_COLUMNS)
    frame = frame[frame["latency_p50_ms"].notna()]
    batch = deployment.get("settings", {}).get("batch", 64)
    return _pick(frame, SERVE_COLUMNS).rename(columns={"throughput_img_s": f"batch{batch}_img_s"})


def cross_table(deployment: dict[str, Any]) -> pd.DataFrame:
    return _pick(pd.DataFrame(deployment.get("cross_framework", [])), CROSS_COLUMNS)


def failed_rows(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows that are not ok (failed conversions, mismatches), with their messages."""
    return [row for row in deployment.get("rows", []) if row["status"] != "ok"]


def plot_latency(deployment: dict[str, Any], path: Path) -> Path | None:
    """Batch-1 latency (p50 bar, p90 whisker, p99 dot) and batch-N throughput per served artifact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compare.plots import color

    table = serving_table(deployment)
    if table.empty:
        return None
    labels = [f"{r.model} {r.backend} s{r.seed}: {r.format} ({r.runtime})" for r in table.itertuples()]
    colours = [color(b, i) for i, b in enumerate(table["backend"])]
    positions = list(range(len(table)))[::-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.45 * len(table) + 1.6), sharey=True)
    p50, p90, p99 = (table[c].astype(float) for c in ("latency_p50_ms", "latency_p90_ms", "latency_p99_ms"))
    left.barh(positions, p50, color=colours, xerr=[[0] * len(table), (p90 - p50).clip(lower=0)], capsize=3)
    left.scatter(p99, positions, color="black", marker="|", s=80, zorder=3, label="p99")
    left.set_xscale("log")  # runtimes differ by orders of magnitude at batch 1
    left.set_xlabel("batch-1 latency, ms, log scale (bar p50, whisker p90, tick p99)")
    left.set_yticks(positions, labels)
    left.legend(loc="lower right")
    throughput = table.columns[SERVE_COLUMNS.index("throughput_img_s")]
    right.barh(positions, table[throughput].astype(float), color=colours)
    right.set_xlabel(f"{throughput.replace('_img_s', '')} throughput, images/s")
    threads = deployment.get("settings", {}).get("threads")
    fig.suptitle(f"Serving on the CPU, {threads} thread(s) per runtime, each measurement its own process")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return write_file_atomic(path, buffer.getvalue())


def write_outputs(root: Path, deployment: dict[str, Any]) -> list[Path]:
    """deployment.json, deployment.csv, cross_framework.csv and latency.png under ``root``."""
    root = Path(root)
    write_json_atomic(root / DEPLOYMENT_JSON, deployment)
    written = [root / DEPLOYMENT_JSON,
               write_file_atomic(root / DEPLOYMENT_CSV,
                                 deployment_frame(deployment).to_csv(index=False, na_rep="n/a").encode())]
    cross = cross_table(deployment)
    if not cross.empty:
        written.append(write_file_atomic(root / CROSS_CSV, cross.to_csv(index=False, na_rep="n/a").encode()))
    plot = plot_latency(deployment, root / LATENCY_PLOT)
    return written + ([plot] if plot else [])


def load_deployment(root: Path) -> dict[str, Any] | None:
    """deployment.json of an export folder, or None when there is none (or it is unreadable)."""
    try:
        raw = json.loads((Path(root) / DEPLOYMENT_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) and isinstance(raw.get("rows"), list) else None


def report_blocks(export_root: Path, report_root: Path) -> list:
    """The report's Deployment section ([] when nothing was exported); images link relative to ``report_root``."""
    from compare.document import Block

    deployment = load_deployment(export_root)
    if deployment is None:
        return []
    s = deployment.get("settings", {})
    verify = verification_table(deployment)
    blocks = [
        Block("h2", "Deployment"),
        Block("p", f"`{deployment.get('command', 'dualbench export')}` ({deployment.get('created_utc', '')}). "
                   "Every artifact holds the final weights in eval mode (BN moving statistics, no dropout), "
                   "float32, batch dimension dynamic; torch's take NCHW images, TensorFlow's NHWC. Each was "
                   "loaded by its own runtime in a fresh process and its logits on every test image compared "
                   "with the framework's own eval logits: max relative difference = max|diff| / max|logit| "
                   f"(tolerance rtol: {s.get('native_rtol')} for ONNX and native formats, {s.get('litert_rtol')} "
                   f"for LiteRT) and top-1 agreement (at least {s.get('min_top1_agreement', 0):.1%})."),
        Block("h3", "Verification"),
        Block("table", table=verify, highlight=[status != "ok" for status in verify["status"]]),
    ]
    problems = [f"`{r['label']}` {r['format']}: {r['error']}" for r in failed_rows(deployment)]
    if problems:
        blocks += [Block("p", "**Artifacts that failed or differ:**"), Block("list", items=problems)]
    cross = cross_table(deployment)
    if not cross.empty:
        blocks += [Block("h3", "torch's ONNX vs TensorFlow's ONNX in ONNX Runtime"),
                   Block("p", "Both exported from the same canonical weights (TensorFlow builds the model from "
                              f"the torch run's weights); tolerance {s.get('cross_rtol')} relative."),
                   Block("table", table=cross, highlight=[not passed for passed in cross["passed"]])]
    serving = serving_table(deployment)
    if not serving.empty:
        blocks += [
            Block("h3", "Serving"),
            Block("p", f"On the CPU, {s.get('threads')} intra-op thread(s) and no extra inter-op pool for every "
                       f"runtime; each measurement its own process ({s.get('rounds')} rounds, artifacts in ABBA "
                       f"order); batch-1 latency percentiles over every timed call after {s.get('warmup')} warm-up "
                       f"calls, about {s.get('seconds')} s timed per batch size per process; batch-{s.get('batch')} "
                       "throughput is the median of the rounds. A call takes a numpy array in the artifact's layout "
                       "and returns numpy logits. load_s: loading the artifact once its runtime is imported; "
                       "peak_rss_mib: the serving process (runtime, artifact, images)."),
            Block("table", table=serving)]
        plot = Path(export_root) / LATENCY_PLOT
        if plot.exists():
            blocks.append(Block("image", text="serving latency and throughput", path=plot,
                                link=plot.relative_to(report_root).as_posix()))
    return blocks
