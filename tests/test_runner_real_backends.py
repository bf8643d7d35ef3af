"""End to end: `dualbench run` with the REAL torch and tensorflow workers, through the CLI, in a subprocess."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from common.results import RunResult
from tests.runner_helpers import PROJECT_ROOT

REQUIRED_FIELDS = ("test_accuracy", "test_loss", "train_images_per_sec", "pipeline_images_per_sec", "compile_s",
                   "startup_s", "host_peak_rss_bytes", "trainable_params", "macs_per_image")


@pytest.mark.slow
def test_real_backends_end_to_end(tmp_path):
    for module in ("torch", "tensorflow", "torch_impl.worker", "tf_impl.worker"):
        if importlib.util.find_spec(module) is None:  # found without importing it here
            pytest.skip(f"{module} is not installed")  # only a missing module skips; failures below are real
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("DUALBENCH_EXTRA_BACKENDS", "DUALBENCH_FAKE_FAULT")}
    env.update({"DUALBENCH_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(PROJECT_ROOT)})
    argv = [sys.executable, "-m", "compare", "run", "--backends", "torch,tensorflow", "--models", "seed_cnn",
            "--data", "synthetic", "--epochs", "1", "--max-steps-per-epoch", "3", "--train-subset", "256",
            "--test-subset", "128", "--batch-size", "32",
            "--measure-warmup-steps", "1",  # 3 steps = compile step + 1 warm-up + 1 measured: throughput is not None
            "--device", "cpu", "--timeout", "600", "--out", str(out),
            # the audit must find both real workers identical (--strict refuses otherwise), betas included
            "--strict", "--optimizer", "adamw", "--wd-mode", "decoupled", "--adam-betas", "0.85,0.995",
            "--no-decay-bn-and-bias",
            # observability: an evaluation after step 2 as well, time to accuracy, TensorBoard, retrieval
            "--eval-every-steps", "2", "--target-accuracy", "0.05", "--tensorboard", str(tmp_path / "tb"),
            "--retrieval"]
    done = subprocess.run(argv, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=1500)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted((out / "logs").glob("*.log"))) if out.exists() else ""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + logs
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["backend"] for r in rows) == ["tensorflow", "torch"]
    for row in rows:
        result = RunResult.from_dict(row)
        assert result.status == "ok", (result.run_id, result.error, result.stderr_tail)
        for name in REQUIRED_FIELDS:
            assert getattr(result, name) is not None, (result.run_id, name)
        assert 0.0 <= result.test_accuracy <= 1.0
        assert result.host_peak_rss_bytes > 10 * 2 ** 20
        assert result.device_peak_bytes is None  # CPU: not measured, never 0
        # CPU: both keep their dataset copy in host memory; its bytes are recorded apart from the RSS
        assert result.train_data_on == "host" and result.device_data_bytes == 0
        assert result.data_arrays["train_images"] == ["host", 256 * 40 * 40 * 3]  # padded by 4, uint8
        assert 0 < result.host_data_bytes < result.host_peak_rss_bytes
        assert len(result.epochs) == 1 and result.confusion_matrix and result.settings and result.manifest
    assert rows[0]["trainable_params"] == rows[1]["trainable_params"]
    assert rows[0]["settings"]["data_fingerprint"] == rows[1]["settings"]["data_fingerprint"]
    for name in ("summary.csv", "summary.parquet", "head_to_head.csv", "curves.csv", "report.md", "report.html",
                 "audit.json", "audit.csv", "manifest.json", "plots/throughput.png", "plots/curves_seed_cnn.png",
                 "time_to_accuracy.csv", "retrieval.csv", "weights/seed_cnn__torch__seed0.npz"):
        assert (out / name).exists(), name
    audit = json.loads((out / "audit.json").read_text())["models"]["seed_cnn"]
    assert audit["asymmetries"] == [] and "0 asymmetries found" in done.stdout
    values = {row["setting"]: row for row in audit["rows"]}
    for backend in ("torch", "tensorflow"):  # read back from the built objects in each worker
        assert (values["adam_beta1"][backend], values["adam_beta2"][backend]) == (0.85, 0.995)
        assert values["decay_bn_and_bias"][backend] is False and values["fallbacks"][backend] == "none"
    names = {b: audit["details"][b]["decayed_param_names"] for b in ("torch", "tensorflow")}
    assert names["torch"] == names["tensorflow"] == [f"{layer}.kernel" for layer in
                                                    ("conv1", "conv2", "conv3", "fc1", "fc2", "head")]
    _check_observability(out, tmp_path / "tb", rows)


def _check_observability(out, tb, rows):
    """The real frameworks' TensorBoard logs, evaluations and retrieval agree in form and, for embeddings, in value."""
    from compare.tensorboard import SCALAR_TAGS
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = {}
    for backend in ("torch", "tensorflow"):
        accumulator = EventAccumulator(str(tb / "seed_cnn" / backend / "seed0"))
        accumulator.Reload()
        steps[backend] = {tag: [e.step for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}
    assert steps["torch"] == steps["tensorflow"]
    assert set(steps["torch"]) == set(SCALAR_TAGS) - {"memory/device_peak_mib"}
    assert steps["torch"]["test/accuracy"] == [2, 3]  # after step 2, then the epoch's end (3 steps)
    for row in rows:
        assert [e["step"] for e in row["evaluations"]] == [2, 3] and row["evaluations"][0]["eval_s"] > 0
    retrieval = json.loads((out / "retrieval.json").read_text())
    assert [m["status"] for m in retrieval["metrics"]] == ["ok", "ok"]
    assert len(retrieval["agreement"]) == 2 and all(a["agrees"] for a in retrieval["agreement"]), retrieval
    assert "## Time to accuracy" in (out / "report.md").read_text()


@pytest.mark.slow
def test_keras_torch_both_styles_on_grayscale_data_end_to_end(tmp_path, monkeypatch):
    """keras-torch with the run's observability, through the CLI: the custom step and Keras's fit on MNIST-
    shaped data (28x28x1 IDX files, the dataset's defaults: no flips), mid-epoch evaluations, time to
    accuracy, TensorBoard, retrieval (each style's weights embedded by the other's process too)."""
    from tests import data_fixtures as fx

    for module in ("torch", "keras"):  # (find_spec of kerastorch_impl.worker would import its package here)
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    fx.write_idx_files(tmp_path / "mnist", fx.idx_arrays(96, 32))
    for name in ("DUALBENCH_EXTRA_BACKENDS", "DUALBENCH_FAKE_FAULT"):
        monkeypatch.delenv(name, raising=False)
    # MNIST's published counts shrunk to the generated files' (as tests/test_idx.py does), in the parent
    # process, which decodes the files into the cache the workers then read
    shrink = ("import dataclasses\nfrom common.data import idx\nfor name, d in list(idx.IDX_DATASETS.items()):\n"
              "    idx.IDX_DATASETS[name] = dataclasses.replace(d, counts=(96, 32))")
    out, tb = tmp_path / "out", tmp_path / "tb"
    argv = ["run", "--backends", "keras-torch", "--style", "custom,fit", "--models", "seed_cnn",
            "--data", f"mnist:{tmp_path / 'mnist'}", "--epochs", "1", "--max-steps-per-epoch", "3",
            "--batch-size", "16", "--measure-warmup-steps", "1", "--device", "cpu", "--threads", "1",
            "--timeout", "600", "--out", str(out), "--eval-every-steps", "2", "--target-accuracy", "0.05",
            "--tensorboard", str(tb), "--retrieval"]
    done = fx.run_cli(argv, tmp_path / "cache", prelude=shrink, timeout=1500)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted((out / "logs").glob("*.log"))) if out.exists() else ""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + logs
    rows = {RunResult.from_dict(json.loads(line)).spec["style"]: json.loads(line)
            for line in (out / "runs.jsonl").read_text().splitlines()}
    assert set(rows) == {"custom", "fit"}
    for style, row in rows.items():
        assert row["status"] == "ok" and row["backend"] == "keras-torch", (style, row.get("error"))
        assert row["settings"]["execution_style"] == style and row["settings"]["execution_mode"] == "eager"
        assert row["settings"]["augmentation"] == "random crop (pad 3)"  # MNIST's defaults: no flips
        assert [e["step"] for e in row["evaluations"]] == [2, 3] and row["evaluations"][0]["eval_s"] > 0
        assert row["evaluations"][0]["train_loss"] > 0 and row["train_images_per_sec"] is not None
    tables = (out / "report.md").read_text()
    assert "keras-torch:fit" in tables and "## Time to accuracy" in tables and "The cost of the idiom" in tables
    for folder in ("keras-torch", "keras-torch-fit"):
        assert list((tb / "seed_cnn" / folder / "seed0").glob("events.out.tfevents.*")), folder
    retrieval = json.loads((out / "retrieval.json").read_text())
    assert sorted(m["backend"] for m in retrieval["metrics"]) == ["keras-torch", "keras-torch:fit"]
    assert all(m["status"] == "ok" for m in retrieval["metrics"]), retrieval["metrics"]
    assert all(a["agrees"] for a in retrieval["agreement"]) and len(retrieval["agreement"]) == 2
