"""One worker subprocess: start it in its own process group, follow its events, reap it with rusage.

Why not ``subprocess.run``: the parent needs the worker's peak RSS, which only
``os.wait4`` returns (``ru_maxrss``), a timeout that kills the whole process
group (a framework may fork helpers), and live progress events from stdout.

Reaping: the child is waited for ONLY here, by ``os.wait4`` (polled with
``WNOHANG`` so the timeout and Ctrl-C stay responsive). ``Popen.returncode``
is then set by hand so the Popen object never waits a second time. The group
is signalled only while its leader is unreaped (a zombie still holds the pid,
so the id cannot have been reused), plus one SIGKILL right after reaping to
clear stragglers that might hold the stdout pipe open.

``run_group`` does the same for the ranks of a data-parallel run (one process
group per rank), with a watchdog: once a rank ends badly the others get a grace
period to end on their own, then they are killed.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from common.worker import EVENT_PREFIX

POLL_S = 0.1  # how often the parent checks for exit / timeout while no output arrives
TERMINATE_GRACE_S = 5.0  # SIGTERM -> SIGKILL delay when the user interrupts
TAIL_LINES = 30  # stderr lines kept in a failed run's record


@dataclass
class ProcessOutcome:
    """How a worker process ended."""

    returncode: int | None = None  # exit code; -N when killed by signal N
    signal_name: str | None = None  # "SIGSEGV" etc. when killed by a signal
    timed_out: bool = False  # killed by the parent at --timeout
    interrupted: bool = False  # killed by the parent because of Ctrl-C / SIGTERM
    host_peak_rss_bytes: int | None = None  # ru_maxrss of the worker (bytes)
    wall_s: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)
    stdout_tail: list[str] = field(default_factory=list)  # non-event stdout lines (last TAIL_LINES)


def project_env() -> dict[str, str]:
    """The parent's environment as it is, with the project root first on PYTHONPATH (so the project's
    modules import in a child process) and unbuffered output, and without KERAS_BACKEND: each Keras
    worker chooses its own (tensorflow: Keras on TensorFlow, keras-torch: on torch), and a parent that
    runs Keras itself (the tests) must not hand its choice on. The CLI refuses a user's KERAS_BACKEND
    that contradicts a selected backend before any worker starts."""
    from common.manifest import PROJECT_ROOT

    env = dict(os.environ)
    env.pop("KERAS_BACKEND", None)
    parts = [str(PROJECT_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def worker_env(execution: Any = None) -> dict[str, str]:
    """The environment of one worker: ``project_env()`` and the process-level parts of ``execution`` (a
    common.execution.ExecutionConfig: oneDNN switch, malloc tuning; None: the fallback's), which the
    framework reads when it loads."""
    from common.execution import process_env

    return dict(process_env(execution, project_env()))


def _pump(stream, lines: "queue.Queue[str | None]") -> None:
    """Reader thread: stdout lines into the queue, then None at EOF."""
    try:
        for raw in iter(stream.readline, b""):
            lines.put(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
    finally:
        lines.put(None)


def _rss_bytes(rusage: Any) -> int:
    # Linux reports ru_maxrss in KiB, macOS in bytes
    return int(rusage.ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class _Follower:
    """Consumes stdout lines: events go to the callback, other lines to a tail."""

    def __init__(self, on_event: Callable[[dict[str, Any]], None] | None, outcome: ProcessOutcome):
        self.on_event, self.outcome, self.eof = on_event, outcome, False

    def take(self, lines: "queue.Queue[str | None]", wait_s: float) -> None:
        try:
            line = lines.get(timeout=wait_s) if wait_s > 0 else lines.get_nowait()
            while True:
                self._handle(line)
                line = lines.get_nowait()
        except queue.Empty:
            pass

    def _handle(self, line: str | None) -> None:
        if line is None:
            self.eof = True
            return
        if line.startswith(EVENT_PREFIX):
            try:
                event = json.loads(line[len(EVENT_PREFIX):])
            except ValueError:
                event = None
            if isinstance(event, dict):
                self.outcome.events.append(event)
                if self.on_event is not None:
                    self.on_event(event)
                return
        self.outcome.stdout_tail = (self.outcome.stdout_tail + [line])[-TAIL_LINES:]


def run_process(argv: list[str], *, log_path: Path, timeout_s: float | None = None,
                on_event: Callable[[dict[str, Any]], None] | None = None,
                env: dict[str, str] | None = None,
                on_start: Callable[[int], None] | None = None) -> ProcessOutcome:
    """Run ``argv`` to completion in a new process group; stderr goes to ``log_path``.

    Ctrl-C (KeyboardInterrupt) while waiting terminates the group, reaps it and
    returns with ``interrupted=True``; the caller records that and re-raises.
    ``on_start(pid)`` is called once the process exists (its group id is its pid):
    a caller waiting in several threads uses it to stop the groups itself.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    outcome = ProcessOutcome()
    started = time.monotonic()
    with open(log_path, "wb") as stderr_file:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr_file,
                                start_new_session=True, env=env if env is not None else worker_env())
    if on_start is not None:
        on_start(proc.pid)
    lines: "queue.Queue[str | None]" = queue.Queue()
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    reader.start()
    follower = _Follower(on_event, outcome)
    deadline = started + timeout_s if timeout_s else None
    try:
        status, rusage = _wait(proc.pid, lines, follower, deadline, outcome)
    except KeyboardInterrupt:
        outcome.interrupted = True
        status, rusage = _terminate(proc.pid)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    _signal_group(proc.pid, signal.SIGKILL)  # stragglers (the leader is gone; its group may not be)
    reader.join(timeout=2.0)
    follower.take(lines, 0)
    proc.stdout.close()
    outcome.wall_s = time.monotonic() - started
    outcome.returncode = proc.returncode
    if proc.returncode < 0:
        outcome.signal_name = _signal_name(-proc.returncode)
    outcome.host_peak_rss_bytes = _rss_bytes(rusage)
    return outcome


