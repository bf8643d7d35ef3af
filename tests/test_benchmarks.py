"""benchmarks/: the scripts' own arithmetic, and one script end to end on both real backends (quick mode)."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import _common  # noqa: E402
import bare_vs_dualbench  # noqa: E402
import compile_region  # noqa: E402
import machine_noise  # noqa: E402
import best_bare_ratio  # noqa: E402
import mode_matrix  # noqa: E402
import pipeline_cost  # noqa: E402
import roofline  # noqa: E402
import threads  # noqa: E402
import tune_check  # noqa: E402


def test_abba_interleaves_sides_and_reverses_every_other_round():
    assert list(_common.abba(["a", "b"], 3)) == [(0, "a"), (0, "b"), (1, "b"), (1, "a"), (2, "a"), (2, "b")]
    assert [side for _, side in _common.abba(["a", "b", "c"], 2)] == ["a", "b", "c", "c", "b", "a"]


def test_ratio_is_the_median_of_per_round_ratios():
    rows = [{"round": r, "model": "m", "backend": "torch", "side": side, "batch_size": 8, "v": v}
            for r, side, v in [(1, "bare", 100.0), (1, "dualbench", 90.0), (2, "bare", 50.0),
                               (2, "dualbench", 60.0), (3, "bare", 100.0), (3, "dualbench", 100.0)]]
    [row] = bare_vs_dualbench.summarise(rows, "v", "x")
    assert row["bare_x"] == 100.0 and row["dualbench_x"] == 90.0
    assert row["ratio"] == pytest.approx(1.0)  # per round 0.9, 1.2, 1.0 -> median 1.0 (not 90/100)
    assert row["per_round"] == "0.900 1.200 1.000"


def test_pipeline_cost_pairs_measures_of_one_process():
    rows = [{"round": 1, "model": "m", "backend": "torch", "measure": "compute", "images_per_sec": 200.0,
             "resolved_mode": "eager", "batch_size": 8},
            {"round": 1, "model": "m", "backend": "torch", "measure": "pipeline", "images_per_sec": 180.0}]
    [row] = pipeline_cost.summarise(pipeline_cost.ratios(rows))
    assert row["ratio"] == pytest.approx(0.9) and row["meets"] == "yes" and row["mode"] == "eager"


def test_mode_matrix_interleaves_frameworks_and_marks_the_winner():
    configs = mode_matrix.configurations(["torch", "tensorflow"], ["fp32"])
    assert [c[0] for c in configs[:6]] == ["torch", "tensorflow"] * 3
    assert len(configs) == len(mode_matrix.TORCH_CONFIGS) + len(mode_matrix.TF_MODES)
    chosen = mode_matrix.configurations(["torch"], ["fp32"], [("eager", "on"), ("compile", "on")])
    assert chosen == [("torch", "eager", "on", "fp32"), ("torch", "compile", "on", "fp32")]
    rows = [{"backend": "tensorflow", "model": "m", "precision": "fp32", "config": c, "batch_size": 8,
             "status": "ok", "images_per_sec": v, "compile_s": 1.0} for c, v in [("graph", 300.0), ("xla", 200.0)]]
    summary = mode_matrix.summarise(rows, {"tensorflow": {"config": "xla"}})
    assert [(r["config"], r["fastest"], r["fallback"]) for r in summary] == [
        ("graph", "fastest", ""), ("xla", "", "FALLBACK")]
    verdict = mode_matrix.verdicts(summary, {"tensorflow": {"config": "xla"}})[0]
    assert "differs from the fallback (xla, the fallback 33.3% slower)" in verdict


def test_mode_matrix_gives_keras_torch_modes_and_fit_over_custom_per_mode():
    configs = mode_matrix.configurations(["torch", "tensorflow", "keras-torch"], ["fp32"])
    assert [c[0] for c in configs[:3]] == ["torch", "tensorflow", "keras-torch"]
    assert [c[1] for c in configs if c[0] == "keras-torch"] == ["eager", "jit_compile"]
    measured = [("eager", "custom", 200.0), ("eager", "fit", 150.0), ("jit_compile", "custom", 300.0),
                ("jit_compile", "fit", 330.0)]
    rows = [{"backend": "keras-torch", "model": "m", "precision": "fp32", "style": style,
             "config": mode_matrix.label(mode, None, style), "batch_size": 8, "status": "ok",
             "images_per_sec": v, "compile_s": 1.0} for mode, style, v in measured]
    summary = mode_matrix.summarise(rows, {"keras-torch": {"config": "eager"}})
    got = {r["config"]: (r["fastest"], r["fit_over_custom"]) for r in summary}
    # fit is a style, not a mode: the fastest mode is chosen among custom steps, fit is a ratio beside it
    assert got == {"eager": ("", None), "eager fit": ("", pytest.approx(0.75)),
                   "jit_compile": ("fastest", None), "jit_compile fit": ("", pytest.approx(1.1))}
    lines = mode_matrix.verdicts(summary, {"keras-torch": {"config": "eager"}})
    assert "keras-torch m fp32 jit_compile fit: fit over custom 1.10" in lines


def test_roofline_uses_six_macs_per_trained_image():
    from common.architectures import arch_spec

    trainings = [{"model": "resnet20", "backend": "torch", "images_per_sec": 100.0}]
    [row] = roofline.achieved_table(trainings, {"library": "numpy", "gflops": 200.0})
    expected = 100.0 * 6 * arch_spec("resnet20").macs() / 1e9
    assert row["achieved_gflops"] == pytest.approx(expected)
    assert row["fraction_of_peak"] == pytest.approx(expected / 200.0)


def test_bare_vs_dualbench_quick_runs_both_backends(tmp_path):
    out = tmp_path / "bare.csv"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bare_vs_dualbench.py"), "--quick",
                           "--models", "seed_cnn", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "machine:" in done.stdout and "ratio" in done.stdout
    with open(out) as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["backend"] for r in rows) == ["tensorflow", "torch"]
    for row in rows:
        assert float(row["bare_img_s"]) > 0 and float(row["dualbench_img_s"]) > 0
        assert float(row["ratio"]) == pytest.approx(float(row["per_round"]), abs=1e-3)
    assert (tmp_path / "raw" / "bare.csv").exists()
    import json

    meta = json.loads((tmp_path / "bare.json").read_text())  # the exact command, for the README
    assert meta["command"].startswith(".venv/bin/python benchmarks/bare_vs_dualbench.py --quick --models seed_cnn")
    assert meta["finished_utc"].endswith("UTC")


def test_readme_results_replaces_only_the_marked_section(tmp_path):
    import json

    import readme_results

    results, bench = tmp_path / "run", tmp_path / "bench"
    results.mkdir()
    bench.mkdir()
    (results / "manifest.json").write_text(json.dumps({"created_utc": "2026-01-01T00:00:00Z", "cpu_model": "CPU X",
                                                       "usable_cores": 2, "command": "dualbench run --x",
                                                       "packages": {"torch": "9.9"}}))
    (results / "summary.csv").write_text("model,backend,test_acc_mean_pct,unlisted\nm,torch,45.5,1\n")
    (results / "head_to_head.csv").write_text("model,train_img_s_ratio,verdict\nm,1.1,within seed noise\n")
    (bench / "memory.csv").write_text("model,ratio,fastest\nm,1.01,\n")  # an empty cell stays empty
    (bench / "bench_table.csv").write_text("model,images_per_sec\nm,600\n")
    (bench / "bench_table.json").write_text(json.dumps({"command": ".venv/bin/python benchmarks/bench_table.py "
                                                        "--rounds 4", "finished_utc": "2026-01-02 03:04 UTC"}))
    readme = tmp_path / "README.md"
    readme.write_text(f"head\n{readme_results.BEGIN}\nold\n{readme_results.END}\ntail\n")
    argv = [str(results), "--bench-dir", str(bench), "--write", str(readme)]
    assert readme_results.main(argv) == 0
    text = readme.read_text()
    assert text.startswith("head\n") and text.endswith(f"{readme_results.END}\ntail\n") and "old" not in text
    assert "dualbench run --x" in text and "torch 9.9" in text and "45.5" in text and "unlisted" not in text
    assert text.index("bench_table.py") < text.index("memory.py")  # run_all's order, not alphabetical
    assert "(`.venv/bin/python benchmarks/bench_table.py --rounds 4`, 2026-01-02 03:04 UTC)" in text  # as run
    assert "(`.venv/bin/python benchmarks/memory.py`):" in text  # no sidecar: the default command
    assert "nan" not in text.lower()
    assert readme_results.main(argv) == 0 and readme.read_text() == text  # idempotent
    assert "Deployment" not in text  # no `dualbench export` ran in that folder
    (results / "export").mkdir()
    (results / "export" / "deployment.json").write_text(json.dumps({"command": "dualbench export run",
                                                                      "created_utc": "2026-01-03 00:00 UTC"}))
    (results / "export" / "deployment.csv").write_text(
        "model,backend,format,status,max_rel_diff,latency_p50_ms,label\nm,torch,onnx,ok,1e-07,0.5,x\n"
        "m,torch,torch_export,failed,n/a,n/a,x\n")
    assert readme_results.main(argv) == 0
    text = readme.read_text()
    assert "(`dualbench export run`, 2026-01-03 00:00 UTC)" in text and "torch_export | failed" in text
    assert text.count("| onnx ") == 2 and "label" not in text and "nan" not in text.lower()  # served: once more
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        readme_results.main(argv)


def test_readme_results_shows_time_to_accuracy_and_retrieval_between_named_markers(tmp_path):
    import json

    import readme_results

    results = tmp_path / "run"
    results.mkdir()
    (results / "manifest.json").write_text(json.dumps({"command": "dualbench run --target-accuracy 0.85"}))
    (results / "summary.csv").write_text("model,backend,test_acc_mean_pct\nm,torch,86.0\n")
    (results / "head_to_head.csv").write_text("model,verdict\nm,within seed noise\n")
    (results / "time_to_accuracy.csv").write_text(
        "model,backend,seed,status,target_acc_pct,reached,tta_s,tta_step,tta_epoch,best_acc_pct,evaluations,"
        "eval_every_steps,eval_s_total\n"
        "m,torch,0,ok,85,True,12.5,300,2,86,2,,3.0\nm,torch,1,ok,85,False,inf,,,84,2,,3.0\n")
    (results / "retrieval.csv").write_text("model,backend,seed,status,recall@1,map@r,weights_sha256\n"
                                           "m,torch,0,ok,0.81,0.55,abc\n")
    (results / "retrieval_agreement.csv").write_text("model,seed,weights_of,embedded_by,max_rel_diff,rtol,agrees\n"
                                                     "m,0,torch,tensorflow,3e-07,0.0001,True\n")
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- fmnist:begin -->\nold\n<!-- fmnist:end -->\nb\n")
    assert readme_results.main([str(results), "--write", str(readme), "--marker", "fmnist"]) == 0
    text = readme.read_text()
    assert text.startswith("a\n<!-- fmnist:begin -->\n") and text.endswith("<!-- fmnist:end -->\nb\n")
    assert "seed 0: 12.5 s, seed 1: not reached" in text and "1/2" in text
    assert "0.81" in text and "abc" not in text and "3e-07" in text


def test_the_readme_has_the_results_markers():
    import readme_results

    text = (ROOT / "README.md").read_text()
    assert text.count(readme_results.BEGIN) == 1 and text.count(readme_results.END) == 1


def test_a_dualbench_command_started_by_a_benchmark_keeps_the_users_onednn_setting(monkeypatch):
    """An emulated AVX2 CPU sets TF_ENABLE_ONEDNN_OPTS=0 (TensorFlow's default there): the benchmark's
    `dualbench` process must see it, not the fallback configuration's 1 (else the search never meets
    TensorFlow's default-off state and the emulation measures the wrong machine)."""
    seen = {}
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "123")
    monkeypatch.setattr(_common.subprocess, "run", lambda argv, **kwargs: seen.update(kwargs["env"]))
    _common.dualbench_cli(["tune"], "dualbench tune")
    assert seen["TF_ENABLE_ONEDNN_OPTS"] == "0" and seen["MALLOC_TRIM_THRESHOLD_"] == "123"
    assert str(_common.ROOT) in seen["PYTHONPATH"].split(os.pathsep)


