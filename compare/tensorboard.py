"""TensorBoard logs for every run, written by the parent from the RunResult with tensorboard's own writer.

One writer for both frameworks is what makes the tags and the step semantics identical:
the workers only record numbers (``RunResult.evaluations``, common.loop), and this module
turns every run, whatever its backend, into the same events. Layout and content::

    DIR/<model>/<backend>/seed<k>/events.out.tfevents.*   (a data-parallel run: DIR/<model>_world<N>/...;
                                                          Keras's fit style: <backend>-fit)

    step = optimiser steps done at the evaluation (common.loop), for every tag below
    train/loss, train/accuracy    mean over the steps since the previous evaluation
    test/loss, test/accuracy      the evaluation on the test split
    lr                            learning rate of the last step
    images_per_sec                images / training wall-clock since the previous evaluation (pipeline included)
    step_ms                       median compute-only step time since the previous evaluation
    memory/host_peak_rss_mib      the worker's peak RSS so far
    memory/device_peak_mib        device allocator peak so far (GPU runs only; both frameworks alike)
    time/train_wall_s             the training clock (time to accuracy reads it; evaluation excluded)
    test/confusion_matrix         image, at the last step
    hparams plugin                model, backend, seed, world size, data, recipe and spec settings; final metrics

Every event's wall time is the run's start plus its training clock, so TensorBoard's
"relative" axis is the training wall-clock: the two frameworks' curves overlay against
time as well as against steps.

tensorboard's hparams ``summary`` module imports TensorFlow; the parent process never
imports a framework, so the hparams events are built from the plugin's protos here, and
``tensorboard.compat.notf`` (the switch of tensorboard's own TF-free build) makes its
file I/O use the stub instead of TensorFlow.
"""
from __future__ import annotations

import io
import shutil
import sys
import types
from pathlib import Path
from typing import Any, Iterable

from common.results import RunResult

sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))

from tensorboard.compat.proto import event_pb2, summary_pb2  # noqa: E402
from tensorboard.plugins.hparams import api_pb2, metadata as hp_metadata, plugin_data_pb2  # noqa: E402
from tensorboard.summary.writer.event_file_writer import EventFileWriter  # noqa: E402

MIB = 1024 * 1024
SCALAR_TAGS = ("train/loss", "train/accuracy", "test/loss", "test/accuracy", "lr", "images_per_sec", "step_ms",
               "memory/host_peak_rss_mib", "memory/device_peak_mib", "time/train_wall_s")
CONFUSION_TAG = "test/confusion_matrix"
HPARAM_METRICS = ("test/accuracy", "test/loss", "time/train_wall_s")  # columns of the hparams table
_RECIPE_HPARAMS = ("epochs", "batch_size", "optimizer", "lr", "schedule", "weight_decay", "weight_decay_mode",
                   "label_smoothing", "augment", "crop_padding", "horizontal_flip", "init_scheme")
_SPEC_HPARAMS = ("data", "precision", "mode", "device", "train_subset", "eval_every_steps", "target_accuracy")


def run_dir(root: Path, result: RunResult) -> Path:
    """DIR/<model>/<backend>/seed<k>: one TensorBoard run per dualbench run. A data-parallel run's
    model folder is its configuration (``<model>_world<N>``, as its figures are named), so runs of
    several world sizes (`dualbench scale`) never overwrite each other's logs."""
    world = result.world_size or 1
    model = result.model if world == 1 else f"{result.model}_world{world}"
    return Path(root) / model / _series_folder(result) / f"seed{result.seed}"


def _series_folder(result: RunResult) -> str:
    """The backend, or "<backend>-fit" for a Keras backend's fit-style run (its own TensorBoard run)."""
    style = (result.spec or {}).get("style", "custom")
    return result.backend if style == "custom" or ":" in result.backend else f"{result.backend}-{style}"


def scalar_values(row: dict[str, Any]) -> dict[str, float]:
    """The scalars of one evaluation row by tag (a value the run did not measure is left out)."""
    values = {"train/loss": row.get("train_loss"), "train/accuracy": row.get("train_accuracy"),
              "test/loss": row.get("test_loss"), "test/accuracy": row.get("test_accuracy"),
              "lr": row.get("lr", row.get("lr_last")), "images_per_sec": row.get("images_per_sec"),
              "step_ms": row.get("step_ms"), "time/train_wall_s": row.get("wall_s")}
    if row.get("host_peak_rss_bytes") is not None:
        values["memory/host_peak_rss_mib"] = row["host_peak_rss_bytes"] / MIB
    if row.get("device_peak_bytes") is not None:
        values["memory/device_peak_mib"] = row["device_peak_bytes"] / MIB
    return {tag: float(value) for tag, value in values.items() if value is not None}


def hparams(result: RunResult) -> dict[str, Any]:
    """The run's hyper-parameters and settings as hparams values (bool, number or string)."""
    spec = result.spec or {}
    recipe = spec.get("recipe") or {}
    values: dict[str, Any] = {"model": result.model, "backend": result.backend, "seed": result.seed,
                              "world_size": result.world_size or 1, "style": spec.get("style", "custom")}
    values.update({f"recipe.{k}": recipe[k] for k in _RECIPE_HPARAMS if recipe.get(k) is not None})
    values.update({k: spec[k] for k in _SPEC_HPARAMS if spec.get(k) is not None})
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in values.items()}


