"""Tables, plots and reports from hand-made RunResults (no workers): columns, values, files, HTML."""
from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest

from common.audit import AUDIT_KEYS
from common.results import RunResult, write_jsonl_atomic
from compare.tables import HEAD_TO_HEAD_COLUMNS, SUMMARY_COLUMNS, build_tables
from tests.runner_helpers import run_cli

MIB = 2 ** 20


def _run(model, backend, seed, accuracy, step_s, status="ok", rss_mib=500, device_mib=None, data_on="host",
         data_mib=0):
    ok = status == "ok"
    on_device = data_on == "device"
    return RunResult(
        train_data_on=data_on, host_data_bytes=0 if on_device else data_mib * MIB,
        device_data_bytes=data_mib * MIB if on_device else 0,
        run_id=f"{model}__{backend}__seed{seed}", model=model, backend=backend, seed=seed, status=status,
        error=None if ok else "worker killed by SIGSEGV (exit -11)", exit_code=0 if ok else -11,
        test_accuracy=accuracy if ok else None, train_images_per_sec=100 / step_s if ok else None,
        pipeline_images_per_sec=80 / step_s if ok else None, compile_s=2.0 if ok else None, startup_s=5.0,
        epoch_wall_s=10.0 if ok else None, host_peak_rss_bytes=rss_mib * MIB,
        device_peak_bytes=device_mib * MIB if device_mib else None, trainable_params=1234, macs_per_image=5678,
        epochs=[{"epoch": e, "train_loss": 2.0 / e, "train_accuracy": accuracy * e / 2, "test_loss": 1.5 / e,
                 "test_accuracy": accuracy * e / 2, "wall_s": 10.0 * e} for e in (1, 2)] if ok else [],
        step_times_s=[step_s] * 20 if ok else [], step_batch_sizes=[100] * 20 if ok else [],
        class_names=["b", "a"], confusion_matrix=[[8, 2], [1, 9]] if ok else [],
        per_class={"precision": [0.89, 0.82], "recall": [0.8, 0.9], "f1": [accuracy, 0.86], "support": [10, 10]}
        if ok else {},
        spec={"model": model, "backend": backend, "seed": seed, "data": "synthetic", "mode": "best",
              "device": "cpu", "recipe": {"epochs": 2, "batch_size": 100}},
        settings={**{key: "same" for key in AUDIT_KEYS}, "bn_epsilon": 1e-5, "device": f"{backend}:cpu"},
        manifest={"cpu_model": "Test CPU", "versions": {backend: "1.0"}, "effective": {"device": "cpu"},
                  "data_fingerprint": "abc123"},
        stderr_tail=None if ok else "Fatal Python error: Segmentation fault")


@pytest.fixture
def results():
    runs = []
    for seed, (acc_torch, acc_tf) in enumerate([(0.80, 0.85), (0.81, 0.86), (0.82, 0.87)]):
        runs.append(_run("seed_cnn", "torch", seed, acc_torch, 0.1, device_mib=None))
        runs.append(_run("seed_cnn", "tensorflow", seed, acc_tf, 0.05, rss_mib=750))
    runs.append(_run("resnet20", "torch", 0, 0.5, 0.2))
    runs.append(_run("resnet20", "tensorflow", 0, None, 0.2, status="crashed"))  # only failures
    return runs


def test_summary_columns_and_hand_computed_values(results):
    tables = build_tables(results)
    summary = tables["summary"]
    assert list(summary.columns) == SUMMARY_COLUMNS
    row = summary.set_index(["model", "backend"]).loc[("seed_cnn", "torch")]
    assert (row["runs_ok"], row["runs_total"]) == (3, 3)
    assert row["test_acc_mean_pct"] == pytest.approx(81.0) and row["test_acc_std_pct"] == pytest.approx(1.0)
    assert row["train_img_s"] == pytest.approx(1000.0) and row["step_ms_p50"] == pytest.approx(100.0)
    assert row["host_peak_rss_mib"] == pytest.approx(500.0)
    assert pd.isna(row["device_peak_mib"]) and summary["device_peak_mib"].dtype == "float64"  # n/a, never 0
    failed_only = summary.set_index(["model", "backend"]).loc[("resnet20", "tensorflow")]
    assert (failed_only["runs_ok"], failed_only["runs_total"]) == (0, 1) and pd.isna(failed_only["train_img_s"])


