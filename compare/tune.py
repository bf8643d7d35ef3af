"""The execution-configuration search: each framework at its own best on the machine that runs it.

For one (backend, model, device, precision, batch size) the search measures
candidate ``ExecutionConfig``s, each in its own worker process (the ``tune``
task, common.tuning), and keeps the fastest one that computes the same
numbers as the framework's reference configuration:

1. the reference (the framework's defaults, no compiler: torch eager,
   TensorFlow graph mode, whose tf.function runs eager's kernels, Keras on
   PyTorch eager) runs first: its logits and losses are what every other
   candidate (XLA, torch.compile, oneDNN, ...) is gated against. When the
   first dimension is an in-process one (torch: the memory format), its
   variants are measured in the reference's own process, beside it;
2. the framework's own defaults (``FRAMEWORK_DEFAULT``) are the starting
   point (the report shows how far they are from the choice);
3. a coordinate search: for each dimension of the backend's ``SearchSpace``,
   in order of expected effect (for TensorFlow oneDNN before the mode: which
   mode wins flips with oneDNN), every other value is tried against the
   current best (the incumbent). A process-level dimension (oneDNN,
   allocator, thread pools: read when the process starts) takes one process
   per value, and the incumbent gets a process of its own beside it: both
   start at once, build and gate side by side, then time their blocks in
   turns, ABBA over four rounds, the other idle (``run_paired``,
   common.tuning.Turns); a challenger replaces the incumbent when it passes
   the gate and is at least ``MIN_GAIN`` faster than the incumbent in the
   same minutes. Two processes measured one after the other can differ on
   a shared machine by more than the allocator's effect (the search tables
   of benchmarks/tune_budget.py show the reference's spread between
   searches); in turns, the drift hits both. A challenger in an in-process
   alternation running below ``LOSER_FRACTION`` of the incumbent stops early
   (a clear loser). An in-process dimension (execution mode, memory format:
   ``Dimension.in_process``) is tried in ONE process: the incumbent and each
   other value, built side by side and timed alternately in ABBA blocks
   (common.tuning.measure_alternating); the fastest correct one wins when it
   is ``MIN_GAIN`` faster than the incumbent in that same process. The close
   calls this search exists for (torch eager vs compile, graph vs XLA) are
   then decided without process-to-process noise. torch decides its memory
   format (in eager) before its mode, so that torch.compile builds once, in
   the chosen format: a cold compile is the costliest part of a search. A
   process-level challenger followed by an in-process dimension (TensorFlow's
   oneDNN before its mode) holds that dimension's variants in its own
   process: where the challenger wins, the next dimension is decided there,
   a process fewer;
4. dimensions whose effect comes from the machine rather than the model's
   graph (allocator, oneDNN kernels, tf.data's pool: ``per_model=False``)
   are searched for the first model of a backend and inherited by the next,
   not its per-model choices: its search starts from its reference (or what
   the reference's process chose) with those settings, measured beside the
   next dimension it varies;
5. a search does not start a candidate that would end after ``budget_s``
   seconds (elapsed time + the median duration of its processes so far, one
   per variant the process builds, ``COMPILED_VARIANT_COST`` for a variant
   that compiles), except its first challenger: every search tries at least
   the first dimension's other value. The first dimension that does not fit
   ends the search: a later one (a smaller expected effect) never runs in
   its place. A process-level challenger whose in-process neighbours would
   not fit runs alone.

benchmarks/tune_check.py checks the choice against an exhaustive measurement.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from common.config import RunSpec
from common.execution import FRAMEWORK_DEFAULT, ExecutionConfig
from common.manifest import usable_cores
from common.registry import REAL_BACKENDS, worker_command
from common.tuning import ALTERNATION_ROUNDS
from compare.process import run_process, stderr_tail, worker_env

MIN_GAIN = 0.03  # a change must be this much faster to replace the incumbent (else: noise, keep the simpler)
LOSER_FRACTION = 0.7  # in an in-process alternation, a variant below this fraction of the incumbent stops early
# The correctness gate: max|candidate - reference| <= tolerance * max|reference|.
# FORWARD_RTOL, for what the initial weights compute (eval-mode logits, the first step's training-mode
# loss): fp32, the forward-parity tolerance; bf16/fp16 round every op to 8/11 mantissa bits, so another
# kernel order moves outputs by a few of their ulps.
# UPDATE_RTOL, for the first update (gradients, optimizer, BN statistics) and the later steps' losses:
# backward reductions run in another order in every configuration and training from the initial
# weights amplifies the difference at every step, so correct configurations differ there far more
# than in the forward (benchmarks/tune_check.py reports each candidate's gate differences); a wrong
# gradient, optimizer or statistics update moves them by orders of magnitude more.
FORWARD_RTOL = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 1e-2}
UPDATE_RTOL = {"fp32": 1e-2, "bf16": 1e-1, "fp16": 1e-1}
GATE_STEPS, WARMUP_STEPS, TIMED_STEPS = 3, 1, 8  # per candidate process (gate steps include the compile step)
# In-process variants alternate in timed blocks, ABBA (common.tuning.ALTERNATION_ROUNDS): TIMED_STEPS per
# variant in all, each block after WARMUP_STEPS untimed steps.
IN_PROCESS_FIELDS = frozenset({"mode", "channels_last"})  # what a backend applies inside the process
# A variant that compiles (torch.compile, XLA, Keras's jit_compile) costs its process a cold compile of the
# training step and, where it can win, of the evaluation step: about this many processes' worth of time in the
# budget's estimates (on a 2-core AMD EPYC, seed_cnn 15 s + 7 s, resnet20 45 s + 20 s, where an eager
# candidate's process is 15-25 s).
COMPILING_MODES = frozenset({"compile", "xla", "jit_compile"})
COMPILED_VARIANT_COST = 2.0
# A process-level challenger runs beside the incumbent's own process, at the same time (run_paired): the two
# build in parallel, then their timed blocks take turns; the incumbent's process adds about half a process.
PAIR_PARTNER_COST = 0.5
# The searches of one command share this budget (compare.tune_resolve: each may use what is left but
# RESERVE_FRACTION of it for each search still to run, and at least an equal share); 2 models x 2 backends
# must stay under 5 minutes on a 2-core CPU.
DEFAULT_BUDGET_S = 270.0
# A later search's reference and first challenger always run (~50 s on a 2-core CPU): what each search
# still to come keeps back. The first search of a backend, which also decides the machine-level settings,
# gets the most.
RESERVE_FRACTION = 0.2


@dataclass(frozen=True)
class Dimension:
    """One setting the search varies: an ExecutionConfig field and the values it can take."""

    field: str
    values: tuple[Any, ...]
    per_model: bool = True  # False: machine-level, inherited by a backend's later models
    cpu_only: bool = False  # skipped when the run is on a GPU

    @property
    def in_process(self) -> bool:
        """Applied inside the process (IN_PROCESS_FIELDS: mode, memory format): variants alternate in one process."""
        return self.field in IN_PROCESS_FIELDS


@dataclass(frozen=True)
class SearchSpace:
    """Where a backend's search starts and what it varies."""

    reference: ExecutionConfig  # the gate's reference: the defaults without a compiler (measured first)
    start: ExecutionConfig  # the framework's own defaults
    dimensions: tuple[Dimension, ...]