def test_best_bare_ratio_compares_the_run_ratio_with_the_ratio_of_each_frameworks_best_bare_loop():
    configs = best_bare_ratio.bare_configs("tensorflow", None)
    assert len(configs) == 3 * 2 * 2 and len({c.label() for c in configs}) == 12
    assert {c.mode for c in best_bare_ratio.bare_configs("torch", ["mode"])} == {"eager", "compile"}
    rows = [{"round": 1, "side": "run", "model": "m", "ratio": 0.9, "tensorflow_onednn": True}]
    for backend, config, speed in [("torch", "a", 100.0), ("torch", "b", 200.0), ("tensorflow", "c", 150.0),
                                   ("tensorflow", "d", 190.0)]:
        rows.append({"round": 1, "side": "bare", "model": "m", "backend": backend, "config": config,
                     "images_per_sec": speed})
    [row] = best_bare_ratio.summarise(rows)
    assert row["bare_best_ratio"] == pytest.approx(190 / 200)  # best vs best, not the first configs
    assert (row["best_bare_torch"], row["best_bare_tensorflow"]) == ("b", "d")
    assert row["agreement"] == pytest.approx(0.9 / 0.95) and row["meets"] == "yes"
    rows[0]["ratio"] = 0.8
    assert best_bare_ratio.summarise(rows)[0]["meets"] == "no"  # 0.8 / 0.95 is 16% off


