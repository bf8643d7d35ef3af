"""Figures for the report (matplotlib, Agg backend), written atomically as PNG under OUT/plots/.

* ``curves_<model>.png``: test accuracy and training loss vs epoch and vs
  training wall-clock seconds; one line per backend (mean over seeds) with a
  min-max band across seeds.
* ``throughput.png``: training images/s (median, 95% interval as error bars)
  and pipeline images/s, per model and backend.
* ``memory.png``: host peak RSS, plus device allocator peak where measured; the
  dataset bytes each framework's pipelines hold in that memory hatched on top.
* ``confusion_<model>.png``: confusion matrices side by side (summed over the
  ok seeds, rows normalised to recall).
* ``scaling.png``: data-parallel throughput and scaling efficiency against the
  world size (compare.scaling), when runs of several sizes are present.

A data-parallel configuration's figures are named after it (``curves_resnet20_world2.png``).
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI machines or in worker-free report re-renders
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import pandas as pd  # noqa: E402

from common.results import RunResult  # noqa: E402
from compare.store import write_file_atomic  # noqa: E402

# Okabe-Ito palette (colour-blind safe): blue, orange and black stay far apart under protanopia,
# deuteranopia and tritanopia and differ in lightness, so they also read in greyscale
# (the brand reds/oranges of torch and TensorFlow did not; tests/test_plots.py checks every pair).
COLORS = {"torch": "#0072B2", "tensorflow": "#E69F00", "keras-torch": "#000000"}
_FALLBACK = ("#009E73", "#CC79A7", "#56B4E9", "#D55E00")  # further backends, same palette
# A backend's fit series ("tensorflow:fit") keeps the backend's colour and is told apart by form:
# dashed lines with square markers, hatched bars (colour = framework, form = idiom).
_FIT_LINE = {"linestyle": "--", "marker": "s"}
_FIT_HATCH = "xx"


def _base(series: str) -> str:
    return series.split(":", 1)[0]


def file_stem(name: str) -> str:
    """A configuration's name as a file name part ("resnet20 (world 2)" -> "resnet20_world2")."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name.replace(" (world ", "_world")).strip("_")


def color(backend: str, index: int) -> str:
    """A fixed colour per backend (a fit series takes its backend's), so a framework looks the same everywhere."""
    return COLORS.get(_base(backend), _FALLBACK[index % len(_FALLBACK)])


def is_fit(series: str) -> bool:
    """Whether a series is a Keras backend's fit style ("<backend>:fit")."""
    return series.endswith(":fit")


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return write_file_atomic(path, buffer.getvalue())


def _band(ax, frame: pd.DataFrame, x: str, y: str, label: str, colour: str) -> bool:
    """Mean line with a min-max band across seeds; False when there is nothing to draw."""
    data = frame.dropna(subset=[y])
    if data.empty:
        return False
    grouped = data.groupby("epoch")
    xs = grouped[x].mean()
    form = _FIT_LINE if is_fit(label) else {"marker": "o"}
    ax.plot(xs.values, grouped[y].mean().values, color=colour, label=label, markersize=3, **form)
    if data["seed"].nunique() > 1:
        ax.fill_between(xs.values, grouped[y].min().values, grouped[y].max().values, color=colour, alpha=0.2)
    return True


def plot_curves(curves: pd.DataFrame, model: str, backends: list[str], path: Path) -> Path | None:
    """2x2 grid: (test accuracy, train loss) x (epoch, wall-clock seconds)."""
    frame = curves[curves["model"] == model]
    if frame.empty:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [(0, 0, "epoch", "test_accuracy"), (0, 1, "epoch", "train_loss"),
              (1, 0, "wall_s", "test_accuracy"), (1, 1, "wall_s", "train_loss")]
    for row, col, x, y in panels:
        ax = axes[row][col]
        for index, backend in enumerate(backends):
            _band(ax, frame[frame["backend"] == backend], x, y, backend, color(backend, index))
        ax.set_xlabel("epoch" if x == "epoch" else "training wall-clock (s, evaluation excluded)")
        if x == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel({"test_accuracy": "test accuracy", "train_loss": "training loss"}[y])
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(f"{model}: learning curves (line: mean over seeds, band: min-max)")
    return _save(fig, path)


