"""`dualbench export` without frameworks: runs keep their weights, verification and latency arithmetic,
the Deployment tables and report section, bad input. (Real exports: tests/test_export.py.)"""
from __future__ import annotations

import json

import numpy as np
import pytest

from common.deploy import (FORMATS, LITERT_RTOL, NATIVE_RTOL, compare_logits, diagnose, failures,
                           latency_summary, percentile_ms)
from common.results import RunResult, write_jsonl_atomic
from common.weights import WeightLayoutError, file_sha256, load_weights
from compare.cmd_export import _exit_code
from compare.deployment import (DEPLOYMENT_JSON, LATENCY_PLOT, serving_table, verification_table,
                                write_outputs)
from tests.runner_helpers import fake_env, fake_run, launches, rows, run_cli  # noqa: F401


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dualbench: error: "), err
    return err[0]


# -- runs keep their final weights -------------------------------------------------------------

def test_a_run_keeps_its_final_weights_with_their_sha256(fake_env, tmp_path):
    out = tmp_path / "out"
    assert fake_run(out, backends="fakea") == 0
    row = rows(out)["seed_cnn__fakea__seed0"]
    assert row["final_weights_file"] == "weights/seed_cnn__fakea__seed0.npz"  # relative: the folder can move
    path = out / row["final_weights_file"]
    assert file_sha256(path) == row["final_weights_sha256"]
    weights = load_weights(path, row["final_weights_sha256"])
    assert set(weights) == {"fake.kernel", "fake.bias"}  # the backend's get_weights after training
    assert np.abs(weights["fake.kernel"]).max() > 0  # the fake model starts at zero: these are trained
    path.write_bytes(path.read_bytes()[:-1] + b"x")  # a changed file is refused, not exported
    with pytest.raises(WeightLayoutError, match="SHA-256"):
        load_weights(path, row["final_weights_sha256"])


def test_rerunning_or_moving_a_folder_is_not_a_new_configuration(fake_env, tmp_path):
    """The weights path the runner hands the worker is where files go, not a setting: a rerun skips
    the finished run even though its stored spec holds another absolute path."""
    out, moved = tmp_path / "out", tmp_path / "moved"
    assert fake_run(out, backends="fakea") == 0
    assert rows(out)["seed_cnn__fakea__seed0"]["spec"]["final_weights_path"].startswith(str(out))
    out.rename(moved)
    assert fake_run(moved, backends="fakea") == 0  # skipped as done, no "other settings" error
    assert launches(fake_env, "train") == ["seed_cnn__fakea__seed0"]


# -- verification arithmetic ---------------------------------------------------------------------

def test_compare_logits_measures_relative_to_the_logit_scale_and_counts_top1():
    reference = np.array([[4.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 3.0], [0.5, 0.4, 0.0]])
    logits = reference.copy()
    logits[3] = [0.4, 0.5, 0.0]  # one image's top-1 flips; largest change 0.1
    metrics = compare_logits(reference, logits)
    assert metrics["max_abs_diff"] == pytest.approx(0.1)
    assert metrics["max_rel_diff"] == pytest.approx(0.1 / 4.0)
    assert metrics["top1_agreement"] == 0.75 and metrics["images"] == 4
    problems = failures(metrics, rtol=1e-5)
    assert any("max relative difference 2.50e-02 > 1e-05" in p for p in problems)
    assert any("top-1 agreement 75.00% < 99.9%" in p for p in problems)
    assert failures(compare_logits(reference, reference + 1e-6), rtol=NATIVE_RTOL) == []
    assert failures(compare_logits(reference, reference + 3e-5 * 4), rtol=NATIVE_RTOL)  # 3e-5 relative fails
    assert failures(compare_logits(reference, reference + 3e-5 * 4), rtol=LITERT_RTOL) == []
    assert "shape" in failures(compare_logits(reference, reference[:2]), rtol=1.0)[0]
    assert "NaN" in failures(compare_logits(reference, reference * np.nan), rtol=1.0)[0]