def test_head_to_head_ratios_and_verdicts(results):
    h2h = build_tables(results)["head_to_head"].set_index("model")
    assert list(build_tables(results)["head_to_head"].columns) == HEAD_TO_HEAD_COLUMNS
    seed_cnn = h2h.loc["seed_cnn"]
    assert seed_cnn["comparison"] == "tensorflow/torch"
    assert seed_cnn["train_img_s_ratio"] == pytest.approx(2.0) and seed_cnn["host_rss_ratio"] == pytest.approx(1.5)
    assert seed_cnn["train_img_s_ratio_seed_min"] == seed_cnn["train_img_s_ratio_seed_max"] == pytest.approx(2.0)
    assert pd.isna(seed_cnn["device_peak_ratio"])
    # every seed: tf 5 points above torch; paired over seeds, no spread in the differences
    assert seed_cnn["acc_diff_pts"] == pytest.approx(5.0) and seed_cnn["acc_test"] == "paired t"
    assert (seed_cnn["acc_diff_ci_lo_pts"], seed_cnn["acc_diff_ci_hi_pts"]) == pytest.approx((5.0, 5.0))
    assert seed_cnn["verdict"] == "tensorflow better by 5.00 pts" and seed_cnn["seeds"] == "3/3"
    assert h2h.loc["resnet20"]["verdict"] == "no ok runs for tensorflow"


def test_curves_and_failures_tables(results):
    tables = build_tables(results)
    curves = tables["curves"]
    assert list(curves.columns) == ["model", "backend", "seed", "status", "epoch", "train_loss", "train_accuracy",
                                    "test_loss", "test_accuracy", "wall_s"]
    assert len(curves) == 7 * 2  # seven ok runs with two epochs each
    assert tables["failures"].to_dict("records") == [
        {"run_id": "resnet20__tensorflow__seed0", "status": "crashed", "exit_code": -11,
         "error": "worker killed by SIGSEGV (exit -11)"}]


def _write_runs(out, results):
    write_jsonl_atomic(out / "runs.jsonl", [r.to_dict() for r in results])


def test_report_command_renders_everything_from_runs_jsonl_alone(tmp_path, results, capsys):
    out = tmp_path / "out"
    _write_runs(out, results)
    assert run_cli("report", str(out)) == 0
    for name in ("summary.csv", "summary.parquet", "head_to_head.csv", "head_to_head.parquet", "curves.csv",
                 "curves.parquet", "per_class.csv", "per_class.parquet", "failures.csv", "report.md", "report.html"):
        assert (out / name).exists(), name
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == ["confusion_resnet20.png", "confusion_seed_cnn.png", "curves_resnet20.png",
                     "curves_seed_cnn.png", "memory.png", "throughput.png"]
    summary_csv = pd.read_csv(out / "summary.csv", keep_default_na=False)
    assert list(summary_csv.columns) == SUMMARY_COLUMNS and "n/a" in set(summary_csv["device_peak_mib"])
    parquet = pd.read_parquet(out / "summary.parquet")
    assert list(parquet.columns) == SUMMARY_COLUMNS and parquet["device_peak_mib"].isna().all()
    assert "tensorflow better by 5.00 pts" in capsys.readouterr().out


