"""The runner: ABBA order, worker subprocess handling, failures, resume, atomic result writes."""
from __future__ import annotations

import os
import sys
import time

import pytest

from common.config import RunSpec
from compare.process import ProcessOutcome, run_process
from compare.runner import plan_runs, result_from_outcome
from tests.runner_helpers import fake_env, fake_run, launch_pids, launches, rows  # noqa: F401

PY = sys.executable


def test_plan_alternates_backends_abba():
    plan = plan_runs(["seed_cnn", "resnet20"], ["torch", "tensorflow"], [0, 1, 2])
    assert plan[:6] == [("seed_cnn", 0, "torch"), ("seed_cnn", 0, "tensorflow"),
                        ("seed_cnn", 1, "tensorflow"), ("seed_cnn", 1, "torch"),
                        ("seed_cnn", 2, "torch"), ("seed_cnn", 2, "tensorflow")]
    assert len(plan) == 12 and [m for m, _, _ in plan[6:]] == ["resnet20"] * 6
    assert [b for _, _, b in plan[6:8]] == ["tensorflow", "torch"]  # the alternation runs across models
    firsts = [b for _, _, b in plan[::2]]
    assert firsts.count("torch") == firsts.count("tensorflow") == 3  # each backend goes first equally often
    assert sorted(plan) == sorted((m, s, b) for m in ("seed_cnn", "resnet20") for s in (0, 1, 2)
                                  for b in ("torch", "tensorflow"))


def test_cli_runs_in_abba_order(fake_env, tmp_path):
    assert fake_run(tmp_path / "out", seeds="0,1") == 0
    assert launches(fake_env, "train") == ["seed_cnn__fakea__seed0", "seed_cnn__fakeb__seed0",
                                           "seed_cnn__fakeb__seed1", "seed_cnn__fakea__seed1"]
    assert launches(fake_env, "audit") == ["seed_cnn__fakea__seed0", "seed_cnn__fakeb__seed0"]


def test_run_process_events_rss_and_exit_code(tmp_path):
    code = ("import sys; x = bytearray(60_000_000); print('DUALBENCH_EVENT {\"event\": \"epoch\", \"epoch\": 1}');"
            " print('plain line'); print('to stderr', file=sys.stderr); sys.exit(3)")
    seen = []
    outcome = run_process([PY, "-c", code], log_path=tmp_path / "log.txt", on_event=seen.append)
    assert outcome.returncode == 3 and outcome.signal_name is None
    assert seen == [{"event": "epoch", "epoch": 1}] and outcome.events == seen
    assert outcome.stdout_tail == ["plain line"]
    assert (tmp_path / "log.txt").read_text().strip() == "to stderr"
    assert outcome.host_peak_rss_bytes > 60_000_000  # ru_maxrss KiB -> bytes, from os.wait4


def test_timeout_kills_the_whole_process_group(tmp_path):
    # the worker forks a grandchild that holds stdout open: the parent must not wait for it
    code = "import subprocess, time; subprocess.Popen(['sleep', '60']); print('started', flush=True); time.sleep(60)"
    started = time.monotonic()
    outcome = run_process([PY, "-c", code], log_path=tmp_path / "log.txt", timeout_s=1.5)
    assert time.monotonic() - started < 15
    assert outcome.timed_out and outcome.returncode == -9 and outcome.signal_name == "SIGKILL"
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)  # nothing left to reap: no zombie, no double wait


def _spec():
    return RunSpec(model="seed_cnn", backend="fakea", seed=1)


