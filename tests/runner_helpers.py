"""Shared helpers for the runner / CLI / report tests: the fake backends and how to call the CLI.

Import the fixture into a test module with ``from tests.runner_helpers import fake_env  # noqa: F401``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.registry import EXTRA_BACKENDS_ENV
from compare.cli import main as cli_main
from compare.tune_cache import CACHE_ENV as TUNING_CACHE_ENV
from tests.fake_backend import FAULT_ENV, LAUNCH_LOG_ENV, TUNE_ENV

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FAKES = "fakea=tests.fake_backend:FakeBackend;fakeb=tests.fake_backend:FakeBackend"
# small and quick: 8 training steps per epoch, one evaluation batch
SMALL = ["--data", "synthetic:256,128", "--batch-size", "32", "--epochs", "2", "--measure-warmup-steps", "1"]


@pytest.fixture
def fake_env(monkeypatch, tmp_path, tmp_path_factory):
    """Register fakea/fakeb, isolate the cache, log every worker launch; returns the launch-log path."""
    monkeypatch.setenv(EXTRA_BACKENDS_ENV, FAKES)
    # one cache per session (the synthetic set is generated once), never the user's own cache
    monkeypatch.setenv("DUALBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "dualbench-cache"))
    monkeypatch.delenv(FAULT_ENV, raising=False)
    monkeypatch.delenv(TUNE_ENV, raising=False)
    monkeypatch.setenv(TUNING_CACHE_ENV, str(tmp_path / "tuning-cache"))  # every test tunes from scratch
    log = tmp_path / "launches.txt"
    monkeypatch.setenv(LAUNCH_LOG_ENV, str(log))
    return log


def launches(log: Path, kind: str | None = None) -> list[str]:
    """Run ids of worker launches recorded by the fake backend ('audit' / 'train' / both)."""
    if not log.exists():
        return []
    rows = [line.split() for line in log.read_text().splitlines() if line.strip()]
    return [row[1] for row in rows if kind is None or row[0] == kind]


def launch_pids(log: Path) -> list[int]:
    return [int(line.split()[2]) for line in log.read_text().splitlines() if line.strip()]


def run_cli(*argv: str) -> int:
    """`dualbench ...` in this process; returns the exit code (argparse exits become codes too)."""
    try:
        return cli_main(list(argv))
    except SystemExit as exc:
        return int(exc.code or 0)


def fake_run(out: Path, *extra: str, seeds: str = "0", backends: str = "fakea,fakeb") -> int:
    return run_cli("run", "--models", "seed_cnn", "--backends", backends, "--seeds", seeds, *SMALL,
                   "--out", str(out), *extra)


def rows(out: Path) -> dict[str, dict]:
    """runs.jsonl as {run_id: row}."""
    path = out / "runs.jsonl"
    return {row["run_id"]: row for row in map(json.loads, path.read_text().splitlines())} if path.exists() else {}
