"""`dualbench run` as a user sees it: validation, the fairness audit gate, Ctrl-C, a framework-free parent."""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from common.errors import ConfigError
from compare import options
from compare.command_line import command_for
from tests.runner_helpers import (PROJECT_ROOT, SMALL, fake_env, fake_run, launch_pids,  # noqa: F401
                                  launches, rows, run_cli)


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("dualbench: error:")
    return err[0]


@pytest.mark.parametrize("extra, expected", [
    (["--models", "nope"], "unknown model 'nope'"),
    (["--models", "seed_cnn", "--epochs", "0"], "fix --epochs"),
    (["--models", "seed_cnn", "--batch-size", "-1"], "fix --batch-size"),
    (["--models", "seed_cnn", "--lr", "0"], "fix --lr"),
    (["--models", "seed_cnn", "--seeds", "0,x"], "--seeds"),
    (["--models", "seed_cnn", "--timeout", "0"], "--timeout"),
    (["--models", "seed_cnn", "--backends", "torch,caffe"], "unknown backend 'caffe'"),
    (["--models", "seed_cnn", "--backends", "torch,tensorflow", "--mode", "compile"], "does not exist for tensorflow"),
    (["--models", "seed_cnn", "--backends", "torch,tensorflow", "--mode", "torch=xla"], "unknown mode 'xla'"),
    (["--models", "seed_cnn", "--data", "folder:/nonexistent"], "/nonexistent"),
    (["--models", "seed_cnn", "--data", "synthetic:64,32", "--batch-size", "128"], "lower --batch-size"),
    (["--models", "seed_cnn", "--data", "synthetic:64,32", "--train-subset", "1000"], "--train-subset"),
    (["--models", "seed_cnn", "--precision", "fp8"], "invalid choice"),
    (["--models", "seed_cnn", "--bn-epsilon", "0"], "bn_epsilon must be a positive number, got 0.0 (fix --bn-epsilon)"),
    (["--models", "seed_cnn", "--adam-betas", "0.9"], "argument --adam-betas: expected two numbers"),
])
def test_bad_input_exits_2_with_one_line_and_no_worker(fake_env, tmp_path, capsys, extra, expected):
    code = run_cli("run", *extra, "--out", str(tmp_path / "out"))
    assert code == 2
    assert expected in _one_error_line(capsys)
    assert launches(fake_env) == [] and not (tmp_path / "out" / "runs.jsonl").exists()