def test_best_bare_ratio_picks_each_side_by_its_median_over_rounds_not_one_lucky_process():
    # torch "a" is fastest in round 1 only (one lucky process: 300); "b" is faster by its median
    speeds = {("torch", "a"): [300.0, 200.0], ("torch", "b"): [260.0, 260.0], ("tensorflow", "c"): [208.0, 208.0]}
    rows = [{"round": 1, "side": "run", "model": "m", "ratio": 0.8}]
    rows += [{"round": k + 1, "side": "bare", "model": "m", "backend": backend, "config": config,
              "images_per_sec": value} for (backend, config), values in speeds.items() for k, value in enumerate(values)]
    [row] = best_bare_ratio.summarise(rows)
    assert row["best_bare_torch"] == "b" and row["bare_best_ratio"] == pytest.approx(0.8)  # not mean(208/300, 0.8)


def test_best_bare_ratio_sends_the_sweeps_fastest_and_a_close_runner_up_to_the_alternation():
    configs = {("m", "torch"): best_bare_ratio.bare_configs("torch", ["mode"]),
               ("m", "tensorflow"): best_bare_ratio.bare_configs("tensorflow", ["mode"])}
    labels = {(b, c.mode): c.label() for (_, b), cs in configs.items() for c in cs}
    speeds = {("torch", "eager"): 100.0, ("torch", "compile"): 95.0,  # within 10%: both go on
              ("tensorflow", "graph"): 200.0, ("tensorflow", "xla"): 170.0, ("tensorflow", "eager"): 199.0}
    rows = [{"round": 1, "side": "sweep", "model": "m", "backend": b, "config": labels[(b, mode)],
             "step_median_images_per_sec": v, "images_per_sec": 1.0} for (b, mode), v in speeds.items()]
    chosen = best_bare_ratio.finalists(rows, configs)
    assert [c.mode for c in chosen[("m", "torch")]] == ["eager", "compile"]
    # at most two, fastest first; xla (15% behind) is dropped; the step-median figure is what counts
    assert [c.mode for c in chosen[("m", "tensorflow")]] == ["graph", "eager"]
    rows[0]["step_median_images_per_sec"] = 80.0  # torch eager now 16% behind compile
    assert [c.mode for c in best_bare_ratio.finalists(rows, configs)[("m", "torch")]] == ["compile"]