def _wait(pid: int, lines, follower: _Follower, deadline: float | None, outcome: ProcessOutcome):
    """Poll for exit while forwarding events; SIGKILL the group at the deadline."""
    while True:
        reaped, status, rusage = os.wait4(pid, os.WNOHANG)
        if reaped == pid:
            return status, rusage
        if follower.eof:
            time.sleep(POLL_S)  # stdout closed but not exited yet (shutdown in progress)
        else:
            follower.take(lines, POLL_S)
        if deadline is not None and time.monotonic() > deadline:
            outcome.timed_out = True
            _signal_group(pid, signal.SIGKILL)  # a hung worker may ignore SIGTERM
            _, status, rusage = os.wait4(pid, 0)
            return status, rusage


def _terminate(pid: int):
    """SIGTERM the group, SIGKILL after a grace period (or a second Ctrl-C); reap the leader."""
    _signal_group(pid, signal.SIGTERM)
    give_up = time.monotonic() + TERMINATE_GRACE_S
    try:
        while time.monotonic() < give_up:
            reaped, status, rusage = os.wait4(pid, os.WNOHANG)
            if reaped == pid:
                return status, rusage
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        pass
    _signal_group(pid, signal.SIGKILL)
    _, status, rusage = os.wait4(pid, 0)
    return status, rusage


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def stderr_tail(log_path: Path, lines: int = TAIL_LINES, max_bytes: int = 65536) -> str:
    """The last ``lines`` lines of a log file ('' when it is missing or empty)."""
    try:
        with open(log_path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class RankOutcome:
    """How one rank of a data-parallel group ended."""

    rank: int
    returncode: int | None = None  # exit code; -N when killed by signal N
    signal_name: str | None = None
    killed_by_parent: bool = False  # ended by the watchdog (a peer failed first, timeout, Ctrl-C)
    host_peak_rss_bytes: int | None = None
    ended_s: float | None = None  # seconds after the start when it was reaped


@dataclass
class GroupOutcome:
    """How a group of rank processes ended; ``first_failure`` is the first rank seen to end badly."""

    ranks: list[RankOutcome] = field(default_factory=list)
    timed_out: bool = False
    interrupted: bool = False
    first_failure: int | None = None
    wall_s: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)  # rank 0's
    stdout_tail: list[str] = field(default_factory=list)  # rank 0's non-event lines