SPACES = {
    "torch": SearchSpace(
        reference=FRAMEWORK_DEFAULT["torch"], start=FRAMEWORK_DEFAULT["torch"],
        # the memory format first, in eager, in the reference's own process; then the allocator, whose
        # challenger's process also holds the mode's variants (eager beside torch.compile), so the mode is
        # decided there where the allocator wins; torch.compile builds once, in the memory format chosen (for
        # a later model, beside the inherited allocator). The allocator before the mode: a cold compile can
        # use up what is left of the budget, and the allocator was worth 25-40% on both CPUs measured.
        dimensions=(Dimension("channels_last", (False, True)),
                    Dimension("malloc_tuning", (False, True), per_model=False),
                    Dimension("mode", ("eager", "compile")),
                    Dimension("inter_op_threads", (None, 1, 2)))),
    "tensorflow": SearchSpace(
        reference=FRAMEWORK_DEFAULT["tensorflow"], start=FRAMEWORK_DEFAULT["tensorflow"],
        dimensions=(Dimension("onednn", (True, False), per_model=False, cpu_only=True),
                    # eager: never faster than graph, not measured
                    Dimension("mode", ("graph", "xla")),
                    Dimension("malloc_tuning", (False, True), per_model=False),
                    Dimension("inter_op_threads", (None, 1, 2)),
                    Dimension("data_threads", (None, 1), per_model=False))),
    # Keras on PyTorch: torch's process settings, Keras's two modes. The mode comes last: a jit_compile
    # candidate (torch.compile of the Keras step: ~1 min per process for seed_cnn on a 2-core CPU, 32 s of
    # it compiling) is the costliest process of the search, so the budget decides whether it is tried
    # after the cheap dimensions.
    "keras-torch": SearchSpace(
        reference=FRAMEWORK_DEFAULT["keras-torch"], start=FRAMEWORK_DEFAULT["keras-torch"],
        dimensions=(Dimension("malloc_tuning", (False, True), per_model=False),
                    Dimension("inter_op_threads", (None, 1, 2)),
                    Dimension("mode", ("eager", "jit_compile")))),
}