def test_best_bare_ratio_reads_the_bare_loop_as_the_run_is_read_and_ignores_the_sweep():
    rows = [{"round": k, "side": "run", "model": "m", "ratio": 1.0} for k in (1, 2)]
    for k, (t, f) in enumerate([(100.0, 110.0), (100.0, 90.0)], start=1):
        rows += [{"round": k, "side": "bare", "model": "m", "backend": "torch", "config": "a",
                  "step_median_images_per_sec": t, "images_per_sec": 50.0},
                 {"round": k, "side": "bare", "model": "m", "backend": "tensorflow", "config": "c",
                  "step_median_images_per_sec": f, "images_per_sec": 500.0}]
    rows.append({"round": 1, "side": "sweep", "model": "m", "backend": "torch", "config": "z",
                 "step_median_images_per_sec": 1000.0})  # the sweep chooses finalists, it is not the figure
    [row] = best_bare_ratio.summarise(rows)
    assert row["best_bare_torch"] == "a" and row["bare_best_ratio"] == pytest.approx(1.0)  # not 500/50
    assert row["agreement_per_round"] == "0.909 1.111"


def test_best_bare_ratio_also_times_the_runs_own_configuration_bare_and_compares_like_with_like():
    from common.execution import ExecutionConfig

    eager, compiled = ExecutionConfig("eager", channels_last=True), ExecutionConfig("compile", channels_last=True)
    graph = ExecutionConfig("graph", onednn=True, malloc_tuning=False)
    records = [{"model": "m", "backend": "torch", "config": eager.to_dict()},
               {"model": "m", "backend": "tensorflow", "config": graph.replace(data_threads=1).to_dict()}]
    choices = best_bare_ratio.run_choices(records)
    assert choices[("m", "tensorflow")] == graph  # a bare loop has no tf.data pool: the same bare configuration
    final = best_bare_ratio.with_run_choices({("m", "torch"): [compiled], ("m", "tensorflow"): [graph]}, choices)
    assert final[("m", "torch")] == [compiled, eager] and final[("m", "tensorflow")] == [graph]  # no duplicate
    # the best bare torch loop is compile (300); the run chose eager, which runs 250 bare
    rows = [{"round": 1, "side": "run", "model": "m", "ratio": 1.2}]
    for backend, config, value in [("torch", compiled, 300.0), ("torch", eager, 250.0), ("tensorflow", graph, 300.0)]:
        rows.append({"round": 1, "side": "bare", "model": "m", "backend": backend, "config": config.label(),
                     "step_median_images_per_sec": value})
    [row] = best_bare_ratio.summarise(rows, {key: c.label() for key, c in choices.items()})
    assert row["agreement"] == pytest.approx(1.2) and row["meets"] == "no"  # the verdict: the best bare loops
    assert row["agreement_same_config"] == pytest.approx(1.0)  # like for like: the choice, not the run, is off
    assert row["bare_same_config_torch_img_s"] == 250.0 and row["run_config_torch"] == eager.label()
    assert best_bare_ratio.summarise(rows)[0]["agreement_same_config"] is None  # no choices known (--quick)


