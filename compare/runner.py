"""The runner: plan runs in ABBA order, audit fairness, run each in its own worker, store results.

Each run is one ``python -m <worker> train SPEC.json OUT.json`` subprocess
(compare.process): a framework never loads in this process, a crash or a
hang costs one run, never the others, and every finished run is upserted
into ``OUT/runs.jsonl`` atomically before the next one starts. A data-parallel
run (``--nproc N``) is N such processes on this host (compare.launch), judged
as one run (compare.group_result); rank r > 0 logs to ``OUT/logs/<run_id>.rank<r>.log``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from common.audit import asymmetries, compare_settings, details
from common.config import RunSpec
from common.distributed import configuration_label
from common.errors import UserError
from common.execution import requested
from common.registry import worker_command
from common.results import STATUSES, RunResult, write_json_atomic
from compare.group_result import read_json_object, result_from_group
from compare.launch import GroupRun, Launch, launch_local, local_ranks
from compare.process import ProcessOutcome, run_process, stderr_tail, worker_env

CHECKPOINT_SPEC = "runspec.json"  # the spec a checkpoint folder belongs to (written by the runner)


def abba(sides: list[Any], rounds: int) -> Iterator[tuple[int, Any]]:
    """(round, side): every side once per round, in order on even rounds and reversed on odd ones.

    Interleaving the sides makes slow drift of the machine (thermal throttling,
    background load, page cache) hit every side alike; reversing every other
    round (A B, B A, A B, ...) also cancels any effect of position, such as
    always running right after the other framework's process. An even number
    of rounds gives a fully balanced design. The runner and benchmarks/ share it.
    """
    for round_index in range(rounds):
        for side in (sides if round_index % 2 == 0 else sides[::-1]):
            yield round_index, side


def plan_runs(models: list[str], sides: list[Any], seeds: list[int]) -> list[tuple[str, int, Any]]:
    """(model, seed, side) in execution order: the sides (backends, or (backend, style) series) in ABBA
    order, one round per (model, seed)."""
    return [(model, seed, side) for model, seed, side, _ in plan_world_runs(models, sides, seeds, [1])]


def plan_world_runs(models: list[str], sides: list[Any], seeds: list[int],
                    nprocs: list[int]) -> list[tuple[str, int, Any, int]]:
    """(model, seed, side, nproc) in execution order: one ABBA round of the sides (backends, or
    (backend, style) series) per (model, nproc, seed), so every side runs each process count back to back."""
    pairs = [(model, seed, nproc) for model in models for nproc in nprocs for seed in seeds]
    return [(model, seed, side, nproc) for i, side in abba(list(sides), len(pairs))
            for model, seed, nproc in [pairs[i]]]


def audit_label(spec: RunSpec) -> str:
    """What the audit is keyed by: the model, with the world size of a data-parallel run."""
    return configuration_label(spec.model, spec.world_size)


def _comparable(spec: dict[str, Any]) -> dict[str, Any]:
    """A stored or current spec as JSON values, without fields that do not change results.

    Fields added to RunSpec since a row was stored take their defaults (which is what that run used).
    """
    try:
        spec = RunSpec.from_dict(spec).to_dict()
    except (TypeError, ValueError):
        pass  # a spec this version cannot read back: compared as stored
    clean = json.loads(json.dumps(spec, sort_keys=True))
    # where files go, and the time-to-accuracy target (read from the stored evaluations), not how the run trains
    for where in ("checkpoint_dir", "final_weights_path", "target_accuracy"):
        clean.pop(where, None)
    return clean


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} -> {b!r}")
    return out


def _one_line(text: str | None, limit: int = 500) -> str:
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    return (lines[0] if lines else "")[:limit]


def result_from_outcome(spec: RunSpec, outcome: ProcessOutcome, raw: dict[str, Any] | None,
                        log_path: Path, timeout_s: float | None) -> RunResult:
    """Turn how the worker ended (+ its OUT.json, if any) into one RunResult."""
    usable = (isinstance(raw, dict) and raw.get("run_id") == spec.run_id() and raw.get("status") in STATUSES)
    if outcome.interrupted:
        result = _bare(spec, "interrupted", "interrupted by the user (Ctrl-C); rerun the same command to redo it")
    elif outcome.timed_out:
        result = _bare(spec, "timeout", f"no result after {timeout_s:g} s: the worker's process group was "
                                        "killed (--timeout)")
    elif usable:
        result = RunResult.from_dict(raw)  # ok, diverged, error, oom... as the worker recorded it
    elif outcome.signal_name:
        hint = " (possibly the out-of-memory killer)" if outcome.signal_name == "SIGKILL" else ""
        result = _bare(spec, "crashed", f"worker killed by {outcome.signal_name} "
                                        f"(exit {outcome.returncode}){hint} before writing a result")
    else:
        result = _bare(spec, "crashed", f"worker exited with code {outcome.returncode} without writing a "
                                        "result; see the stderr tail")
    result.exit_code = outcome.returncode
    result.host_peak_rss_bytes = outcome.host_peak_rss_bytes
    if not result.spec:
        result.spec = spec.to_dict()
    if result.status != "ok":
        result.error = _one_line(result.error) or f"status {result.status}"
        tail = stderr_tail(log_path) or "\n".join(outcome.stdout_tail)
        result.stderr_tail = tail or None
    return result


def _bare(spec: RunSpec, status: str, error: str) -> RunResult:
    return RunResult(run_id=spec.run_id(), model=spec.model, backend=spec.backend, seed=spec.seed,
                     status=status, error=error, spec=spec.to_dict())


@dataclass
class Launched:
    """One launch: how it ended, rank 0's OUT.json, the log to quote, and a group's judged result."""

    outcome: ProcessOutcome  # a group's is a summary: the culprit's exit, rank 0's events
    raw: dict[str, Any] | None
    log_path: Path
    result: RunResult | None = None  # data-parallel runs only (compare.group_result)


def _group_summary(group: GroupRun, result: RunResult) -> ProcessOutcome:
    """The ProcessOutcome fields the audit reads, for a group (exit code of the rank to blame)."""
    ranks = group.outcome.ranks
    blamed = next((r for r in ranks if r.returncode == result.exit_code and r.returncode), ranks[0])
    return ProcessOutcome(returncode=result.exit_code, signal_name=blamed.signal_name,
                          timed_out=group.outcome.timed_out, interrupted=group.outcome.interrupted,
                          host_peak_rss_bytes=ranks[0].host_peak_rss_bytes, wall_s=group.outcome.wall_s,
                          events=group.outcome.events, stdout_tail=group.outcome.stdout_tail)


class Runner:
    """Runs specs against one results folder; counts worker launches (tests and the summary use it)."""

    def __init__(self, store: Any, *, timeout_s: float | None = None, force: bool = False,
                 progress: Any = None, launch: Launch | None = None):
        """``store``: a compare.store.ResultsStore; ``progress``: a compare.progress.Progress or None;
        ``launch``: how this host takes part in data-parallel runs (default: the only host)."""
        self.store = store
        self.timeout_s = timeout_s
        self.force = force
        self.progress = progress
        self.launches = 0
        self.launch_config = launch or Launch()
        self.on_result: Any = None  # called with every finished run's RunResult once it is stored

    # -- resume -----------------------------------------------------------------
    def check_existing(self, specs: list[RunSpec]) -> None:
        """Refuse to mix configurations: an ok run with this id but another spec cannot be 'resumed'."""
        if self.force:
            return
        stored = {row.get("run_id"): row for row in self.store.load_rows()}
        for spec in specs:
            row = stored.get(spec.run_id())
            if row and row.get("status") == "ok" and row.get("spec"):
                diffs = _differences(_comparable(row["spec"]), _comparable(spec.to_dict()))
                if diffs:
                    raise UserError(f"{self.store.runs_path} already has {spec.run_id()} with other settings "
                                    f"({'; '.join(diffs[:3])}): use a new --out, or --force to replace it")

    def pending(self, specs: list[RunSpec]) -> list[RunSpec]:
        """Specs still to run: everything with --force, else those without an ok row."""
        if self.force:
            return list(specs)
        done = {row.get("run_id") for row in self.store.load_rows() if row.get("status") == "ok"}
        return [spec for spec in specs if spec.run_id() not in done]

    # -- one worker ---------------------------------------------------------------
    def launch(self, spec: RunSpec, *, audit_only: bool = False, on_event=None) -> Launched:
        """Start the worker(s) for ``spec`` and wait for them (one process, or one per rank)."""
        workdir = Path(tempfile.mkdtemp(prefix=".work-", dir=self.store.root))
        try:
            spec_path, out_path = workdir / "spec.json", workdir / "result.json"
            write_json_atomic(spec_path, spec.to_dict())
            task = "audit" if audit_only else "train"
            name = ("audit__" if audit_only else "") + spec.run_id()
            log_path = self.store.log_path(name)
            self.launches += 1
            if spec.world_size > 1:
                return self._launch_group(spec, task, spec_path, workdir, name, on_event)
            argv = [sys.executable, *worker_command(spec.backend), task, str(spec_path), str(out_path)]
            # the spec's execution configuration decides the process-level settings (oneDNN, malloc)
            outcome = run_process(argv, log_path=log_path, timeout_s=self.timeout_s, on_event=on_event,
                                  env=worker_env(requested(spec)))
            return Launched(outcome, read_json_object(out_path), log_path)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _launch_group(self, spec: RunSpec, task: str, spec_path: Path, workdir: Path, name: str,
                      on_event) -> Launched:
        """This host's ranks of a data-parallel run, judged as one run (compare.group_result)."""
        outs = {rank: workdir / ("result.json" if rank == 0 else f"result.rank{rank}.json")
                for rank in local_ranks(spec, self.launch_config)}
        task_args = lambda rank: [task, str(spec_path), str(outs[rank])]  # noqa: E731
        if self.launch_config.nnodes > 1:
            from compare.rendezvous import launch_leader

            group = launch_leader(spec, task_args, self._rank_log(name), worker_env(requested(spec)), self.launch_config,
                                  timeout_s=self.timeout_s, on_event=on_event)
        else:
            clear = lambda: [path.unlink(missing_ok=True) for path in outs.values()]  # noqa: E731
            group = launch_local(spec, task_args, self._rank_log(name), worker_env(requested(spec)), self.launch_config,
                                 timeout_s=self.timeout_s, on_event=on_event, before_retry=clear)
        out_paths = [outs.get(rank, workdir / f"remote.rank{rank}.json") for rank in group.ranks]  # remote: none
        result = result_from_group(spec, group, out_paths, self.timeout_s)
        culprit_log = next((Path(row["log"]) for row in result.distributed["ranks"]
                            if row["exit_code"] and row["exit_code"] == result.exit_code), group.log_paths[0])
        return Launched(_group_summary(group, result), read_json_object(out_paths[0]), culprit_log, result)

    def _rank_log(self, name: str):
        return lambda rank: self.store.log_path(name if rank == 0 else f"{name}.rank{rank}")

    # -- fairness audit -----------------------------------------------------------
    def audit(self, specs: list[RunSpec]) -> dict[str, dict[str, Any]]:
        """Audit-only worker per (model, world size, series) (first seed); merge into audit.json; audit.csv.

        A worker that exits 2 (a user error: unusable device, bad dataset) stops
        everything with its message; other failures are recorded and the
        backend's settings show as '<not reported>'. Data-parallel runs are audited
        with all their ranks, under ``audit_label`` (e.g. "resnet20 (world 2)").
        """
        first: dict[tuple[str, str], RunSpec] = {}  # (configuration, series): a fit style is audited apart
        for spec in specs:
            first.setdefault((audit_label(spec), spec.series()), dataclasses.replace(spec, checkpoint_dir=None))
        audit = self.store.load_audit()
        for label in dict.fromkeys(audit_label(spec) for spec in specs):
            settings: dict[str, dict[str, Any]] = {}
            failures: dict[str, str] = {}
            for (group, backend), spec in first.items():
                if group != label:
                    continue
                print(f"auditing {label} on {backend} ...", flush=True)
                launched = self.launch(spec, audit_only=True)
                outcome, raw, log_path = launched.outcome, launched.raw, launched.log_path
                if outcome.interrupted:
                    raise KeyboardInterrupt
                if raw and raw.get("status") == "ok" and isinstance(raw.get("settings"), dict):
                    settings[backend] = raw["settings"]
                    continue
                error = _one_line((raw or {}).get("error")) or _one_line(stderr_tail(log_path, 1)) or "no output"
                if launched.result is not None and launched.result.status != "ok":
                    error = _one_line(launched.result.error) or error  # the rank to blame, not rank 0's echo
                if outcome.returncode == 2:
                    raise UserError(f"the {backend} worker refused {label}: {re.sub(r'^[A-Za-z]*Error: ', '', error)}")
                how = f"{outcome.signal_name}, " if outcome.signal_name else ""
                how += "timed out, " if outcome.timed_out else ""
                failures[backend] = f"exit {outcome.returncode}, {how}{error}"
                settings[backend] = {}
            rows = compare_settings(settings)
            audit["models"][label] = {"backends": list(settings), "rows": rows, "failures": failures,
                                      "asymmetries": [row["setting"] for row in asymmetries(rows)],
                                      "details": details(settings)}  # e.g. the decayed parameter names
        self.store.write_json("audit.json", audit)
        from compare.tables import audit_frame  # pandas: only once there is a table to write

        frame = audit_frame(audit["models"])
        self.store.write_bytes("audit.csv", frame.to_csv(index=False).encode("utf-8"))
        return audit["models"]

    # -- training runs ------------------------------------------------------------
    def _prepare_checkpoint(self, spec: RunSpec) -> None:
        """Keep a checkpoint only if it belongs to exactly this spec (else it would resume wrong)."""
        folder = Path(spec.checkpoint_dir)
        marker = folder / CHECKPOINT_SPEC
        current = _comparable(spec.to_dict())
        if folder.exists() and (self.force or read_json_object(marker) != current):
            shutil.rmtree(folder, ignore_errors=True)
        write_json_atomic(marker, current)

    def run_one(self, spec: RunSpec) -> RunResult:
        """Run one spec in a worker and upsert its RunResult; re-raises KeyboardInterrupt after recording.

        The worker saves the run's final weights to OUT/weights/<run_id>.npz (the result
        records that path, relative to OUT, and the file's SHA-256).
        """
        weights_path = self.store.weights_path(spec.run_id())
        spec = dataclasses.replace(spec, final_weights_path=str(weights_path.resolve()))
        if spec.checkpoint_dir:
            self._prepare_checkpoint(spec)
        if self.progress:
            self.progress.start_run(spec.run_id(), spec.recipe.epochs)
        launched = self.launch(spec, on_event=self.progress.event if self.progress else None)
        outcome = launched.outcome
        result = launched.result or result_from_outcome(spec, outcome, launched.raw, launched.log_path,
                                                        self.timeout_s)
        if result.final_weights_file:
            result.final_weights_file = weights_path.relative_to(self.store.root).as_posix()
        previous = {r.get("run_id"): r for r in self.store.load_rows()}.get(spec.run_id())
        if not (outcome.interrupted and previous and previous.get("status") == "ok"):
            self.store.upsert_run(result)  # UserError (old file intact) if the write fails
        if self.on_result is not None:
            self.on_result(result)
        if result.status == "ok" and spec.checkpoint_dir:
            shutil.rmtree(spec.checkpoint_dir, ignore_errors=True)  # finished: nothing left to resume
        if self.progress:
            self.progress.end_run(result)
        if outcome.interrupted:
            raise KeyboardInterrupt
        return result

    def run_all(self, specs: list[RunSpec]) -> list[RunResult]:
        """Every spec in order; ones already ok in --out are skipped (unless --force)."""
        todo = {spec.run_id() for spec in self.pending(specs)}
        results = []
        for spec in specs:
            if spec.run_id() not in todo:
                if self.progress:
                    self.progress.end_run(spec.run_id(), skipped=True)
                continue
            results.append(self.run_one(spec))
        return results