def test_report_markdown_sections(tmp_path, results):
    out = tmp_path / "out"
    _write_runs(out, results)
    assert run_cli("report", str(out)) == 0
    md = (out / "report.md").read_text()
    for heading in ("# dualbench report: torch vs tensorflow", "## Summary", "## Head to head", "## Failures",
                    "## Per-class F1",
                    "## Plots", "## Settings used", "## Fairness audit", "## Environment", "## Caveats",
                    "## How to reproduce"):
        assert heading in md, heading
    assert "**Question:**" in md and "Test CPU" in md
    assert "![throughput](plots/throughput.png)" in md
    assert "1 of 8 runs did not finish ok" in md and "Device memory is n/a" in md
    assert "dualbench run --models seed_cnn,resnet20 --backends torch,tensorflow --seeds 0,1,2" in md
    assert "No asymmetries" in md and "torch:cpu" in md  # audited from the runs' settings (no audit.json)
    assert "Fatal Python error: Segmentation fault" in md  # the failed run's stderr tail
    per_class = md.split("## Per-class F1")[1].split("### seed_cnn")[1].split("##")[0]
    assert re.search(r"\|\s*b\s*\|\s*0.81\s*\|\s*0.86\s*\|", per_class)  # mean F1 of class 'b' over seeds
    assert per_class.index("| b ") < per_class.index("| a ")  # label order kept


def test_html_is_self_contained_with_embedded_images(tmp_path, results):
    out = tmp_path / "out"
    _write_runs(out, results)
    assert run_cli("report", str(out)) == 0
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert page.count('src="data:image/png;base64,') == len(list((out / "plots").iterdir()))
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # no external URL at all
    assert "<link" not in page and "<script" not in page
    assert "<table>" in page and "tensorflow better by 5.00 pts" in page


def test_report_uses_audit_json_and_highlights_asymmetries(tmp_path, results):
    out = tmp_path / "out"
    _write_runs(out, results)
    rows = [{"setting": "bn_epsilon", "torch": 1e-5, "tensorflow": 1e-3, "kind": "must match", "asymmetry": True},
            {"setting": "device", "torch": "cpu", "tensorflow": "CPU:0", "kind": "framework-native",
             "asymmetry": False}]
    (out / "audit.json").write_text(json.dumps({"models": {"seed_cnn": {"backends": ["torch", "tensorflow"],
                                                                        "rows": rows}}}))
    assert run_cli("report", str(out)) == 0
    md = (out / "report.md").read_text()
    assert "**1 asymmetry found.**" in md
    assert re.search(r"\|\s*\*\*seed_cnn\*\*\s*\|\s*\*\*bn_epsilon\*\*\s*\|\s*\*\*1e-05\*\*\s*\|\s*\*\*0.001\*\*", md)
    assert "Fairness audit: seed_cnn has asymmetries in bn_epsilon" in md
    assert (out / "report.html").read_text().count('<tr class="asym">') == 1