def test_results_keep_the_command_and_the_sittings_record_beside_the_summary(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(sys, "argv", [str(ROOT / "benchmarks" / "best_bare_ratio.py"), "--models", "m"])
    out = tmp_path / "x.csv"
    _common.write_results(out, [{"a": 1}], [{"b": 2}], {"tune_records": [{"model": "m"}]})
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["command"] == ".venv/bin/python benchmarks/best_bare_ratio.py --models m"
    assert meta["tune_records"] == [{"model": "m"}]
    assert (tmp_path / "raw" / "x.csv").read_text().splitlines() == ["b", "2"]


def test_machine_noise_compares_neighbouring_windows_of_the_same_work():
    # 1-s slices: a slow minute-scale swing (100, 100, 80, 80, 100, 100) under per-second jitter
    per_second = [100.0, 100.0, 80.0, 80.0, 100.0, 100.0]
    one, two = machine_noise.summarise(per_second, (1, 2))
    assert one["windows"] == 6 and one["ratio_p50"] == pytest.approx(0.0)  # 3 of 5 neighbours equal
    assert one["ratio_p90"] == pytest.approx(0.25)  # 80 -> 100
    assert two["windows"] == 3 and two["slowest_over_fastest"] == pytest.approx(0.8)
    assert two["ratio_p50"] == pytest.approx(0.225)  # |80/100 - 1| = 0.2, |100/80 - 1| = 0.25
    assert machine_noise.summarise([1.0] * 10, (1, 5, 30))[-1]["window_s"] == 5  # a window with <2 is dropped
    assert machine_noise.summarise([1.0] * 10, (1,))[0]["cv"] == 0.0


def test_compile_region_pools_every_timed_step_of_a_region_and_counts_rounds_won():
    """Images/s from the median of all timed steps (not of per-round figures); round by round, who won."""
    steps = {"model": [[0.1, 0.1, 0.3], [0.1, 0.2, 0.2]], "model+loss+argmax": [[0.2, 0.2, 0.2], [0.1, 0.1, 0.1]]}
    rows = [{"model": "m", "round": k + 1, "region": region, "batch_size": 10, "step_times_s": times,
             "images_per_sec": 10 / sorted(times)[1]} for region, blocks in steps.items() for k, times in enumerate(blocks)]
    [row] = compile_region.summarise(rows)
    assert row["model_img_s"] == pytest.approx(10 / 0.15) and row["whole_img_s"] == pytest.approx(10 / 0.15)
    assert row["model_over_whole"] == pytest.approx(1.0) and row["rounds_model_faster"] == "1/2"


def test_threads_varies_one_pool_at_a_time_and_interleaves_the_frameworks():
    configs = threads.configurations(["torch", "tensorflow"])
    assert [c[0] for c in configs[:6]] == ["torch", "tensorflow"] * 3
    tf = [c for c in configs if c[0] == "tensorflow"]
    assert [c[2].inter_op_threads for c in tf[:3]] == [1, 2, None]
    assert [c[2].data_threads for c in tf[3:]] == [None, 1]
    rows = [{"backend": "torch", "model": "m", "config": label, "images_per_sec": v, "os_threads": 9}
            for label, v in [("inter-op default", 100.0), ("inter-op 1", 110.0)]]
    summary = threads.summarise(rows)
    assert [r["vs_default_inter_op"] for r in summary] == [1.0, pytest.approx(1.1)]


def _fake_env():
    import os

    from tests.runner_helpers import FAKES

    return {**os.environ, "DUALBENCH_EXTRA_BACKENDS": FAKES, "PYTHONPATH": str(ROOT),
            "DUALBENCH_FAKE_TUNE": "mode=compile:x3;mode=xla:x6:wrong"}


@pytest.mark.parametrize("script, extra", [("tune_check", ["--dims", "mode"]), ("threads", [])])
def test_search_benchmarks_quick_run_on_the_fake_backend(tmp_path, script, extra):
    out = tmp_path / f"{script}.csv"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--quick", "--backends",
                           "fakea", "--models", "seed_cnn", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=600, env=_fake_env())
    assert done.returncode == 0, done.stderr[-2000:]
    with open(out) as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(r["backend"] == "fakea" for r in rows)
    if script == "tune_check":
        [row] = rows
        assert row["search_choice"].startswith("compile") and row["exhaustive_best"].startswith("compile")
        assert int(row["excluded"]) >= 1 and row["meets"] == "yes"  # xla: faster, but wrong