def _evaluation_rows(result: RunResult) -> list[dict[str, Any]]:
    if result.evaluations:
        return list(result.evaluations)
    # results written before per-evaluation rows existed: epoch ends, step = epochs x steps per epoch unknown
    return [{**row, "step": row.get("epoch")} for row in result.epochs or []]


def _hparams_summaries(result: RunResult, start_s: float) -> list[summary_pb2.Summary]:
    """Experiment, session start and session end summaries of the hparams plugin."""
    values = hparams(result)
    infos = []
    start = plugin_data_pb2.SessionStartInfo(start_time_secs=start_s, group_name=result.run_id)
    for name, value in values.items():
        if isinstance(value, bool):
            start.hparams[name].bool_value = value
            kind = api_pb2.DATA_TYPE_BOOL
        elif isinstance(value, (int, float)):
            start.hparams[name].number_value = value
            kind = api_pb2.DATA_TYPE_FLOAT64
        else:
            start.hparams[name].string_value = value
            kind = api_pb2.DATA_TYPE_STRING
        infos.append(api_pb2.HParamInfo(name=name, type=kind))
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=[
        api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in HPARAM_METRICS])
    status = api_pb2.STATUS_SUCCESS if result.status == "ok" else api_pb2.STATUS_FAILURE
    end = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=start_s + (result.train_time_s or 0.0))
    parts = ((hp_metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment)),
             (hp_metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start)),
             (hp_metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end)))
    return [summary_pb2.Summary(value=[summary_pb2.Summary.Value(
        tag=tag, metadata=hp_metadata.create_summary_metadata(data), tensor=hp_metadata.NULL_TENSOR)])
        for tag, data in parts]


def confusion_png(matrix: list[list[int]], class_names: list[str], title: str) -> bytes:
    """The confusion matrix as a PNG (rows true, columns predicted), rendered with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(matrix)
    size = max(4.0, 0.45 * len(counts) + 2)
    fig, ax = plt.subplots(figsize=(size, size), dpi=80)
    try:
        ax.imshow(counts, cmap="Blues")
        ticks = range(len(counts))
        names = class_names if len(class_names) == len(counts) else [str(i) for i in ticks]
        ax.set_xticks(list(ticks), names, rotation=90, fontsize=7)
        ax.set_yticks(list(ticks), names, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    return buffer.getvalue()


def start_time(result: RunResult) -> float:
    """Seconds since the epoch when the run's worker recorded its manifest (now, if it has none)."""
    import calendar
    import time

    created = (result.manifest or {}).get("created_utc")
    try:
        return float(calendar.timegm(time.strptime(created, "%Y-%m-%dT%H:%M:%SZ")))
    except (TypeError, ValueError):
        return time.time()


def write_run(root: str | Path, result: RunResult, start_s: float | None = None) -> Path:
    """(Re)write the run's TensorBoard folder from its RunResult; returns the folder.

    ``start_s``: the wall time (seconds since the epoch) the training clock starts at (default
    ``start_time(result)``); every event is placed at ``start_s`` + the training clock.
    """
    start_s = start_time(result) if start_s is None else start_s
    folder = run_dir(Path(root), result)
    shutil.rmtree(folder, ignore_errors=True)  # a rerun replaces the run's curves, never adds to them
    folder.mkdir(parents=True, exist_ok=True)
    writer = EventFileWriter(str(folder))
    try:
        for summary in _hparams_summaries(result, start_s):
            writer.add_event(event_pb2.Event(wall_time=start_s, step=0, summary=summary))
        last_step, last_wall = 0, 0.0
        for row in _evaluation_rows(result):
            step, wall = int(row.get("step") or 0), float(row.get("wall_s") or 0.0)
            values = [summary_pb2.Summary.Value(tag=tag, simple_value=value)
                      for tag, value in scalar_values(row).items()]
            writer.add_event(event_pb2.Event(wall_time=start_s + wall, step=step,
                                             summary=summary_pb2.Summary(value=values)))
            last_step, last_wall = max(last_step, step), max(last_wall, wall)
        if result.confusion_matrix:
            from PIL import Image

            png = confusion_png(result.confusion_matrix, list(result.class_names), result.run_id)
            width, height = Image.open(io.BytesIO(png)).size
            image = summary_pb2.Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
            writer.add_event(event_pb2.Event(wall_time=start_s + last_wall, step=last_step, summary=summary_pb2.Summary(
                value=[summary_pb2.Summary.Value(tag=CONFUSION_TAG, image=image)])))
    finally:
        writer.close()
    return folder


def check_writable(root: str | Path) -> None:
    """Create ``root`` and prove a file can be written there; UserError naming --tensorboard otherwise."""
    import tempfile

    from common.errors import UserError

    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        raise UserError(f"cannot write TensorBoard logs under {root} ({exc.strerror or exc}): choose a writable "
                        "--tensorboard folder") from None


def write_all(root: str | Path, results: Iterable[RunResult]) -> list[Path]:
    """Every run's folder under ``root``; returns them. UserError naming the fix when ``root`` is not writable."""
    from common.errors import UserError

    try:
        return [write_run(root, result) for result in results]
    except OSError as exc:
        raise UserError(f"cannot write TensorBoard logs under {root} ({exc.strerror or exc}): choose a writable "
                        "--tensorboard folder") from None