def search_space(backend: str) -> SearchSpace:
    """The backend's space; a test backend (registry extras) declares ``SEARCH_SPACE`` in its module."""
    if backend in SPACES:
        return SPACES[backend]
    import importlib

    from common.registry import worker_command as command

    module = importlib.import_module(command(backend)[1])
    space = getattr(module, "SEARCH_SPACE", None)
    if space is None:
        raise ValueError(f"backend {backend!r} declares no SEARCH_SPACE: pin its --mode")
    return space


@dataclass
class Candidate:
    """One configuration and what its measurements found."""

    config: ExecutionConfig
    role: str  # reference | framework default | inherited | <field>=<value>
    rounds: list[float] = field(default_factory=list)  # median images/s of each measurement in a process of its own
    together: list[float] = field(default_factory=list)  # ... in a process alternating with the incumbent
    estimate: float | None = None  # no process of its own: the incumbent's figure x their ratio in the shared one
    pipeline_images_per_sec: float | None = None
    compile_s: float | None = None
    status: str = "pending"  # ok | excluded | failed | stopped early | skipped
    reason: str = ""
    read_back: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] | None = None

    @property
    def score(self) -> float:
        """Images/s comparable across processes: its own processes' mean, else the estimate."""
        if self.rounds:
            return float(np.mean(self.rounds))
        return self.estimate or (float(np.mean(self.together)) if self.together else 0.0)

    def row(self, chosen: ExecutionConfig | None, default_score: float) -> dict[str, Any]:
        return {"candidate": self.config.label(), "role": self.role,
                "images_per_sec": self.score or None,
                "rounds": " ".join([f"{v:.1f}" for v in self.rounds] + [f"~{v:.1f}" for v in self.together]),
                "vs_default": (self.score / default_score) if self.score and default_score else None,
                "pipeline_images_per_sec": self.pipeline_images_per_sec, "compile_s": self.compile_s,
                "status": self.status, "chosen": self.config == chosen and self.status == "ok",
                "why_excluded": self.reason, "onednn_read_back": self.read_back.get("onednn"),
                "inter_op_read_back": self.read_back.get("inter_op_threads")}


def _flat_update(gate: dict[str, Any]) -> np.ndarray:
    update = gate.get("first_update") or {}
    return np.concatenate([np.asarray(update[k], np.float64).ravel() for k in sorted(update)]) if update else np.zeros(0)