def test_diagnose_names_batch_statistics_and_a_transposed_layout():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((8, 10))
    assert diagnose(reference, reference, reference, reference + 1) == []  # a correct artifact: no notes
    assert diagnose(reference, reference, reference, reference) == []  # ... also on symmetric images
    batch_dependent = diagnose(reference, reference + 1, reference + 2, None)
    assert len(batch_dependent) == 1 and "BatchNorm exported in training mode" in batch_dependent[0]
    transposed = diagnose(reference, reference + 1, reference + 1, reference)
    assert len(transposed) == 1 and "transposed layout" in transposed[0]


def test_latency_summary_percentiles_throughput_and_medians():
    rounds = [{"batch1_s": [0.001 * i for i in range(1, 51)], "batch_s": [0.5, 0.5], "load_s": 1.0,
               "import_s": 2.0, "first_call_s": 0.1, "peak_rss_bytes": 100},
              {"batch1_s": [0.001 * i for i in range(51, 101)], "batch_s": [0.25] * 4, "load_s": 3.0,
               "import_s": 4.0, "first_call_s": 0.3, "peak_rss_bytes": 300}]
    summary = latency_summary(rounds, batch=64)
    pooled = [0.001 * i for i in range(1, 101)]  # the two rounds' calls pooled: 1..100 ms
    assert summary["latency_p50_ms"] == pytest.approx(50.5)
    assert summary["latency_p90_ms"] == pytest.approx(90.1)
    assert summary["latency_p99_ms"] == pytest.approx(99.01)
    assert summary["latency_p50_ms"] == pytest.approx(percentile_ms(pooled, 50))
    assert summary["round_p50_ms"] == pytest.approx([25.5, 75.5])
    assert summary["batch64_img_s"] == pytest.approx(np.median([64 * 2 / 1.0, 64 * 4 / 1.0]))  # 128 and 256
    assert summary["load_s"] == 2.0 and summary["peak_rss_bytes"] == 200 and summary["rounds"] == 2
    assert summary["batch1_calls"] == 100


def test_every_framework_exports_every_format_the_issue_names():
    assert {(f.backend, f.name) for f in FORMATS} == {
        ("torch", "torch_export"), ("torch", "onnx"), ("tensorflow", "saved_model"), ("tensorflow", "onnx"),
        ("tensorflow", "keras"), ("tensorflow", "litert")}
    assert {f.layout for f in FORMATS if f.backend == "torch"} == {"NCHW"}
    assert {f.layout for f in FORMATS if f.backend == "tensorflow"} == {"NHWC"}


# -- outputs, report, exit codes ---------------------------------------------------------------

def _deployment(status="ok", served=True):
    row = {"model": "resnet20", "backend": "torch", "seed": 0, "label": "resnet20__torch__seed0",
           "format": "onnx", "runtime": "onnxruntime", "input_layout": "NCHW", "rtol": 1e-5,
           "artifact": "resnet20__torch__seed0/model.onnx", "status": status,
           "error": None if status == "ok" else "onnx differs: max relative difference 1.0e-01 > 1e-05",
           "images": 100, "max_abs_diff": 1e-6, "max_rel_diff": 1e-7, "top1_agreement": 1.0,
           "size_bytes": 2 * 2 ** 20, "serve": True}
    if served:
        row.update(latency_p50_ms=1.0, latency_p90_ms=2.0, latency_p99_ms=3.0, batch64_img_s=500.0,
                   peak_rss_bytes=100 * 2 ** 20, load_s=0.1, first_call_s=0.01, rounds=2,
                   serve_threads={"intra_op_threads": 2, "inter_op_threads": 1}, round_p50_ms=[1.0, 1.1])
    return {"command": "dualbench export results/x", "created_utc": "now",
            "settings": {"threads": 2, "batch": 64, "rounds": 2, "seconds": 1.0, "warmup": 10,
                         "native_rtol": 1e-5, "litert_rtol": 1e-4, "cross_rtol": 1e-4,
                         "min_top1_agreement": 0.999},
            "rows": [row], "cross_framework": [{"model": "resnet20", "seed": 0, "weights_from": "x",
                                                "passed": True, "max_rel_diff": 1e-7}]}