def test_report_on_missing_or_empty_results_exits_2(tmp_path, capsys):
    assert run_cli("report", str(tmp_path / "nowhere")) == 2
    assert "not a results folder" in capsys.readouterr().err
    (tmp_path / "runs.jsonl").write_text("")
    assert run_cli("report", str(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no results in" in err[0]
    (tmp_path / "runs.jsonl").write_text("{broken\n")
    assert run_cli("report", str(tmp_path)) == 2
    assert "not valid JSON lines" in capsys.readouterr().err


def test_report_with_only_failed_runs_does_not_crash(tmp_path):
    out = tmp_path / "out"
    _write_runs(out, [_run("seed_cnn", "torch", 0, None, 0.1, status="crashed"),
                      _run("seed_cnn", "tensorflow", 0, None, 0.1, status="timeout")])
    assert run_cli("report", str(out)) == 0
    assert (out / "report.html").exists() and "2 of 2 runs did not finish ok" in (out / "report.md").read_text()


def test_head_to_head_per_seed_throughput_ratio_range():
    # tf/torch per seed: 0.1/0.09 = 1.111, 0.1/0.1 = 1.0, 0.1/0.125 = 0.8; seed 3 has no tf partner
    runs = [_run("m", "torch", s, 0.5, 0.1) for s in range(4)]
    runs += [_run("m", "tensorflow", s, 0.5, step) for s, step in enumerate((0.09, 0.1, 0.125))]
    row = build_tables(runs)["head_to_head"].set_index("model").loc["m"]
    assert row["train_img_s_ratio_seed_min"] == pytest.approx(0.8)
    assert row["train_img_s_ratio_seed_max"] == pytest.approx(1 / 0.9)
    # failed partners pair with nothing
    runs[4] = _run("m", "tensorflow", 0, None, 0.09, status="crashed")
    row = build_tables(runs)["head_to_head"].set_index("model").loc["m"]
    assert (row["train_img_s_ratio_seed_min"], row["train_img_s_ratio_seed_max"]) == pytest.approx((0.8, 1.0))


def test_head_to_head_accuracy_is_a_paired_test_over_seeds():
    # per seed tf - torch: 3, 4, 2 points. Paired: mean 3, sd 1, t(0.975, 2) = 4.302653. Welch over the
    # same six numbers would call it noise (seed 1 is easier for both frameworks).
    runs = []
    for seed, (acc_torch, acc_tf) in enumerate([(0.80, 0.83), (0.82, 0.86), (0.81, 0.83)]):
        runs += [_run("m", "torch", seed, acc_torch, 0.1), _run("m", "tensorflow", seed, acc_tf, 0.1)]
    row = build_tables(runs)["head_to_head"].set_index("model").loc["m"]
    half = 4.302653 * 1.0 / math.sqrt(3)
    assert row["acc_test"] == "paired t" and row["acc_diff_pts"] == pytest.approx(3.0)
    assert (row["acc_diff_ci_lo_pts"], row["acc_diff_ci_hi_pts"]) == pytest.approx((3 - half, 3 + half), abs=1e-6)
    assert row["verdict"] == "tensorflow better by 3.00 pts"
    # without shared seeds the runs do not pair: Welch
    unpaired = [r for r in runs if r.backend == "torch"] + [
        _run("m", "tensorflow", seed + 10, acc, 0.1) for seed, acc in enumerate((0.83, 0.86, 0.83))]
    row = build_tables(unpaired)["head_to_head"].set_index("model").loc["m"]
    assert row["acc_test"] == "Welch t" and row["verdict"] == "within seed noise"


def test_a_significant_difference_inside_the_seed_spread_is_within_seed_noise():
    """The README quick start's seed_cnn shape: tf - torch = 0.16, 0.24, 0.16 pts per seed (paired interval
    0.07..0.30, excludes 0) while each framework moves by ~0.33 pts from seed to seed: within seed noise, and
    the verdict says by how much. The same differences with a smaller seed spread: tensorflow better."""
    def runs_for(torch_pct, diffs_pct):
        runs = []
        for seed, (acc, diff) in enumerate(zip(torch_pct, diffs_pct)):
            runs += [_run("m", "torch", seed, acc / 100, 0.1), _run("m", "tensorflow", seed, (acc + diff) / 100, 0.1)]
        return build_tables(runs)["head_to_head"].set_index("model").loc["m"]

    row = runs_for([44.62, 45.24, 44.93], [0.16, 0.24, 0.16])
    assert 0 < row["acc_diff_ci_lo_pts"] < row["acc_diff_ci_hi_pts"] < row["acc_seed_spread_pts"]
    assert row["acc_seed_spread_pts"] == pytest.approx(math.sqrt((0.31 ** 2 + 0.3510 ** 2) / 2), abs=1e-3)
    assert row["verdict"].startswith("within seed noise (tensorflow +0.19 pts: the 95% interval excludes 0")
    tight = runs_for([44.90, 45.00, 44.95], [0.16, 0.24, 0.16])  # seed spread ~0.06 pts: the difference matters
    assert tight["acc_diff_ci_hi_pts"] > tight["acc_seed_spread_pts"]
    assert tight["verdict"] == "tensorflow better by 0.19 pts"


def test_head_to_head_throughput_ratio_is_the_median_of_per_seed_ratios_with_an_interval_across_seeds():
    # images/s per seed: torch 1000, 2000, 1000; tf 1000, 2200, 1210 -> ratios 1.0, 1.1, 1.21 (median 1.1).
    # The ratio of pooled-step medians would be 1210 / 1000 = 1.21.
    runs = []
    for seed, (torch_s, tf_s) in enumerate([(0.1, 0.1), (0.05, 0.05 / 1.1), (0.1, 0.1 / 1.21)]):
        runs += [_run("m", "torch", seed, 0.5, torch_s), _run("m", "tensorflow", seed, 0.5, tf_s)]
    tables = build_tables(runs)
    row = tables["head_to_head"].set_index("model").loc["m"]
    log, half = math.log(1.1), 4.302653 * math.log(1.1) / math.sqrt(3)  # logs 0, l, 2l: mean l, sd l
    assert row["train_img_s_ratio"] == pytest.approx(1.1)
    assert (row["train_img_s_ratio_ci_lo"], row["train_img_s_ratio_ci_hi"]) == pytest.approx(
        (math.exp(log - half), math.exp(log + half)))
    assert row["pipeline_img_s_ratio"] == pytest.approx(1.1)
    summary = tables["summary"].set_index("backend")
    # the step-level interval stays, secondary and named for what it is; the seed-level one beside it
    assert summary.loc["tensorflow", "train_img_s"] == pytest.approx(1210)
    torch_mean, torch_sd = 4000 / 3, math.sqrt(((1000 - 4000 / 3) ** 2 * 2 + (2000 - 4000 / 3) ** 2) / 2)
    assert summary.loc["torch", "train_img_s_seeds_ci_hi"] == pytest.approx(
        torch_mean + 4.302653 * torch_sd / math.sqrt(3), rel=1e-6)
    assert "train_img_s_steps_ci_lo" in summary.columns


def test_memory_shows_the_dataset_bytes_apart_on_both_sides():
    """torch keeps 240 MiB of data on the GPU, TensorFlow 270 MiB on the host: the peaks less the data compare."""
    runs = [_run("m", "torch", 0, 0.5, 0.1, rss_mib=1000, device_mib=1500, data_on="device", data_mib=240),
            _run("m", "tensorflow", 0, 0.5, 0.1, rss_mib=1470, device_mib=1300, data_on="host", data_mib=270)]
    tables = build_tables(runs)
    summary = tables["summary"].set_index("backend")
    assert summary.loc["torch", "train_data_on"] == "device" and summary.loc["tensorflow", "train_data_on"] == "host"
    assert summary.loc["torch", "host_rss_less_data_mib"] == pytest.approx(1000)
    assert summary.loc["torch", "device_peak_less_data_mib"] == pytest.approx(1260)
    assert summary.loc["tensorflow", "host_rss_less_data_mib"] == pytest.approx(1200)
    assert summary.loc["tensorflow", "device_peak_less_data_mib"] == pytest.approx(1300)
    row = tables["head_to_head"].set_index("model").loc["m"]
    assert row["host_rss_ratio"] == pytest.approx(1.47) and row["host_rss_less_data_ratio"] == pytest.approx(1.2)
    assert row["device_peak_ratio"] == pytest.approx(1300 / 1500)
    assert row["device_peak_less_data_ratio"] == pytest.approx(1300 / 1260)
    cpu = build_tables([_run("m", "torch", 0, 0.5, 0.1, data_mib=240)])["summary"].iloc[0]
    assert cpu["host_data_mib"] == pytest.approx(240) and pd.isna(cpu["device_data_mib"])  # CPU: n/a, never 0