class _Group:
    """The rank processes of one launch, reaped one by one with ``os.wait4`` (see ``run_group``)."""

    def __init__(self, procs: list[subprocess.Popen], started: float):
        self.procs, self.started = procs, started
        self.ranks = [RankOutcome(rank) for rank in range(len(procs))]
        self.alive = dict(enumerate(procs))

    def reap(self, rank: int, status: int, rusage: Any) -> None:
        outcome, proc = self.ranks[rank], self.alive.pop(rank)
        proc.returncode = outcome.returncode = os.waitstatus_to_exitcode(status)
        if outcome.returncode < 0:
            outcome.signal_name = _signal_name(-outcome.returncode)
        outcome.host_peak_rss_bytes = _rss_bytes(rusage)
        outcome.ended_s = time.monotonic() - self.started

    def poll(self) -> list[int]:
        """Reap whatever ended; the ranks that ended badly."""
        failed = []
        for rank, proc in list(self.alive.items()):
            reaped, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if reaped == proc.pid:
                self.reap(rank, status, rusage)
                if self.ranks[rank].returncode != 0:
                    failed.append(rank)
        return failed

    def kill_all(self, sig: int = signal.SIGKILL, wait: bool = True) -> None:
        """Signal every live rank's process group; with ``wait``, reap them (SIGKILL cannot be ignored)."""
        for rank, proc in list(self.alive.items()):
            self.ranks[rank].killed_by_parent = True
            _signal_group(proc.pid, sig)
        for rank, proc in list(self.alive.items()) if wait else ():
            _, status, rusage = os.wait4(proc.pid, 0)
            self.reap(rank, status, rusage)


def run_group(argvs: list[list[str]], envs: list[dict[str, str]], log_paths: list[Path], *,
              timeout_s: float | None = None, grace_s: float = 10.0,
              on_event: Callable[[dict[str, Any]], None] | None = None) -> GroupOutcome:
    """Run one process per rank (each in its own process group) until all end; a failure ends them all.

    Rank 0's stdout is followed for events (as ``run_process``); every rank's stderr, and the
    other ranks' stdout, go to its log. When a rank ends badly the others get ``grace_s`` to
    end on their own (their collectives fail or time out), then the watchdog kills them, so
    a dead or hung replica never leaves the rest waiting. ``timeout_s`` bounds the whole
    group; Ctrl-C terminates it. Nothing is left running: every rank's group is SIGKILLed
    after it is reaped.
    """
    outcome, started = GroupOutcome(), time.monotonic()
    procs: list[subprocess.Popen] = []
    handles = []
    try:
        for rank, (argv, env, log_path) in enumerate(zip(argvs, envs, log_paths)):
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            handles.append(open(log_path, "wb"))
            stdout = subprocess.PIPE if rank == 0 else handles[-1]
            procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=handles[-1],
                                          start_new_session=True, env=env))
    except BaseException:
        _Group(procs, started).kill_all()  # a rank that could not start: none of the others may linger
        raise
    finally:
        for handle in handles:
            handle.close()  # the children hold their own descriptors
    group = _Group(procs, started)
    lines: "queue.Queue[str | None]" = queue.Queue()
    reader = threading.Thread(target=_pump, args=(procs[0].stdout, lines), daemon=True)
    reader.start()
    follower = _Follower(on_event, ProcessOutcome())
    try:
        _watch(group, outcome, follower, lines, timeout_s, grace_s)
    except KeyboardInterrupt:
        outcome.interrupted = True
        group.kill_all(signal.SIGTERM, wait=False)
        give_up = time.monotonic() + TERMINATE_GRACE_S
        while group.alive and time.monotonic() < give_up:
            group.poll()
            time.sleep(POLL_S)
        group.kill_all()
    for proc in procs:
        _signal_group(proc.pid, signal.SIGKILL)  # stragglers of every rank
    reader.join(timeout=2.0)
    follower.take(lines, 0)
    procs[0].stdout.close()
    outcome.ranks, outcome.wall_s = group.ranks, time.monotonic() - started
    outcome.events, outcome.stdout_tail = follower.outcome.events, follower.outcome.stdout_tail
    return outcome


def _watch(group: _Group, outcome: GroupOutcome, follower: _Follower, lines, timeout_s: float | None,
           grace_s: float) -> None:
    """Poll the ranks until all ended; first failure -> grace -> kill the rest; deadline -> kill all."""
    deadline = group.started + timeout_s if timeout_s else None
    failed_at = None
    while group.alive:
        failed = group.poll()
        if failed and outcome.first_failure is None:
            # a rank killed by a signal is the likelier cause than a peer that saw it die
            outcome.first_failure = next((r for r in failed if group.ranks[r].signal_name), failed[0])
            failed_at = time.monotonic()
        if not group.alive:
            break
        if follower.eof:
            time.sleep(POLL_S)
        else:
            follower.take(lines, POLL_S)
        now = time.monotonic()
        if deadline is not None and now > deadline:
            outcome.timed_out = True
            group.kill_all()
        elif failed_at is not None and now > failed_at + grace_s:
            group.kill_all()