def test_tables_files_and_plot_from_a_deployment(tmp_path):
    deployment = _deployment()
    written = write_outputs(tmp_path, deployment)
    assert {p.name for p in written} == {"deployment.json", "deployment.csv", "cross_framework.csv", LATENCY_PLOT}
    serving = serving_table(deployment)
    assert serving.loc[0, "size_mib"] == 2.0 and serving.loc[0, "peak_rss_mib"] == 100.0
    assert serving.loc[0, "batch64_img_s"] == 500.0 and serving.loc[0, "threads"] == "intra_op=2, inter_op=1"
    assert verification_table(deployment).loc[0, "status"] == "ok"
    assert serving_table(_deployment(served=False)).empty


def test_exit_code_mismatch_always_fails_a_missing_format_only_with_strict():
    assert _exit_code(_deployment(), strict=True) == 0
    assert _exit_code(_deployment("mismatch"), strict=False) == 1
    assert _exit_code(_deployment("failed"), strict=False) == 0
    assert _exit_code(_deployment("failed"), strict=True) == 1
    disagree = _deployment()
    disagree["cross_framework"][0]["passed"] = False
    assert _exit_code(disagree, strict=False) == 1


def test_report_rerenders_the_deployment_section(fake_env, tmp_path):
    out = tmp_path / "out"
    assert fake_run(out, backends="fakea") == 0
    assert "## Deployment" not in (out / "report.md").read_text()
    write_outputs(out / "export", _deployment("mismatch"))
    assert run_cli("report", str(out)) == 0
    report = (out / "report.md").read_text()
    assert "## Deployment" in report and "### Serving" in report and "export/latency.png" in report
    assert "onnx differs: max relative difference" in report  # the failure's message is in the report
    assert "Deployment" in (out / "report.html").read_text()
    assert json.loads((out / "export" / DEPLOYMENT_JSON).read_text())["rows"][0]["status"] == "mismatch"


@pytest.mark.parametrize("argv,expected", [
    ([], "nothing to export"),
    (["--models", "resnet21", "--out", "{tmp}/x"], "unknown model 'resnet21'"),
    (["--models", "resnet20"], "--models needs --out"),
    (["--models", "resnet20", "--out", "{tmp}/x", "--formats", "onnx,pickle"], "unknown --formats pickle"),
    (["--models", "resnet20", "--out", "{tmp}/x", "--threads", "0"], "--threads must be positive"),
    (["--models", "resnet20", "--out", "{tmp}/x", "--in-shape", "8,8"], "--in-shape must be H,W,C"),
    (["--models", "resnet20", "--out", "{tmp}/x", "--backends", "fakea"], "has no export formats"),
    (["{tmp}/missing"], "is not a results folder"),
])
def test_bad_input_is_one_line_exit_2(fake_env, tmp_path, capsys, argv, expected):
    code = run_cli("export", *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2
    assert expected in _one_error_line(capsys)


def test_a_results_folder_without_weights_is_one_line_naming_the_fix(fake_env, tmp_path, capsys):
    out = tmp_path / "out"
    assert fake_run(out, backends="fakea") == 0
    (out / "weights" / "seed_cnn__fakea__seed0.npz").unlink()  # as a folder from before weights were kept
    assert run_cli("export", str(out)) == 2
    line = _one_error_line(capsys)
    assert "kept its final weights" in line and "--force" in line
    assert not list((out / "export").glob(".work-*"))  # the work folder is cleaned up
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli("export", str(empty)) == 2
    assert "runs.jsonl not found" in _one_error_line(capsys)


def test_an_input_shape_that_cannot_take_the_images_is_named():
    from common.deploy_worker import _shape_problem

    assert _shape_problem([None, 3, 32, 32], [500, 3, 32, 32]) is None  # dynamic batch, NCHW as fed
    assert _shape_problem([None, None, None, 3], [500, 32, 32, 3]) is None  # free spatial dimensions
    message = _shape_problem([None, 32, 32, 3], [500, 3, 32, 32])  # an NHWC artifact fed NCHW images
    assert message == "the artifact's input shape is ['batch', 32, 32, 3], the verification images are " \
                      "['batch', 3, 32, 32]"
    assert _shape_problem([None, 3, 32], [500, 3, 32, 32])  # another rank