def gate_differences(candidate: dict[str, Any], reference: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Per gate output: (max|candidate - reference|, max|reference|); inf where the shapes differ."""
    losses_c, losses_r = list(candidate.get("train_losses") or []), list(reference.get("train_losses") or [])
    pairs = {"eval logits": (candidate.get("eval_logits"), reference.get("eval_logits")),
             "first loss": (losses_c[:1], losses_r[:1]), "first update": (_flat_update(candidate), _flat_update(reference)),
             "later losses": (losses_c[1:], losses_r[1:])}
    found = {}
    if candidate.get("eval_logits") is None:  # not computed: slower than the incumbent beside it (common.tuning)
        del pairs["eval logits"]
    for name, (ours, theirs) in pairs.items():
        ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
        if ours.shape != theirs.shape:
            found[name] = (float("inf"), 0.0)
        elif theirs.size:
            found[name] = (float(np.abs(ours - theirs).max()), float(np.abs(theirs).max()))
    return found


def gate_failures(candidate: dict[str, Any], reference: dict[str, Any], precision: str = "fp32") -> list[str]:
    """Why a candidate's gate outputs leave the tolerance around the reference's (empty: it passes)."""
    problems = []
    for name, (diff, scale) in gate_differences(candidate, reference).items():
        rtol = (FORWARD_RTOL if name in ("eval logits", "first loss") else UPDATE_RTOL)[precision]
        if not np.isfinite(diff) or diff > rtol * scale:
            problems.append(f"{name} differ from the reference's by {diff:.3g} (> {rtol:g} x {scale:.3g})")
    return problems


def _launch(base: RunSpec, request: dict[str, Any], config: ExecutionConfig, timeout_s: float,
            on_start: Callable[[int], None] | None = None) -> tuple[Any, list[str]]:
    """Run one ``tune`` worker process for ``request`` in ``config``'s environment; (its OUT or None, stderr tail)."""
    with tempfile.TemporaryDirectory(prefix="dualbench-tune-") as tmp:
        request_path, out, log = Path(tmp) / "request.json", Path(tmp) / "out.json", Path(tmp) / "stderr.log"
        request_path.write_text(json.dumps(request))
        argv = [sys.executable, *worker_command(base.backend), "tune", str(request_path), str(out)]
        outcome = run_process(argv, log_path=log, timeout_s=timeout_s, env=worker_env(config), on_start=on_start)
        if outcome.interrupted:
            raise KeyboardInterrupt
        tail = stderr_tail(log).strip().splitlines()
        if out.exists():
            return json.loads(out.read_text()), tail
        reason = outcome.signal_name or ("timed out" if outcome.timed_out else f"exit {outcome.returncode}")
        return {"status": "error", "error": f"worker ended ({reason}) without a result: "
                                            f"{tail[-1] if tail else ''}"[:300]}, []


def _with_tail(result: dict[str, Any], tail: list[str]) -> dict[str, Any]:
    if result.get("status") != "ok" and tail and "(stderr:" not in str(result.get("error")):
        result["error"] = f"{result.get('error')} (stderr: {tail[-1]})"
    return result


def run_candidate(base: RunSpec, config: ExecutionConfig, steps: tuple[int, int, int] = (GATE_STEPS, WARMUP_STEPS,
                  TIMED_STEPS), stop_below: float | None = None, timeout_s: float = 600) -> dict[str, Any]:
    """One candidate measured in its own worker process (the ``tune`` task, common.tuning).

    ``base``: the spec to measure (compare.tune_resolve.candidate_spec); ``steps``:
    (gate, warm-up, timed). The process gets ``config``'s environment (oneDNN,
    malloc). Returns the worker's result, or status "error" with the last line
    of its stderr when it wrote none. benchmarks/ reuse this.
    """
    gate, warmup, timed = steps
    request = {"spec": replace(base, execution=config).to_dict(), "gate_steps": gate, "warmup": warmup,
               "steps": timed, "stop_below": stop_below}
    result, tail = _launch(base, request, config, timeout_s)
    return _with_tail(result, tail)


def run_alternating(base: RunSpec, configs: list[ExecutionConfig], steps: tuple[int, int, int] = (GATE_STEPS,
                    WARMUP_STEPS, TIMED_STEPS), loser_fraction: float | None = None,
                    timeout_s: float = 900) -> list[dict[str, Any]]:
    """In-process variants measured alternately in one worker process (common.tuning.measure_alternating).

    ``configs`` differ only in in-process fields (``IN_PROCESS_FIELDS``);
    the process gets the first one's environment. One result per config, in
    order (each as run_candidate's, plus ``block_images_per_sec``).
    """
    process_fields = {name for name in ExecutionConfig.__dataclass_fields__ if name != "source"} - IN_PROCESS_FIELDS
    first = configs[0]
    for config in configs[1:]:
        if any(getattr(config, name) != getattr(first, name) for name in process_fields):
            raise ValueError(f"in-process variants must share the process settings: {config.label()} vs {first.label()}")
    gate, warmup, timed = steps
    request = {"specs": [replace(base, execution=c).to_dict() for c in configs], "gate_steps": gate,
               "warmup": warmup, "steps": timed, "rounds": ALTERNATION_ROUNDS, "loser_fraction": loser_fraction}
    return _per_variant(*_launch(base, request, first, timeout_s), len(configs))


def _per_variant(result: dict[str, Any], tail: list[str], count: int) -> list[dict[str, Any]]:
    """A ``specs`` worker's OUT as one result per variant, in order (its error for each where it wrote none);
    each variant also says whether its process ran ``paired`` (run_paired) or not (None)."""
    variants = result.get("variants") if result.get("status") == "ok" else None
    if not isinstance(variants, list) or len(variants) != count:
        return [_with_tail(dict(result), tail) for _ in range(count)]
    return [_with_tail({**variant, "paired": result.get("paired")}, tail) for variant in variants]


def run_paired(base: RunSpec, groups: list[list[ExecutionConfig]], steps: tuple[int, int, int] = (GATE_STEPS,
               WARMUP_STEPS, TIMED_STEPS), timeout_s: float = 900) -> list[list[dict[str, Any]]]:
    """Processes that differ in a process-level setting, measured in the same minutes (common.tuning.Turns).

    One worker process per group, all started at once: each builds and gates
    its group's variants (in-process variants of one configuration, as in
    run_alternating) while the others do, then they take turns, one round of
    timed blocks each, ABBA over ALTERNATION_ROUNDS rounds, the others idle.
    One list of results per group, in order; each result as run_alternating's.
    A process that ends early (crash, timeout) is marked gone here, so its
    partner finishes alone (its results then say ``paired`` False).
    """
    gate, warmup, timed = steps
    outcomes: list[tuple[Any, list[str]] | None] = [None] * len(groups)
    pids: list[int] = []
    with tempfile.TemporaryDirectory(prefix="dualbench-pair-") as folder:
        names = [f"p{index}" for index in range(len(groups))]

        def one(index: int) -> None:
            configs = groups[index]
            request = {"specs": [replace(base, execution=c).to_dict() for c in configs], "gate_steps": gate,
                       "warmup": warmup, "steps": timed, "rounds": ALTERNATION_ROUNDS, "loser_fraction": None,
                       "turns": {"folder": folder, "name": names[index], "names": names}}
            try:
                outcomes[index] = _launch(base, request, configs[0], timeout_s, on_start=pids.append)
            except KeyboardInterrupt:
                outcomes[index] = None
            finally:
                try:  # its partner stops waiting for it, however it ended
                    Path(folder, f"gone-{names[index]}").write_text("ended")
                except OSError:  # the folder is gone: interrupted
                    pass

        threads = [threading.Thread(target=one, args=(index,), daemon=True) for index in range(len(groups))]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.2)
        except KeyboardInterrupt:
            for pid in pids:
                try:
                    os.killpg(pid, signal.SIGTERM)
                except OSError:
                    pass
            raise
    return [_per_variant(*(outcome or ({"status": "error", "error": "interrupted"}, [])), len(configs))
            for configs, outcome in zip(groups, outcomes)]