def test_unwritable_out_exits_2(fake_env, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert run_cli("run", "--models", "seed_cnn", "--backends", "fakea", *SMALL, "--out", str(blocker / "out")) == 2
    assert "choose a writable folder" in _one_error_line(capsys)
    assert run_cli("run", "--models", "seed_cnn", "--backends", "fakea", *SMALL, "--out", str(blocker)) == 2
    assert "is a file" in _one_error_line(capsys)
    assert launches(fake_env) == []


def test_strict_refuses_an_asymmetry_before_training(fake_env, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DUALBENCH_FAKE_FAULT", "fakeb:asym")
    out = tmp_path / "out"
    assert fake_run(out, "--strict") == 2
    line = _one_error_line(capsys)
    assert "bn_epsilon" in line and "fakea=1e-05" in line and "fakeb=0.001" in line
    assert launches(fake_env, "train") == [] and len(launches(fake_env, "audit")) == 2
    audit = json.loads((out / "audit.json").read_text())["models"]["seed_cnn"]
    assert audit["asymmetries"] == ["bn_epsilon"]
    assert "bn_epsilon" in (out / "audit.csv").read_text()


def test_strict_refuses_when_an_audit_worker_fails(fake_env, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DUALBENCH_FAKE_FAULT", "fakeb:audit_segfault")
    assert fake_run(tmp_path / "out", "--strict") == 2
    assert "could not run for seed_cnn on fakeb (exit -11, SIGSEGV" in _one_error_line(capsys)
    assert launches(fake_env, "train") == []


def test_without_strict_an_asymmetry_is_reported_and_highlighted(fake_env, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DUALBENCH_FAKE_FAULT", "fakeb:asym")
    out = tmp_path / "out"
    assert fake_run(out) == 0
    printed = capsys.readouterr().out
    assert "ASYMMETRY" in printed
    report = (out / "report.md").read_text()
    assert re.search(r"\*\*seed_cnn\*\*\s*\|\s*\*\*bn_epsilon\*\*", report) and "asymmetries in bn_epsilon" in report
    assert '<tr class="asym">' in (out / "report.html").read_text()
    assert rows(out)["seed_cnn__fakeb__seed0"]["settings"]["bn_epsilon"] == 0.001


@pytest.mark.parametrize("key", ["decayed_param_digest", "adam_beta1", "adam_beta2", "label_smoothing", "dropout",
                                 "eval_batch_size", "decay_bn_and_bias", "input_normalization", "trainable_params"])
def test_strict_refuses_an_asymmetry_in_each_new_audit_row(fake_env, tmp_path, capsys, monkeypatch, key):
    monkeypatch.setenv("DUALBENCH_FAKE_FAULT", f"fakeb:wrong={key}")
    out = tmp_path / "out"
    assert fake_run(out, "--strict") == 2
    assert f"seed_cnn: {key} (" in _one_error_line(capsys) and launches(fake_env, "train") == []
    assert json.loads((out / "audit.json").read_text())["models"]["seed_cnn"]["asymmetries"] == [key]


def test_the_audit_prints_one_summary_line_unless_asymmetric_or_verbose(fake_env, tmp_path, capsys):
    out = tmp_path / "out"
    assert fake_run(out) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("Fairness audit")]
    assert len(lines) == 1 and "must-match settings compared" in lines[0] and "0 asymmetries found" in lines[0]
    assert str(out / "audit.csv") in lines[0] and "bn_epsilon" not in printed  # no table
    audit = json.loads((out / "audit.json").read_text())["models"]["seed_cnn"]
    assert audit["details"]["fakea"]["decayed_param_names"] == ["fake.bias", "fake.kernel"]
    assert {"adam_beta1", "adam_beta2", "decayed_param_digest"} <= {row["setting"] for row in audit["rows"]}
    assert "bn_epsilon" in (out / "audit.csv").read_text()  # the full table is in the file
    assert fake_run(tmp_path / "verbose", "--verbose") == 0
    assert "bn_epsilon" in capsys.readouterr().out  # --verbose: the table too


def test_a_backend_fallback_is_printed_and_kept_in_the_audit_and_the_manifest(fake_env, tmp_path, capsys,
                                                                              monkeypatch):
    monkeypatch.setenv("DUALBENCH_FAKE_FAULT", "fakeb:fallback")
    out = tmp_path / "out"
    assert fake_run(out) == 0
    assert "note: seed_cnn on fakeb could not apply everything as asked: fake backend: simulated fallback" in \
        capsys.readouterr().out
    assert rows(out)["seed_cnn__fakeb__seed0"]["manifest"]["fallbacks"] == ["fake backend: simulated fallback"]
    assert rows(out)["seed_cnn__fakea__seed0"]["manifest"]["fallbacks"] == []
    fallbacks = next(r for r in json.loads((out / "audit.json").read_text())["models"]["seed_cnn"]["rows"]
                     if r["setting"] == "fallbacks")
    assert fallbacks["fakeb"] == "fake backend: simulated fallback" and fallbacks["fakea"] == "none"


def test_the_manifest_names_the_commit_the_command_started_from(fake_env, tmp_path, monkeypatch):
    """The search before the manifest is written can take minutes: a commit made meanwhile must not be
    recorded as the code that started; it is recorded beside it."""
    import common.manifest

    commits = iter(["started", "committed-meanwhile"] + ["later"] * 10)
    monkeypatch.setattr(common.manifest, "git_commit", lambda: next(commits))
    out = tmp_path / "out"
    assert fake_run(out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["git_commit"], manifest["git_commit_at_manifest"]) == ("started", "committed-meanwhile")


def test_run_prints_progress_tables_and_paths(fake_env, tmp_path, capsys):
    out = tmp_path / "out"
    assert fake_run(out, "--mode", "eager") == 0
    printed = capsys.readouterr().out
    assert "seed_cnn__fakea__seed0: epoch 2/2" in printed  # plain lines when not a TTY
    assert "Fairness audit" in printed and "Head to head" in printed and "within seed noise" not in printed
    assert "one seed: no noise estimate" in printed
    assert str(out / "report.html") in printed and str(out / "summary.parquet") in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"].startswith("dualbench run --models seed_cnn --backends fakea,fakeb --seeds 0")
    assert "--mode eager" in manifest["command"] and manifest["data_fingerprint"]
    spec = rows(out)["seed_cnn__fakeb__seed0"]["spec"]
    assert spec["mode"] == "eager" and spec["recipe"]["batch_size"] == 32 and spec["warmup_steps"] == 1


def test_options_map_onto_runspec_and_recipe():
    parser = argparse.ArgumentParser()
    options.add_selection_options(parser)
    options.add_recipe_options(parser)
    options.add_spec_options(parser)
    args = parser.parse_args(["--models", "resnet20", "--optimizer", "adamw", "--wd-mode", "decoupled",
                              "--no-nesterov", "--label-smoothing", "0.1", "--init", "he_normal_fan_out",
                              "--schedule", "onecycle", "--warmup-epochs", "1", "--channels-last", "off",
                              "--threads", "2", "--deterministic", "--allow-tf32", "--max-steps-per-epoch", "7",
                              "--mode", "torch=compile,tensorflow=xla", "--precision", "bf16"])
    recipe = options.build_recipe(args)
    assert (recipe.optimizer, recipe.weight_decay_mode, recipe.nesterov) == ("adamw", "decoupled", False)
    assert (recipe.label_smoothing, recipe.init_scheme, recipe.schedule) == (0.1, "he_normal_fan_out", "onecycle")
    assert recipe.epochs == 10 and recipe.lr == 0.05  # not given: the Recipe defaults
    modes = options.parse_modes(args.mode, ["torch", "tensorflow"])
    assert modes == {"torch": "compile", "tensorflow": "xla"}
    spec = options.make_spec("resnet20", "tensorflow", 3, modes["tensorflow"], recipe, options.spec_kwargs(args))
    assert (spec.channels_last, spec.threads, spec.deterministic, spec.allow_tf32) == (False, 2, True, True)
    assert (spec.max_steps_per_epoch, spec.precision, spec.mode, spec.seed) == (7, "bf16", "xla", 3)
    command = command_for([spec.to_dict()])
    for flag in ("--optimizer adamw", "--no-nesterov", "--channels-last off", "--deterministic", "--threads 2"):
        assert flag in command
    with pytest.raises(ConfigError, match="not in --backends"):
        options.parse_modes("caffe=fast", ["torch"])


def test_parent_process_never_imports_a_framework(fake_env, tmp_path):
    out = tmp_path / "out"
    code = ("import sys; from compare.cli import main\n"
            f"rc = main(['run', '--models', 'seed_cnn', '--backends', 'fakea,fakeb', *{SMALL!r}, '--out', {str(out)!r}])\n"
            f"rc2 = main(['report', {str(out)!r}])\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorflow', 'keras', 'jax'))\n"
            "print('LOADED', loaded, rc, rc2)")
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert "LOADED [] 0 0" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_ctrl_c_stops_the_worker_keeps_finished_runs_and_reports(fake_env, tmp_path, stop):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "DUALBENCH_FAKE_FAULT": "fakeb:hang@2"}
    argv = [sys.executable, "-m", "compare", "run", "--models", "seed_cnn", "--backends", "fakea,fakeb", *SMALL,
            "--out", str(out)]
    # SIGINT back to its default in the child: a suite started in the background by a non-interactive
    # shell (`cmd &`) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen(argv, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while "seed_cnn__fakeb__seed0" not in launches(fake_env, "train"):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        time.sleep(1.0)  # let the hung worker reach its step
        proc.send_signal(stop)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # never leave it running (or unreaped) for the tests that follow
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
    found = rows(out)
    assert found["seed_cnn__fakea__seed0"]["status"] == "ok"
    assert found.get("seed_cnn__fakeb__seed0", {"status": "interrupted"})["status"] == "interrupted"
    assert (out / "report.md").exists() and (out / "summary.csv").exists()
    for pid in launch_pids(fake_env):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not list(out.glob(".work-*")) and not list(out.glob(".*.tmp"))