def _grouped_bars(ax, summary: pd.DataFrame, backends: list[str], value: str,
                  lo: str | None = None, hi: str | None = None) -> bool:
    models = list(dict.fromkeys(summary["model"]))
    width = 0.8 / max(len(backends), 1)
    drew = False
    for index, backend in enumerate(backends):
        rows = summary[summary["backend"] == backend].set_index("model").reindex(models)
        heights = pd.to_numeric(rows[value], errors="coerce").to_numpy(dtype=float)
        if np.all(np.isnan(heights)):
            continue
        yerr = None
        if lo and hi:
            low = pd.to_numeric(rows[lo], errors="coerce").to_numpy(dtype=float)
            high = pd.to_numeric(rows[hi], errors="coerce").to_numpy(dtype=float)
            yerr = np.nan_to_num(np.vstack([heights - low, high - heights]), nan=0.0).clip(min=0)
        positions = np.arange(len(models)) + (index - (len(backends) - 1) / 2) * width
        ax.bar(positions, np.nan_to_num(heights), width, yerr=yerr, capsize=4, label=backend,
               color=color(backend, index), hatch=_FIT_HATCH if is_fit(backend) else None,
               edgecolor="white" if is_fit(backend) else None)
        drew = True
    ax.set_xticks(np.arange(len(models)), models)
    ax.grid(axis="y", alpha=0.3)
    if drew:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    return drew


def plot_throughput(summary: pd.DataFrame, backends: list[str], path: Path) -> Path:
    """Training images/s bars (with the 95% interval) next to pipeline-inclusive images/s."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    _grouped_bars(left, summary, backends, "train_img_s", "train_img_s_seeds_ci_lo", "train_img_s_seeds_ci_hi")
    left.set_ylabel("images/s")
    left.set_title("training, compute-only (median, 95% interval across seeds)")
    _grouped_bars(right, summary, backends, "pipeline_img_s")
    right.set_ylabel("images/s")
    right.set_title("training, pipeline included (steady state)")
    return _save(fig, path)


def _data_on_top(ax, summary: pd.DataFrame, backends: list[str], peak: str, data: str) -> None:
    """Hatch the dataset's share at the top of each peak bar drawn by _grouped_bars (same positions)."""
    models = list(dict.fromkeys(summary["model"]))
    width = 0.8 / max(len(backends), 1)
    for index, backend in enumerate(backends):
        rows = summary[summary["backend"] == backend].set_index("model").reindex(models)
        heights = pd.to_numeric(rows[peak], errors="coerce").to_numpy(dtype=float)
        share = pd.to_numeric(rows[data], errors="coerce").to_numpy(dtype=float)
        positions = np.arange(len(models)) + (index - (len(backends) - 1) / 2) * width
        keep = ~np.isnan(heights) & ~np.isnan(share) & (share > 0)
        ax.bar(positions[keep], share[keep], width, bottom=(heights - share)[keep], fill=False, hatch="//",
               edgecolor="black", linewidth=0.5, label="dataset held" if index == 0 and keep.any() else None)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def plot_memory(summary: pd.DataFrame, backends: list[str], path: Path) -> Path:
    """Host peak RSS bars, plus device allocator peak bars when any run measured one; the dataset's bytes hatched."""
    has_device = summary["device_peak_mib"].notna().any()
    fig, axes = plt.subplots(1, 2 if has_device else 1, figsize=(11 if has_device else 6, 4.5), squeeze=False)
    _grouped_bars(axes[0][0], summary, backends, "host_peak_rss_mib")
    _data_on_top(axes[0][0], summary, backends, "host_peak_rss_mib", "host_data_mib")
    axes[0][0].set_ylabel("MiB")
    axes[0][0].set_title("host peak RSS of the worker process (hatched: dataset held)")
    if has_device:
        _grouped_bars(axes[0][1], summary, backends, "device_peak_mib")
        _data_on_top(axes[0][1], summary, backends, "device_peak_mib", "device_data_mib")
        axes[0][1].set_ylabel("MiB")
        axes[0][1].set_title("device allocator peak (hatched: dataset held)")
    return _save(fig, path)