class Search:
    """One (backend, model, ...) search; ``measure`` runs a candidate process (injectable for tests)."""

    def __init__(self, base: RunSpec, *, budget_s: float = DEFAULT_BUDGET_S, inherited: ExecutionConfig | None = None,
                 pins: dict[str, Any] | None = None, quick: bool = False,
                 log: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)):
        self.base, self.budget_s, self.inherited, self.log = base, budget_s, inherited, log
        self.space = search_space(base.backend)
        self.pins = dict(pins or {})  # field -> value the user fixed (e.g. channels_last)
        self.steps = (2, 0, 4) if quick else (GATE_STEPS, WARMUP_STEPS, TIMED_STEPS)
        self.precision = base.precision
        self.candidates: list[Candidate] = []
        self.started = 0.0
        self.device_type: str | None = None
        self.durations: list[float] = []  # wall seconds of each candidate process (startup included)
        self.challengers = 0  # challengers measured (the budget never skips the first)
        self.decided: set[str] = set()  # in-process dimensions decided beside a process-level challenger
        self.cut = False  # a dimension did not fit the budget: the later ones (smaller effects) are not tried

    # -- measuring ------------------------------------------------------------------
    def _pinned(self, config: ExecutionConfig) -> ExecutionConfig:
        return config.replace(**self.pins) if self.pins else config

    def measure(self, config: ExecutionConfig, stop_below: float | None) -> dict[str, Any]:
        """Run the candidate's worker process and return its result (status error if none)."""
        return run_candidate(self.base, config, self.steps, stop_below)

    def measure_together(self, configs: list[ExecutionConfig], loser_fraction: float | None) -> list[dict[str, Any]]:
        """Run in-process variants alternately in one worker process; one result per config, in order."""
        return run_alternating(self.base, configs, self.steps, loser_fraction)

    def measure_paired(self, groups: list[list[ExecutionConfig]]) -> list[list[dict[str, Any]]]:
        """Run one process per group at the same time, taking turns (run_paired); results per group, in order."""
        return run_paired(self.base, groups, self.steps)

    def _run_pair(self, incumbent: Candidate, group: list[Candidate]) -> tuple[float | None, list[float | None]]:
        """The incumbent in a process of its own beside ``group``'s process (a process-level challenger first,
        then in-process variants of it), timed in turns in the same minutes: (the incumbent's images/s, each of
        ``group``'s), None where one failed or left the gate."""
        self.log(f"  tune {self.base.backend} {self.base.model}: in turns: {incumbent.config.label()} "
                 f"({incumbent.role}) | " + " + ".join(f"{c.config.label()} ({c.role})" for c in group))
        began = time.monotonic()
        mine, theirs = self.measure_paired([[incumbent.config], [c.config for c in group]])
        self.durations.append(time.monotonic() - began)
        [own] = self._take_each([incumbent], mine, first_alone=True)
        return own, self._take_each(group, theirs, first_alone=True)

    def _run(self, candidate: Candidate) -> Candidate:
        self.log(f"  tune {self.base.backend} {self.base.model}: {candidate.config.label()} ({candidate.role})")
        began = time.monotonic()
        result = self.measure(candidate.config, None)
        self.durations.append(time.monotonic() - began)
        return self._take(candidate, result)

    def _run_together(self, candidates: list[Candidate], loser_fraction: float | None,
                      first_alone: bool = False) -> list[float | None]:
        """Measure ``candidates`` alternately in one process; each one's images/s in that process (None: failed).
        ``first_alone``: the process is the first one's own (a process-level challenger's): its figure counts
        as a measurement in a process of its own, comparable with other processes."""
        self.log(f"  tune {self.base.backend} {self.base.model}: alternating in one process: "
                 + " | ".join(f"{c.config.label()} ({c.role})" for c in candidates))
        began = time.monotonic()
        results = self.measure_together([c.config for c in candidates], loser_fraction)
        self.durations.append(time.monotonic() - began)
        return self._take_each(candidates, results, first_alone)

    def _take_each(self, candidates: list[Candidate], results: list[dict[str, Any]],
                   first_alone: bool) -> list[float | None]:
        """``_take`` each of one process's results (the first: its own figure where ``first_alone``, the others
        measured beside it); each one's images/s there, None where it failed or left the gate."""
        found = []
        for index, (candidate, result) in enumerate(zip(candidates, results)):
            self._take(candidate, result, together=not (first_alone and index == 0))
            ok = result.get("status") == "ok" and result.get("images_per_sec") and candidate.status == "ok"
            found.append(float(result["images_per_sec"]) if ok else None)
        return found

    def _take(self, candidate: Candidate, result: dict[str, Any], together: bool = False) -> Candidate:
        """Record one measurement of ``candidate`` (``together``: alternating in a shared process) and gate it."""
        if result.get("status") != "ok" or not result.get("images_per_sec"):
            if not (candidate.rounds or candidate.together):  # a candidate measured before keeps its status
                candidate.status, candidate.reason = "failed", str(result.get("error") or "no measurement")[:300]
            return candidate
        (candidate.together if together else candidate.rounds).append(float(result["images_per_sec"]))
        candidate.pipeline_images_per_sec = result.get("pipeline_images_per_sec")
        candidate.compile_s = result.get("compile_s")
        candidate.read_back = result.get("settings") or {}
        candidate.gate = result.get("gate")
        self.device_type = self.device_type or candidate.read_back.get("device_type")
        reference = self.candidates[0] if self.candidates else candidate
        problems = [] if reference is candidate else gate_failures(candidate.gate or {}, reference.gate or {},
                                                                  self.precision)
        candidate.status = "excluded" if problems else ("stopped early" if result.get("stopped_early") else "ok")
        candidate.reason = "; ".join(problems)
        if not problems and reference is not candidate and (candidate.gate or {}).get("eval_logits") is None:
            candidate.reason = "eval-mode logits not compared: slower than the incumbent beside it"
        return candidate

    def _known(self, config: ExecutionConfig) -> Candidate | None:
        return next((c for c in self.candidates if c.config == config), None)

    # -- the search -------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Measure, decide, and return the search record (choice + table)."""
        self.started = time.monotonic()
        same = self.space.reference == self.space.start
        reference = Candidate(self._pinned(self.space.reference), "reference, framework default" if same else "reference")
        self.candidates.append(reference)
        dimensions = list(self.space.dimensions)
        incumbent = reference
        if dimensions and dimensions[0].in_process and self._values(dimensions[0], reference):
            # the reference's process also decides the first in-process dimension (torch: the memory format,
            # in eager): its variants share the reference's process settings, one process fewer
            incumbent = self._try_together(dimensions.pop(0), reference, dimensions)
            if reference.status == "failed":  # a variant beside it may have ended the process: alone, once
                reference.status, reference.reason = "pending", ""
                incumbent = self._run(reference)
        else:
            self._run(reference)
        if reference.status != "ok":
            return self._record(None, f"the reference configuration failed ({reference.reason}): no gate, no search")
        fallback = self._from_starts(incumbent)
        incumbent = self._inherited_start(fallback)
        for index, dimension in enumerate(dimensions):
            later = dimensions[index + 1:]
            if dimension.field in self.decided or not self._values(dimension, incumbent):
                continue
            if dimension.in_process:
                incumbent = self._try_together(dimension, incumbent, later)
            else:  # (an inherited start not measured yet is measured in the pair, beside the challenger)
                host = later[0] if later and later[0].in_process else None
                incumbent = self._try_dimension(dimension, incumbent, later, host)
            incumbent = self._unless_failed(incumbent, fallback, dimension, later)
        if incumbent.status == "pending":
            self._run(incumbent)
            incumbent = incumbent if incumbent.status == "ok" else fallback
        return self._record(incumbent.config, "")

    def _inherited_start(self, incumbent: Candidate) -> Candidate:
        """A later model takes the machine-level settings an earlier model's search chose (``per_model=False``:
        allocator, oneDNN, tf.data's pool), which it does not search again, on top of ``incumbent`` (its
        reference, or what the reference's own process chose). Not measured here: the next dimension measures
        it (an in-process one beside its variants). ``incumbent`` itself when those are its settings already."""
        if self.inherited is None:
            return incumbent
        machine = {d.field: getattr(self.inherited, d.field) for d in self.space.dimensions
                   if not d.per_model and d.field not in self.pins}
        config = incumbent.config.replace(**machine)
        if config == incumbent.config:
            return incumbent
        start = self._known(config) or Candidate(config, "inherited")
        if start not in self.candidates:
            self.candidates.append(start)
        return start

    def _from_starts(self, incumbent: Candidate) -> Candidate:
        """The framework's own defaults, where they are not the reference: measured, the start if faster."""
        config = self._pinned(self.space.start)
        if self._known(config) is None:
            candidate = self._run(Candidate(config, "framework default"))
            self.candidates.append(candidate)
            if candidate.status == "ok" and candidate.score > incumbent.score:
                return candidate
        return incumbent

    def _unless_failed(self, incumbent: Candidate, fallback: Candidate, dimension: Dimension,
                       later: list[Dimension]) -> Candidate:
        """An inherited start that failed or left the gate where it was first measured: the search goes on
        from ``fallback`` (what it started from), this dimension again."""
        if incumbent.status in ("ok", "pending") or incumbent is fallback:
            return incumbent
        self.log(f"  tune {self.base.backend} {self.base.model}: {incumbent.config.label()} {incumbent.status} "
                 f"({incumbent.reason}): on from {fallback.config.label()}")
        if dimension.in_process:
            return self._try_together(dimension, fallback, later)
        return self._try_dimension(dimension, fallback, later)

    def _values(self, dimension: Dimension, incumbent: Candidate) -> list[Any]:
        """The values to try: not pinned, not the incumbent's own (effective) value, within the cores."""
        if dimension.field in self.pins or (dimension.cpu_only and self.device_type == "gpu"):
            return []
        if self.inherited is not None and not dimension.per_model:
            return []
        current = getattr(incumbent.config, dimension.field)
        values = []
        for value in dimension.values:
            if dimension.field == "inter_op_threads" and value is not None and value >= usable_cores():
                continue  # no more inter-op threads than cores; the default is one per core
            if value == current or (current is None and value == incumbent.read_back.get(dimension.field)):
                continue  # the framework's default is this value here (read back)
            values.append(value)
        return values

    def _over_budget(self, processes: float = 1.0) -> bool:
        """Whether ``processes`` more candidate processes would end after the budget (each: the median so far)."""
        typical = float(np.median(self.durations)) if self.durations else 0.0
        return time.monotonic() - self.started + processes * typical > self.budget_s

    @staticmethod
    def _cost(configs: list[ExecutionConfig]) -> float:
        """A process building ``configs``, in candidate processes (each variant one, a compiling one more)."""
        return sum(COMPILED_VARIANT_COST if c.mode in COMPILING_MODES else 1.0 for c in configs)

    def _try_dimension(self, dimension: Dimension, incumbent: Candidate, later: list[Dimension] | None = None,
                       host: Dimension | None = None) -> Candidate:
        """A process-level dimension: for each other value, a challenger process and the incumbent's own
        process at the same time, timed in turns (``_run_pair``): the challenger wins when it is at least
        MIN_GAIN faster than the incumbent in the same minutes. ``host``: the in-process dimension that
        follows; the challenger's process also holds its variants (built beside the challenger, timed
        alternately), and when the challenger wins, ``host`` is decided in that process (``self.decided``):
        a process fewer where a process-level setting wins (TensorFlow's oneDNN on an AVX2 CPU)."""
        for value in self._values(dimension, incumbent):
            config = incumbent.config.replace(**{dimension.field: value})
            challenger, beside, speeds = self._known(config), [], []
            if challenger is not None:  # measured before (another path): its figures against the incumbent's
                if challenger.status == "ok" and incumbent.status == "ok" and \
                        challenger.score >= incumbent.score * (1 + MIN_GAIN):
                    incumbent = challenger
                continue
            challenger = Candidate(config, f"{dimension.field}={value}")
            self.candidates.append(challenger)
            beside = self._variants(host, challenger) if host is not None else []
            if self.challengers and beside and self._over_budget(self._pair_cost([config, *(c.config for c in beside)])):
                beside = []  # the variants do not fit beside it: the challenger alone, if it fits
            if self.cut or (self.challengers and self._over_budget(self._pair_cost([config, *(c.config for c in beside)]))):
                challenger.status, challenger.reason = "skipped", f"search budget ({self.budget_s:.0f} s) spent"
                self.cut = True
                continue
            self.challengers += 1 + len(beside)
            self.candidates += [c for c in beside if c not in self.candidates]
            own, speeds = self._run_pair(incumbent, [challenger, *beside])
            if incumbent.status not in ("ok", "stopped early") or not own:
                return incumbent  # the incumbent failed or left the gate beside it (an inherited start): the caller
            if speeds[0] is None:
                continue
            if speeds[0] >= own * (1 + MIN_GAIN):
                incumbent = self._best_beside(challenger, beside, speeds) if beside else challenger
                if beside:
                    self.decided.add(host.field)
        return incumbent

    @classmethod
    def _pair_cost(cls, configs: list[ExecutionConfig]) -> float:
        """A challenger's process building ``configs`` and the incumbent's process beside it (``_cost``)."""
        return cls._cost(configs) + PAIR_PARTNER_COST

    def _variants(self, dimension: Dimension, incumbent: Candidate) -> list[Candidate]:
        """``incumbent`` with each other value of the in-process ``dimension`` (known candidates reused)."""
        variants = []
        for value in self._values(dimension, incumbent):
            config = incumbent.config.replace(**{dimension.field: value})
            variants.append(self._known(config) or Candidate(config, f"{dimension.field}={value}"))
        return variants

    def _try_together(self, dimension: Dimension, incumbent: Candidate, later: list[Dimension]) -> Candidate:
        """An in-process dimension: the incumbent and each of the dimension's other values, alternately in one
        process (common.tuning.measure_alternating); the fastest correct one replaces the incumbent when it is
        at least MIN_GAIN faster than the incumbent in that same process."""
        challengers = self._variants(dimension, incumbent)
        if not challengers:
            return incumbent
        self.candidates += [c for c in challengers if c not in self.candidates]
        # the shared process builds every variant (a compiled one: a cold compile, ``_cost``)
        if self.cut or (self.challengers and self._over_budget(self._cost([incumbent.config,
                                                                           *(c.config for c in challengers)]))):
            for challenger in challengers:
                if not challenger.rounds:
                    challenger.status, challenger.reason = "skipped", f"search budget ({self.budget_s:.0f} s) spent"
            self.cut = True
            return incumbent
        self.challengers += len(challengers)
        speeds = self._run_together([incumbent, *challengers], loser_fraction=LOSER_FRACTION)
        return self._best_beside(incumbent, challengers, speeds)

    def _best_beside(self, incumbent: Candidate, challengers: list[Candidate], speeds: list[float | None]) -> Candidate:
        """From one shared process's figures (``speeds``: the incumbent's, then each challenger's): the fastest
        correct one, where it is at least MIN_GAIN faster than the incumbent there; each challenger gets its
        estimate, comparable with other processes through the incumbent's own figure."""
        own = speeds[0] if speeds else None
        if not own:  # the incumbent failed beside them: nothing to compare with in this process
            return incumbent
        best, best_speed = incumbent, own * (1 + MIN_GAIN)
        for challenger, speed in zip(challengers, speeds[1:]):
            if speed is None:
                continue
            if not challenger.rounds:
                challenger.estimate = incumbent.score * speed / own
            if speed >= best_speed:
                best, best_speed = challenger, speed
        return best

    def _record(self, choice: ExecutionConfig | None, note: str) -> dict[str, Any]:
        default = self._known(self._pinned(self.space.start)) or self.candidates[0]
        chosen = next((c for c in self.candidates if c.config == choice), None)
        return {"backend": self.base.backend, "model": self.base.model, "precision": self.base.precision,
                "batch_size": self.base.recipe.batch_size, "device": self.base.device,
                "choice": choice.to_dict() if choice else None,
                "choice_label": choice.label() if choice else None,
                "chosen_images_per_sec": chosen.score if chosen else None,
                "default_images_per_sec": default.score or None,
                "searched_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "elapsed_s": round(time.monotonic() - self.started, 1), "budget_s": self.budget_s,
                "complete": not any(c.status == "skipped" for c in self.candidates),
                "gate_rtol": {"forward": FORWARD_RTOL[self.precision], "update": UPDATE_RTOL[self.precision]},
                "note": note,
                "rows": [c.row(choice, default.score) for c in self.candidates]}


def is_real(backend: str) -> bool:
    return backend in REAL_BACKENDS
