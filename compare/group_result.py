"""One RunResult from how the ranks of a data-parallel run ended (compare.launch started them).

The chief (rank 0) writes the result of a run that went well. When a rank
fails, its peers fail soon after (a broken connection, or a collective that
times out), so the record must name the replica that CAUSED the failure, with
its stderr tail:

1. a rank killed by a signal the runner did not send (SIGKILL, SIGSEGV...);
2. else a rank that failed with an error of its own (not a peer's or a
   collective's failure);
3. else a rank still running when its peers' collectives gave up: it hung
   (made no progress), and the runner killed it;
4. else the first rank seen to fail.

The run is then ``crashed`` (``timeout`` past --timeout, ``interrupted`` on
Ctrl-C), unless the culprit is the chief with a status of its own (oom, error).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.config import RunSpec
from common.results import STATUSES, RunResult
from compare.launch import GroupRun
from compare.process import stderr_tail

# Text of errors that report a PEER's failure or a collective's timeout, not one of the rank's own
# (gloo, NCCL, TensorFlow's collectives and coordination service), lower case.
_PEER_ERRORS = ("connection closed", "connection reset", "connection refused", "broken pipe", "timed out",
                "timeout", "deadline", "unavailable", "aborted", "heartbeat", "socket closed", "peer",
                "collective", "gloo", "terminated", "failed to connect", "barrier")


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object file's contents; None when it is missing, unreadable or not an object."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def _own_error(raw: dict[str, Any] | None, log: Path) -> str | None:
    """The rank's own error line, or None when it only reports a peer's / a collective's failure."""
    line = (raw or {}).get("error") or next(reversed(stderr_tail(log, 5).splitlines()), "")
    if not line:
        return None
    return None if any(pattern in line.lower() for pattern in _PEER_ERRORS) else line


def culprit(run: GroupRun, out_paths: list[Path]) -> tuple[int, str]:
    """(index in ``run.ranks`` of the replica that caused the failure, what happened to it)."""
    ranks = run.outcome.ranks
    raws = [read_json_object(path) for path in out_paths]
    for i, outcome in enumerate(ranks):
        if outcome.signal_name and not outcome.killed_by_parent:
            return i, f"killed by {outcome.signal_name}"
    for i, outcome in enumerate(ranks):
        if outcome.returncode not in (0, None) and not outcome.killed_by_parent:
            own = _own_error(raws[i], run.log_paths[i])
            if own:
                return i, f"failed (exit {outcome.returncode}): {own}"
    hung = [i for i, outcome in enumerate(ranks) if outcome.killed_by_parent]
    if hung and len(hung) < len(ranks) and not run.outcome.timed_out:
        return hung[0], "made no progress (hung): its peers' collectives gave up on it, the runner killed it"
    first = run.outcome.first_failure or 0
    line = (raws[first] or {}).get("error") or f"exit {ranks[first].returncode}"
    return first, f"failed: {line}"


def rank_rows(run: GroupRun, hosts: list[str] | None) -> list[dict[str, Any]]:
    """Per rank: host, exit code, signal, whether the runner killed it, peak RSS, log file."""
    return [{"rank": rank, "host": hosts[rank] if hosts and rank < len(hosts) else None,
             "exit_code": outcome.returncode, "signal": outcome.signal_name,
             "killed_by_runner": outcome.killed_by_parent, "host_peak_rss_bytes": outcome.host_peak_rss_bytes,
             "log": str(log)}
            for rank, outcome, log in zip(run.ranks, run.outcome.ranks, run.log_paths)]


def result_from_group(spec: RunSpec, run: GroupRun, out_paths: list[Path], timeout_s: float | None) -> RunResult:
    """The RunResult of a data-parallel launch (rank 0's own when every rank ended well).

    ``out_paths``: each local rank's OUT.json (rank 0's is the result; the others write one on failure).
    """
    outcome, raw = run.outcome, read_json_object(out_paths[0])
    usable = isinstance(raw, dict) and raw.get("run_id") == spec.run_id() and raw.get("status") in STATUSES
    tail_index = 0
    if outcome.interrupted:
        result = _bare(spec, "interrupted", "interrupted by the user (Ctrl-C); rerun the same command to redo it")
    elif outcome.timed_out:
        result = _bare(spec, "timeout", f"no result after {timeout_s:g} s: every rank's process group was "
                                        "killed (--timeout)")
    elif outcome.first_failure is None and usable:
        result = _from_raw(spec, raw)
    elif outcome.first_failure is None:
        result = _bare(spec, "crashed", "rank 0 ended without writing a result; see the stderr tail")
    else:
        tail_index, what = culprit(run, out_paths)
        if tail_index == 0 and usable and raw.get("status") != "ok" and _own_error(raw, run.log_paths[0]):
            result = _from_raw(spec, raw)  # the chief's own failure (error, oom) as it recorded it
        else:
            result = _bare(spec, "crashed", f"rank {run.ranks[tail_index]} of {spec.world_size} {what}")
    result.exit_code = outcome.ranks[tail_index].returncode
    result.host_peak_rss_bytes = outcome.ranks[0].host_peak_rss_bytes  # the chief's, like a single process
    hosts = (result.distributed or {}).get("hosts")
    result.world_size = spec.world_size
    result.distributed = {**(result.distributed or {}), "ranks": rank_rows(run, hosts),
                          "launch": {"master_addr": run.cluster.master_addr, "master_port": run.cluster.master_port,
                                     "tf_workers": run.cluster.workers, "attempts": run.attempts,
                                     "notes": run.cluster.notes}}
    if result.status != "ok":
        lines = [line.strip() for line in str(result.error or "").splitlines() if line.strip()]
        result.error = (lines[0] if lines else f"status {result.status}")[:500]
        tail = stderr_tail(run.log_paths[tail_index])
        result.stderr_tail = f"[rank {run.ranks[tail_index]}]\n{tail}" if tail else None
    return result


def _from_raw(spec: RunSpec, raw: dict[str, Any]) -> RunResult:
    """Rank 0's OUT.json as a RunResult (an audit's {'run_id', 'status', 'settings'} becomes a bare one)."""
    if "model" in raw:
        return RunResult.from_dict(raw)
    result = _bare(spec, raw["status"], raw.get("error"))
    result.settings = raw.get("settings") or {}
    return result


def _bare(spec: RunSpec, status: str, error: str | None) -> RunResult:
    return RunResult(run_id=spec.run_id(), model=spec.model, backend=spec.backend, seed=spec.seed,
                     status=status, error=error, spec=spec.to_dict(), world_size=spec.world_size)