def plot_scaling(table: pd.DataFrame, path: Path) -> Path | None:
    """Throughput against world size (left) and scaling efficiency with the ideal at 1 (right)."""
    if table.empty or table["world_size"].nunique() < 2:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for index, ((model, backend), rows) in enumerate(table.groupby(["model", "backend"], sort=False)):
        style = {"color": color(backend, index), "marker": "o",
                 "linestyle": "-" if index % 2 == 0 or backend in ("torch", "tensorflow") else "--"}
        left.plot(rows["world_size"], rows["train_img_s"], label=f"{model} {backend}", **style)
        right.plot(rows["world_size"], rows["efficiency"], label=f"{model} {backend}", **style)
    worlds = sorted(table["world_size"].unique())
    right.axhline(1.0, color="grey", linewidth=0.8, linestyle=":", label="ideal")
    for ax, title, label in ((left, "training images/s (global batch, compute-only)", "images/s"),
                             (right, "scaling efficiency E_N = img/s_N / (N x img/s_1)", "efficiency")):
        ax.set_xticks(worlds)
        ax.set_xlabel("replicas (processes), fixed per-replica batch")
        ax.set_ylabel(label)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def summed_confusion(results: list[RunResult], model: str, backend: str) -> np.ndarray | None:
    """Confusion matrix summed over the ok runs of (model, backend); None when none has one."""
    matrices = [np.asarray(r.confusion_matrix, dtype=np.int64) for r in results
                if r.model == model and r.backend == backend and r.status == "ok" and r.confusion_matrix]
    shapes = {m.shape for m in matrices}
    if not matrices or len(shapes) != 1:
        return None
    return np.sum(matrices, axis=0)


def plot_confusion(results: list[RunResult], model: str, backends: list[str], path: Path) -> Path | None:
    """Row-normalised confusion matrices of ``model``, one panel per backend with ok runs."""
    panels = [(b, summed_confusion(results, model, b)) for b in backends]
    panels = [(b, m) for b, m in panels if m is not None]
    if not panels:
        return None
    names = next((r.class_names for r in results if r.model == model and r.class_names), [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 5.0), squeeze=False,
                             layout="constrained")
    for ax, (backend, matrix) in zip(axes[0], panels):
        totals = matrix.sum(axis=1, keepdims=True)
        recall = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
        image = ax.imshow(recall, vmin=0, vmax=1, cmap="Blues")
        ticks = np.arange(matrix.shape[0])
        labels = names if len(names) == matrix.shape[0] else [str(t) for t in ticks]
        ax.set_xticks(ticks, labels, rotation=90, fontsize=7)
        ax.set_yticks(ticks, labels, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        accuracy = np.trace(matrix) / max(matrix.sum(), 1)
        ax.set_title(f"{backend} (accuracy {100 * accuracy:.2f}%)")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(f"{model}: confusion matrices (summed over ok seeds, rows normalised)")
    return _save(fig, path)


def render_plots(results: list[RunResult], tables: dict[str, pd.DataFrame], plots_dir: Path,
                 models: list[str], backends: list[str]) -> list[Path]:
    """Every figure; returns the paths written. Models/backends with no data are skipped, never fatal."""
    plots_dir = Path(plots_dir)
    written: list[Path | None] = []
    for model in models:
        written.append(plot_curves(tables["curves"], model, backends, plots_dir / f"curves_{file_stem(model)}.png"))
    summary = tables["summary"]
    if not summary.empty:
        written.append(plot_throughput(summary, backends, plots_dir / "throughput.png"))
        written.append(plot_memory(summary, backends, plots_dir / "memory.png"))
    for model in models:
        written.append(plot_confusion(results, model, backends, plots_dir / f"confusion_{file_stem(model)}.png"))
    return [p for p in written if p is not None]
