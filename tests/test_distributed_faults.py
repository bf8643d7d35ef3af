"""Faults in data-parallel runs: a replica that dies or hangs ends the whole run in bounded time,
recorded as crashed with that replica's stderr tail, and nothing is left running.

The real engines (torch DDP over gloo, TensorFlow MultiWorkerMirroredStrategy over RING) run
under the real runner; the test kills or freezes rank 1 from outside, as the kernel's
out-of-memory killer or a stuck host would.
"""
from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from common.config import Recipe, RunSpec
from compare import launch
from compare.runner import Runner
from compare.store import ResultsStore
from tests.data_fixtures import write_image_folder

CLASSES = tuple(f"c{i}" for i in range(4))
RANK_ENV = {"torch": "RANK", "tensorflow": "DUALBENCH_LOCAL_RANK"}  # how each launch names a rank


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist-faults") / "data"
    write_image_folder(root, classes=CLASSES, per_class=(32, 2), size=(16, 16))
    return root


def _children() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def _rank_process(backend: str, rank: int) -> psutil.Process | None:
    for child in _children():
        try:
            if child.environ().get(RANK_ENV[backend]) == str(rank):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


class _Saboteur:
    """A progress sink that, once rank 0 reports training, sends ``sig`` to rank 1 (then records when)."""

    def __init__(self, backend: str, sig: int):
        self.backend, self.sig, self.sent_at = backend, sig, None

    def start_run(self, *args, **kwargs):
        pass

    def end_run(self, *args, **kwargs):
        pass

    def event(self, event: dict) -> None:
        if event.get("event") == "ready" and self.sent_at is None:
            threading.Thread(target=self._strike, daemon=True).start()

    def _strike(self) -> None:
        time.sleep(1.0)  # into the training steps
        victim = _rank_process(self.backend, 1)
        assert victim is not None, "rank 1 not found among the runner's children"
        victim.send_signal(self.sig)
        self.sent_at = time.monotonic()


def _run_with_saboteur(backend: str, sig: int, data: Path, out: Path, collective_timeout_s: float):
    spec = RunSpec(model="seed_cnn", backend=backend, data=f"folder:{data}", device="cpu", seed=0, nproc=2,
                   warmup_steps=0, collective_timeout_s=collective_timeout_s,
                   recipe=Recipe(epochs=200, batch_size=8, eval_batch_size=8, lr=0.01))
    saboteur = _Saboteur(backend, sig)
    store = ResultsStore(out)
    store.ensure_writable()
    runner = Runner(store, timeout_s=240, progress=saboteur)
    result = runner.run_one(spec)
    return result, saboteur, time.monotonic()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_a_killed_replica_ends_the_run_as_crashed_with_its_stderr_and_nothing_left(backend, tiny_folder, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setenv("DUALBENCH_CACHE", str(tmp_path / "cache"))
    result, saboteur, ended = _run_with_saboteur(backend, signal.SIGKILL, tiny_folder, tmp_path / "out", 60)
    assert saboteur.sent_at is not None, "the run ended before rank 1 could be killed"
    print(f"{backend}: ended {ended - saboteur.sent_at:.1f} s after the kill: {result.error}")
    assert result.status == "crashed", (result.status, result.error)
    assert result.error.startswith("rank 1 of 2 killed by SIGKILL"), result.error
    assert result.stderr_tail.startswith("[rank 1]")
    # peers notice a dead replica from their broken connections, well before the collective timeout
    assert ended - saboteur.sent_at < 45, f"the run took {ended - saboteur.sent_at:.0f} s to end"
    ranks = {row["rank"]: row for row in result.distributed["ranks"]}
    assert ranks[1]["signal"] == "SIGKILL" and not ranks[1]["killed_by_runner"]
    assert _children() == [], "a rank process was left running"
    rows = ResultsStore(tmp_path / "out").load_rows()
    assert [row["status"] for row in rows] == ["crashed"] and rows[0]["world_size"] == 2


@pytest.mark.slow
def test_a_hung_replica_ends_the_run_within_the_collective_timeout(tiny_folder, tmp_path, monkeypatch):
    """SIGSTOP freezes rank 1: rank 0's collective times out, the runner kills the frozen rank and names it."""
    monkeypatch.setenv("DUALBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(launch, "GRACE_S", 3.0)
    result, saboteur, ended = _run_with_saboteur("torch", signal.SIGSTOP, tiny_folder, tmp_path / "out", 6)
    assert result.status == "crashed", (result.status, result.error)
    assert result.error.startswith("rank 1 of 2 made no progress (hung)"), result.error
    # bounded: the collective timeout (6 s) plus the runner's grace period (3 s) plus slack
    assert ended - saboteur.sent_at < 30, f"the run took {ended - saboteur.sent_at:.0f} s to end"
    assert _children() == []