def test_result_from_outcome_statuses(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("\n".join(f"line {i}" for i in range(100)))
    crashed = result_from_outcome(_spec(), ProcessOutcome(returncode=-11, signal_name="SIGSEGV",
                                                          host_peak_rss_bytes=5), None, log, None)
    assert crashed.status == "crashed" and crashed.exit_code == -11 and "SIGSEGV" in crashed.error
    assert crashed.stderr_tail.splitlines() == [f"line {i}" for i in range(70, 100)]
    killed = result_from_outcome(_spec(), ProcessOutcome(returncode=-9, signal_name="SIGKILL"), None, log, None)
    assert killed.status == "crashed" and "out-of-memory" in killed.error
    oom_raw = {"run_id": "seed_cnn__fakea__seed1", "model": "seed_cnn", "backend": "fakea", "seed": 1,
               "status": "oom", "error": "MemoryError: boom\nsecond line"}
    oom = result_from_outcome(_spec(), ProcessOutcome(returncode=-9, signal_name="SIGKILL"), oom_raw, log, None)
    assert oom.status == "oom" and oom.error == "MemoryError: boom"  # the worker's own verdict is kept
    silent = result_from_outcome(_spec(), ProcessOutcome(returncode=1), None, log, None)
    assert silent.status == "crashed" and "code 1" in silent.error and silent.spec["seed"] == 1
    timeout = result_from_outcome(_spec(), ProcessOutcome(returncode=-9, timed_out=True), None, log, 7)
    assert timeout.status == "timeout" and "7 s" in timeout.error


def test_segfault_is_recorded_and_other_runs_survive(fake_env, tmp_path, monkeypatch):
    monkeypatch.setenv("DUALBENCH_FAKE_FAULT", "fakeb/seed1:segfault@2")
    out = tmp_path / "out"
    assert fake_run(out, seeds="0,1") == 1  # some run failed
    found = rows(out)
    assert len(found) == 4
    crashed = found["seed_cnn__fakeb__seed1"]
    assert crashed["status"] == "crashed" and crashed["exit_code"] == -11
    assert "SIGSEGV" in crashed["error"] and "segmentation fault" in crashed["stderr_tail"]
    assert crashed["host_peak_rss_bytes"] > 10 * 2 ** 20
    assert all(found[r]["status"] == "ok" for r in found if r != "seed_cnn__fakeb__seed1")
    assert (out / "failures.csv").exists() and (out / "report.md").exists()


def test_hanging_worker_is_killed_at_timeout(fake_env, tmp_path, monkeypatch):
    monkeypatch.setenv("DUALBENCH_FAKE_FAULT", "fakeb:hang@3")
    out = tmp_path / "out"
    started = time.monotonic()
    assert fake_run(out, "--timeout", "6") == 1
    assert time.monotonic() - started < 40
    found = rows(out)
    assert found["seed_cnn__fakeb__seed0"]["status"] == "timeout"
    assert "--timeout" in found["seed_cnn__fakeb__seed0"]["error"]
    assert "simulating a hang" in found["seed_cnn__fakeb__seed0"]["stderr_tail"]
    assert found["seed_cnn__fakea__seed0"]["status"] == "ok"
    for pid in launch_pids(fake_env):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the hung worker is gone, not orphaned


def test_divergence_is_recorded_with_its_step(fake_env, tmp_path, monkeypatch):
    monkeypatch.setenv("DUALBENCH_FAKE_FAULT", "fakea:diverge@3")
    out = tmp_path / "out"
    assert fake_run(out) == 1
    diverged = rows(out)["seed_cnn__fakea__seed0"]
    assert diverged["status"] == "diverged" and diverged["diverged_step"] == 3
    assert "step 3" in diverged["error"] and diverged["exit_code"] == 0


def test_worker_error_and_oom_statuses(fake_env, tmp_path, monkeypatch):
    monkeypatch.setenv("DUALBENCH_FAKE_FAULT", "fakea:error@2;fakeb:oom@2")
    out = tmp_path / "out"
    assert fake_run(out) == 1
    found = rows(out)
    assert found["seed_cnn__fakea__seed0"]["status"] == "error" and found["seed_cnn__fakea__seed0"]["exit_code"] == 1
    assert "RuntimeError" in found["seed_cnn__fakea__seed0"]["error"]
    assert "Traceback" in found["seed_cnn__fakea__seed0"]["stderr_tail"]
    assert found["seed_cnn__fakeb__seed0"]["status"] == "oom"


def test_resume_skips_ok_runs_reruns_failed_and_force_reruns_all(fake_env, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("DUALBENCH_FAKE_FAULT", "fakeb:error@1")
    assert fake_run(out) == 1
    assert len(launches(fake_env, "train")) == 2
    monkeypatch.delenv("DUALBENCH_FAKE_FAULT")
    fake_env.unlink()
    assert fake_run(out) == 0  # only the failed run is redone
    assert launches(fake_env, "train") == ["seed_cnn__fakeb__seed0"]
    assert {r["status"] for r in rows(out).values()} == {"ok"}
    fake_env.unlink()
    assert fake_run(out) == 0  # everything ok: no worker at all
    assert launches(fake_env) == []
    assert fake_run(out, "--force") == 0
    assert len(launches(fake_env, "train")) == 2 and len(rows(out)) == 2


def test_resume_refuses_a_different_configuration(fake_env, tmp_path, capsys):
    out = tmp_path / "out"
    assert fake_run(out) == 0
    fake_env.unlink()
    assert fake_run(out, "--lr", "0.01") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lr 0.05 -> 0.01" in err[0] and "--force" in err[0]
    assert launches(fake_env) == []


def test_failed_write_leaves_runs_jsonl_intact(fake_env, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert fake_run(out) == 0
    before = (out / "runs.jsonl").read_bytes()
    real_replace = os.replace

    def failing_replace(src, dst, *args, **kwargs):
        if str(dst).endswith("runs.jsonl"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing_replace)
    assert fake_run(out, "--force") == 2
    assert (out / "runs.jsonl").read_bytes() == before
    assert not list(out.glob(".runs.jsonl.*"))  # no temp file left behind


def test_checkpoint_resumes_a_killed_run(fake_env, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setenv("DUALBENCH_FAKE_FAULT", "fakea:segfault@12")  # 8 steps/epoch: dies in epoch 2
    assert fake_run(out, "--checkpoint", backends="fakea") == 1
    assert rows(out)["seed_cnn__fakea__seed0"]["status"] == "crashed"
    assert (out / "checkpoints" / "seed_cnn__fakea__seed0" / "state.json").exists()
    monkeypatch.delenv("DUALBENCH_FAKE_FAULT")
    capsys.readouterr()
    assert fake_run(out, "--checkpoint", backends="fakea") == 0
    assert "resumed from checkpoint after epoch 1" in capsys.readouterr().out
    row = rows(out)["seed_cnn__fakea__seed0"]
    assert row["status"] == "ok" and [e["epoch"] for e in row["epochs"]] == [1, 2]
    assert not (out / "checkpoints" / "seed_cnn__fakea__seed0").exists()  # finished: removed


def test_one_run_per_results_folder_and_stale_work_dirs_are_swept(fake_env, tmp_path, capsys):
    from compare.store import ResultsStore

    out = tmp_path / "out"
    out.mkdir()
    with ResultsStore(out).exclusive():  # another run holds the folder, with a worker folder in use
        stale = out / ".work-live"
        stale.mkdir()
        (stale / "spec.json").write_text("{}")
        assert fake_run(out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {os.getpid()}" in err[0] and "another --out" in err[0]
        assert launches(fake_env) == [] and not (out / "runs.jsonl").exists()
        assert stale.exists()  # the holder's folders are not touched
    # the holder is gone (as if SIGKILLed): its lock went with it, its folder is stale
    assert fake_run(out) == 0
    assert not stale.exists() and not list(out.glob(".work-*"))
    assert {r["status"] for r in rows(out).values()} == {"ok"}


def test_every_worker_gets_its_host_allocator_tuning_and_the_audit_shows_it(fake_env, tmp_path, monkeypatch):
    import json

    from common.execution import MALLOC_TUNING, allocator_setting
    from compare.process import worker_env

    for name in MALLOC_TUNING:
        monkeypatch.delenv(name, raising=False)
    env = worker_env()
    assert all(env[name] == value for name, value in MALLOC_TUNING.items())
    assert allocator_setting(env) == "MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824"
    assert allocator_setting({}) == "libc defaults"
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")  # the user's own value wins
    assert worker_env()["MALLOC_TRIM_THRESHOLD_"] == "12345"
    out = tmp_path / "out"
    assert fake_run(out) == 0
    audit = json.loads((out / "audit.json").read_text())["models"]["seed_cnn"]
    row = next(r for r in audit["rows"] if r["setting"] == "host_allocator")
    assert row["fakea"] == row["fakeb"] == "MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=12345"
    # part of each framework's execution configuration (searched per machine), so framework-native
    assert row["kind"] == "framework-native" and not row["asymmetry"]
