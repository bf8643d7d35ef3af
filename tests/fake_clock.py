"""A fake clock with a fake asynchronous device, for tests of what a timed window contains.

Host work advances the clock at once; device work is queued and only advances
the clock when someone synchronizes (as CUDA kernels do: a launch returns
immediately, ``synchronize()`` waits for the queue). Every clock read records
whether device work was still queued, so a test can prove "synchronize before
every clock read". Durations are powers of two, so sums are exact floats.

Install it over a module's ``time`` with ``clock.install(monkeypatch, module)``.
"""
from __future__ import annotations

from types import SimpleNamespace


class FakeClock:
    """Host time, a device queue, and a log of every clock read."""

    def __init__(self) -> None:
        self.now = 0.0  # seconds
        self.queued = 0.0  # device seconds launched but not yet waited for
        self.unsynced_reads: list[float] = []  # clock values read while device work was queued

    def perf_counter(self) -> float:
        if self.queued:
            self.unsynced_reads.append(self.now)
        return self.now

    def host(self, seconds: float) -> None:
        """Host work: the clock moves now."""
        self.now += seconds

    def launch(self, seconds: float) -> None:
        """Device work: queued, the clock moves when it is waited for."""
        self.queued += seconds

    def synchronize(self) -> None:
        self.now += self.queued
        self.queued = 0.0

    def install(self, monkeypatch, module) -> None:
        """Make ``module.time.perf_counter`` read this clock (only in that module)."""
        monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=self.perf_counter))