def test_tune_budget_checks_each_round_against_the_limit_and_the_choices_across_rounds():
    import tune_budget

    def row(round_index, model, choice, elapsed, command_s):
        return {"round": round_index, "status": "ok", "model": model, "backend": "torch", "choice": choice,
                "elapsed_s": elapsed, "complete": True, "command_s": command_s}

    rows = [row(1, "seed_cnn", "eager", 100.0, 260.0), row(1, "resnet20", "eager", 120.0, 260.0),
            row(2, "seed_cnn", "eager", 130.0, 310.0), row(2, "resnet20", "compile", 150.0, 310.0),
            {"round": 2, "kind": "candidate", "status": "excluded", "model": "resnet20", "backend": "torch",
             "candidate": "xla"}]  # a search table's row: not a search, not a choice
    summary = {r["what"]: r for r in tune_budget.summarise(rows, limit_s=300.0)}
    assert summary["round 1"]["within"] == "yes" and summary["round 1"]["searches_s"] == 220.0
    assert summary["round 2"]["within"] == "no"  # the command's 310 s, not the searches' 280 s
    assert summary["seed_cnn / torch"]["same_every_round"] == "yes"
    assert summary["resnet20 / torch"]["same_every_round"] == "no"
    assert summary["resnet20 / torch"]["choices"] == "eager | compile"


def test_tune_budget_quick_run_on_the_fake_backend(tmp_path):
    out = tmp_path / "tune_budget.csv"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tune_budget.py"), "--quick", "--backends",
                           "fakea", "--models", "seed_cnn", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=_fake_env())
    assert done.returncode == 0, done.stderr[-2000:]
    with open(out) as handle:
        summary = {r["what"]: r for r in csv.DictReader(handle)}
    assert summary["round 1"]["within"] == "yes"
    assert summary["seed_cnn / fakea"]["choices"].startswith("compile")  # xla: faster, but wrong


def test_parity_margins_rows_put_each_worst_value_beside_its_limit():
    import parity_margins

    from compare.parity import DEFAULT_RTOL
    from compare.step_parity import STEP_TOLERANCE

    found = {"forward": [{"model": "resnet20", "max_rel_diff": DEFAULT_RTOL / 4, "passed": True}],
             "training": [{"case": "mobilenet_v2_8px_adamw", "update_rule_rel": 0.0, "loss_rel": 2e-6,
                           "bn_rel": 2 * STEP_TOLERANCE["bn_rel"], "grad_rel": 0.05}]}
    rows = {(r["subject"], r["criterion"]): r for r in parity_margins.summarise("avx2", found)}
    assert rows[("resnet20", "max_rel_diff")]["margin"] == pytest.approx(4.0)
    assert rows[("mobilenet_v2_8px_adamw", "grad_rel")]["limit"] == 1e-1  # the case's own gradient bound
    assert rows[("mobilenet_v2_8px_adamw", "grad_rel")]["passed"]
    assert not rows[("mobilenet_v2_8px_adamw", "bn_rel")]["passed"]
    assert rows[("mobilenet_v2_8px_adamw", "update_rule_rel")]["margin"] is None  # 0 measured: no ratio
    assert {r["config"] for r in rows.values()} == {"avx2"}
