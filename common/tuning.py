"""One candidate of the execution-configuration search, measured in its own worker process.

``python -m <backend>.worker tune REQUEST.json OUT.json`` (compare.tune starts
it) builds the run exactly as a training run would (``common.worker.build``:
setup with the candidate's ``RunSpec.execution``, the dataset, the model with
the seed's initial weights, the train step) and then, in this order:

1. correctness outputs for the gate, from that fixed state: eval-mode logits
   of the first evaluation batch (the candidate's own eval step), the losses
   of the first ``gate_steps`` training steps on the sampler's first batches
   (training-mode forward + backward + update, compiled as the candidate
   compiles them; the first loss is the training-mode forward of the initial
   weights), and the first update itself (every canonical weight tensor,
   BN statistics included, sampled at ``SAMPLES_PER_TENSOR`` evenly spaced
   positions, after minus before);
2. throughput: ``warmup`` untimed steps, then up to ``steps`` timed steps with
   the same clock rules as common.loop (the batch comes from the real
   pipeline, which keeps running as in training; ``synchronize()`` before
   every clock read; the first step of the process, a gate step, is the
   compile step). The score is the median of the per-step images/s, the
   figure a run reports as ``train_img_s``. Once ``min_steps`` are timed,
   a candidate whose running median is below ``stop_below`` images/s stops
   early: it has lost clearly.

The OUT file holds the measurements, the gate outputs and the settings read
back from the framework (the audit), which say what really ran.

In-process variants (``measure_alternating``: configurations that differ
only in what the backend applies inside the process, execution mode and
memory format) are measured in one process, alternately: each variant is
built and gated as above, then timed in blocks in ABBA order, so that the
choice between them is not left to process-to-process noise (10-20% on a
shared machine, more than the differences the search has to resolve).

Paired processes (``Turns``: configurations that differ in a process-level
setting, the allocator or oneDNN, which only a process of its own can hold)
run at the same time and take turns: each builds and gates its variants,
waits until the other is ready, then times its blocks only in its own turns,
in ABBA order over the rounds (A B | B A | A B | B A), the other one waiting
idle. The two are compared on figures from the same minutes, as in-process
variants are; anything a process does after its last block (deferred eval
logits, writing, exiting) waits until both have finished timing.
"""
from __future__ import annotations

import itertools
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from common.config import RunSpec
from common.results import write_json_atomic
from common.sampler import epoch_plan

MIN_TIMED_STEPS = 3  # timed steps before a candidate may stop early
# In-process variants: timed blocks in ABBA order (forward, then backward, ...). Four rounds of short blocks
# rather than two long ones: a burst of load from a neighbour on a shared machine then falls on one short
# block of a variant, a quarter of its timed steps, and its median holds; with two blocks it fell on half of
# one variant's steps (benchmarks/tune_budget.py and benchmarks/machine_noise.py measure both).
ALTERNATION_ROUNDS = 4


SAMPLES_PER_TENSOR = 256  # values of each weight tensor compared by the gate (evenly spaced)


def weight_sample(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Evenly spaced values of every canonical weight tensor (BN statistics included)."""
    sample = {}
    for name, value in weights.items():
        flat = np.asarray(value, np.float64).ravel()
        sample[name] = flat[np.linspace(0, flat.size - 1, min(flat.size, SAMPLES_PER_TENSOR)).astype(np.int64)]
    return sample


def _first_eval_batch(backend: Any) -> Any:
    for images, _labels in backend.eval_batches():
        return images
    raise ValueError("the evaluation split is empty")


def _training_batches(backend: Any, spec: RunSpec, num_train: int):
    """The sampler's batches, epoch after epoch, through the backend's real pipeline."""
    batch = spec.recipe.batch_size
    for epoch in itertools.count():
        plan = epoch_plan(spec.seed, epoch, num_train, batch, augment=spec.recipe.augment,
                          crop_padding=spec.recipe.crop_padding, horizontal_flip=spec.recipe.horizontal_flip)
        yield from backend.train_batches(plan)


def prepare_candidate(backend: Any, spec: RunSpec, gate_steps: int, eval_now: bool = True) -> dict[str, Any]:
    """Build ``spec`` on ``backend`` and compute its gate outputs from the initial state (step 1 above).

    ``eval_now`` False: the eval-mode logits wait (``_deferred_eval``, from the initial weights kept here):
    a compiled eval step is a second cold compile, paid only by a variant that can win.
    """
    from common.worker import build

    built = build(backend, spec)
    model, train_step, dataset = built["model"], built["train_step"], built["dataset"]
    eval_step = backend.make_eval_step(model)
    lr = spec.recipe.lr
    eval_images = _first_eval_batch(backend)
    logits_before, eval_compile_s, kept = None, None, None
    if eval_now:
        t0 = time.perf_counter()
        logits_before = backend.to_numpy(eval_step(eval_images)).astype(np.float32).tolist()
        eval_compile_s = time.perf_counter() - t0
    else:
        kept = backend.get_weights(model)  # every canonical tensor, BN statistics included
    batches = _training_batches(backend, spec, len(dataset.train_labels))
    losses, compile_s, first_update = [], None, {}
    initial = weight_sample(kept if kept is not None else backend.get_weights(model))
    for index in range(max(1, gate_steps)):
        images, labels = next(batches)
        backend.synchronize()
        t0 = time.perf_counter()
        loss, _correct = train_step(images, labels, lr)
        losses.append(float(backend.to_numpy(loss)))  # a host read: waits for the step
        if index == 0:
            compile_s = time.perf_counter() - t0
        if index == 0:  # the first update: gradients, optimizer and BN statistics from the initial state
            after = weight_sample(backend.get_weights(model))
            first_update = {name: (after[name] - initial[name]).tolist() for name in sorted(initial)}
    return {"backend": backend, "spec": spec, "train_step": train_step, "batches": batches, "built": built,
            "compile_s": compile_s, "eval_compile_s": eval_compile_s, "eval_step": eval_step,
            "eval_images": eval_images, "initial_weights": kept,
            "gate": {"eval_logits": logits_before, "train_losses": losses, "first_update": first_update}}


def _deferred_eval(state: dict[str, Any]) -> None:
    """The eval-mode logits of the initial state (gate step 1), after the timing: the initial weights back
    in the model, then the variant's own eval step."""
    backend, model = state["backend"], state["built"]["model"]
    backend.set_weights(model, state["initial_weights"])
    t0 = time.perf_counter()
    state["gate"]["eval_logits"] = backend.to_numpy(state["eval_step"](state["eval_images"])).astype(np.float32).tolist()
    state["eval_compile_s"] = time.perf_counter() - t0


def warm_steps(state: dict[str, Any], steps: int) -> None:
    for _ in range(steps):
        state["train_step"](*next(state["batches"]), state["spec"].recipe.lr)


def timed_steps(state: dict[str, Any], steps: int, stop_below: float | None = None) -> tuple[list[float], bool]:
    """Up to ``steps`` timed steps (step 2 above); (their seconds, whether it stopped early)."""
    backend, train_step, lr = state["backend"], state["train_step"], state["spec"].recipe.lr
    batch, timed = state["spec"].recipe.batch_size, []
    for _ in range(steps):
        images, labels = next(state["batches"])
        backend.synchronize()  # the batch is produced; its work is not charged to the step
        t0 = time.perf_counter()
        train_step(images, labels, lr)
        backend.synchronize()
        timed.append(time.perf_counter() - t0)
        if stop_below and len(timed) >= MIN_TIMED_STEPS and batch / statistics.median(timed) < stop_below:
            return timed, True
    return timed, False


def _result(state: dict[str, Any], timed: list[float], wall: float, stopped_early: bool,
            blocks: list[list[float]] | None = None) -> dict[str, Any]:
    batch, built = state["spec"].recipe.batch_size, state["built"]
    result = {"os_threads": _os_threads(), "status": "ok",
              "images_per_sec": batch / statistics.median(timed) if timed else None,
              "pipeline_images_per_sec": batch * len(timed) / wall if timed and wall > 0 else None,
              "step_times_s": timed, "stopped_early": stopped_early, "compile_s": state["compile_s"],
              "eval_compile_s": state["eval_compile_s"], "settings": built["settings"],
              "effective": built["effective"], "gate": state["gate"]}
    if blocks is not None:  # in-process alternation: the median images/s of each block, in order
        result["block_images_per_sec"] = [batch / statistics.median(b) for b in blocks if b]
    return result


def measure_candidate(backend: Any, spec: RunSpec, *, gate_steps: int, warmup: int, steps: int,
                      stop_below: float | None = None) -> dict[str, Any]:
    """Gate outputs and steady-state throughput of ``spec`` (its ``execution`` set) in this process."""
    state = prepare_candidate(backend, spec, gate_steps)
    warm_steps(state, warmup)
    started = time.perf_counter()
    timed, stopped_early = timed_steps(state, steps, stop_below)
    return _result(state, timed, time.perf_counter() - started, stopped_early)


TURN_POLL_S = 0.005  # how often a waiting process looks whether its turn has come (idle otherwise)
TURN_TIMEOUT_S = 600.0  # a partner silent this long is taken as gone: this process goes on alone


class Turns:
    """Turn-taking between the processes of a pair (or more), through files in a shared folder.

    ``names``: the processes, in the order of the first round; round r runs them
    in that order when r is even, reversed when odd (ABBA). A process marks
    itself ready once built, waits for the others, and before each of its
    rounds waits until the shared counter points at its own turn; after the
    round it moves the counter on. A process that ends (finished or failed)
    marks itself gone, and the others stop waiting for it; so does one that
    stays silent for ``TURN_TIMEOUT_S``. ``paired``: whether every turn of
    this process ran with its partners present.
    """

    def __init__(self, folder: str, name: str, names: list[str], rounds: int):
        self.folder, self.name, self.names, self.rounds = Path(folder), name, list(names), rounds
        self.sequence = [n for r in range(rounds) for n in (self.names if r % 2 == 0 else self.names[::-1])]
        self.paired = True

    @classmethod
    def from_request(cls, raw: dict[str, Any] | None, rounds: int) -> "Turns | None":
        return cls(raw["folder"], raw["name"], raw["names"], rounds) if raw else None

    def _mark(self, what: str) -> None:
        (self.folder / f"{what}-{self.name}").write_text("")

    def _gone(self, name: str) -> bool:
        return (self.folder / f"gone-{name}").exists()

    def _counter(self) -> int:
        try:
            return int((self.folder / "turn").read_text() or 0)
        except (OSError, ValueError):
            return 0

    def _set(self, value: int) -> None:
        tmp = self.folder / f"turn.{self.name}.tmp"
        tmp.write_text(str(value))
        os.replace(tmp, self.folder / "turn")

    def _wait(self, done: Any) -> None:
        deadline = time.monotonic() + TURN_TIMEOUT_S
        while not done():
            if time.monotonic() > deadline:
                self.paired = False
                for name in self.names:
                    if name != self.name:
                        (self.folder / f"gone-{name}").write_text("silent")
                return
            time.sleep(TURN_POLL_S)

    def ready(self) -> None:
        """Built and gated: wait until every partner is too (or gone)."""
        self._mark("ready")
        self._wait(lambda: all((self.folder / f"ready-{n}").exists() or self._gone(n) for n in self.names))

    def begin(self, round_index: int) -> None:
        """Wait for this process's turn in round ``round_index``, moving past the turns of partners gone."""
        mine = [k for k, n in enumerate(self.sequence) if n == self.name][round_index]

        def my_turn() -> bool:
            current = self._counter()
            while current < mine and self._gone(self.sequence[current]):
                current += 1
                self.paired = False
                self._set(current)
            return current >= mine
        self._wait(my_turn)

    def end(self, round_index: int) -> None:
        mine = [k for k, n in enumerate(self.sequence) if n == self.name][round_index]
        self._set(mine + 1)

    def finish(self) -> None:
        """After this process's last round: wait until the partners have timed theirs (nothing of this
        process may run beside their timed steps), then mark this one gone."""
        def all_done() -> bool:
            current = self._counter()
            while current < len(self.sequence) and self._gone(self.sequence[current]):
                current += 1
            return current >= len(self.sequence)
        self._wait(all_done)
        self.leave()

    def leave(self) -> None:
        try:
            self._mark("gone")
        except OSError:
            pass


def measure_alternating(backend_name: str, specs: list[RunSpec], *, gate_steps: int, warmup: int, steps: int,
                        rounds: int = ALTERNATION_ROUNDS, loser_fraction: float | None = None,
                        turns: Turns | None = None) -> list[dict[str, Any]]:
    """Several in-process variants of one configuration, measured alternately in this process.

    ``specs`` differ only in what a backend applies in-process (execution mode,
    memory format): the process-level settings (oneDNN, allocator, inter-op
    pool) are the process's own and the same for all. Each variant gets its
    own backend object, model and train step, and its gate outputs from the
    initial state (step 1 above); then ``rounds`` rounds of timed blocks,
    in ABBA order (forward, then backward, ...), each block ``warmup`` untimed
    steps (the first step after a switch pays for the other variant's
    caches) then ``steps // rounds`` timed steps. A variant's figure is the
    median over all its timed steps; ``block_images_per_sec`` keeps each
    block's. After the first half of the rounds (one forward and one backward
    pass where there are four), a variant below ``loser_fraction`` of the
    first variant (the incumbent) stops. The eval-mode logits of the gate
    (a second cold compile for a compiled variant) are computed for the first
    variant, and for another only where it ran faster than the first (it can
    win; ``_deferred_eval``); a slower one's are None (it cannot be chosen).
    A variant that fails to build or to run is an error result; the others
    go on. ``turns``: this process is one of a pair (``Turns``): each round's
    blocks run in this process's turn only, and nothing runs after the last
    until the partner has timed its own; no variant stops early then.
    """
    from common.registry import get_backend

    states: list[dict[str, Any] | None] = []
    results: list[dict[str, Any] | None] = []
    for index, spec in enumerate(specs):
        backend = get_backend(backend_name)
        try:
            states.append(prepare_candidate(backend, spec, gate_steps, eval_now=index == 0))
            results.append(None)
        except Exception as exc:  # noqa: BLE001 - recorded, the other variants go on
            traceback.print_exc(file=sys.stderr)
            states.append(None)
            results.append(_error(backend, exc))
    per_block = max(1, steps // max(1, rounds))
    blocks: list[list[list[float]]] = [[] for _ in specs]
    spans: list[list[tuple[float, float]]] = [[] for _ in specs]  # each block's (start, end), system-wide clock
    walls, stopped = [0.0] * len(specs), [False] * len(specs)
    if turns is not None:
        turns.ready()
    for round_index in range(max(1, rounds)):
        if turns is not None:
            turns.begin(round_index)
        order = list(range(len(specs)))
        for index in (order if round_index % 2 == 0 else order[::-1]):
            state = states[index]
            if state is None or results[index] is not None or stopped[index]:
                continue
            try:
                began = time.monotonic()
                warm_steps(state, warmup)
                started = time.perf_counter()
                timed, _ = timed_steps(state, per_block)
                walls[index] += time.perf_counter() - started
                blocks[index].append(timed)
                spans[index].append((began, time.monotonic()))
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc(file=sys.stderr)
                results[index] = _error(state["backend"], exc)
        if turns is not None:
            turns.end(round_index)
        if round_index == max(0, rounds // 2 - 1) and loser_fraction and blocks[0] and turns is None:
            first = _speed(states[0], blocks[0])
            for index in range(1, len(specs)):
                if blocks[index] and _speed(states[index], blocks[index]) < loser_fraction * first:
                    stopped[index] = True
    if turns is not None:
        turns.finish()
    first = _speed(states[0], blocks[0])
    for index, state in enumerate(states):
        if results[index] is None and state is not None:
            if state["gate"]["eval_logits"] is None and not stopped[index] and first and _speed(state, blocks[index]) > first:
                try:  # faster than the first variant (the incumbent): it can win, so the whole gate
                    _deferred_eval(state)
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc(file=sys.stderr)
                    results[index] = _error(state["backend"], exc)
                    continue
            timed = [t for block in blocks[index] for t in block]
            results[index] = _result(state, timed, walls[index], stopped[index], blocks[index])
            results[index]["block_spans_s"] = spans[index]  # CLOCK_MONOTONIC: comparable across processes
    return [r or {"status": "error", "error": "not measured"} for r in results]


def _speed(state: dict[str, Any] | None, blocks: list[list[float]]) -> float:
    """Median images/s over a variant's timed steps so far."""
    timed = [t for block in blocks for t in block]
    return state["spec"].recipe.batch_size / statistics.median(timed) if state and timed else 0.0


def _os_threads() -> int | None:
    """Threads this process has started by now (thread pools of the framework, tf.data, Python)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # not Linux
        return None


def _error(backend: Any, exc: Exception) -> dict[str, Any]:
    status = "oom" if backend.is_out_of_memory(exc) else "error"
    return {"status": status, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}


def run_tune_request(backend_name: str, request_path: str, out_path: str) -> int:
    """The ``tune`` worker task: measure the request's candidate(s), write the result to ``out_path``.

    REQUEST: ``{"spec": RunSpec dict, "gate_steps": int, "warmup": int, "steps": int,
    "stop_below": float | null}`` for one candidate, or ``"specs": [RunSpec dict, ...]`` (with
    ``"rounds"`` and ``"loser_fraction"``) for in-process variants measured alternately; the
    result then is ``{"status": "ok", "variants": [result, ...], "paired": ...}`` in the request's
    order. With ``"turns": {"folder", "name", "names"}`` the process is one of a pair (``Turns``);
    ``paired`` says whether every turn ran with its partner present.
    Failures are results too (status error / oom, one line).
    """
    request = json.loads(Path(request_path).read_text())
    from common.registry import get_backend

    counts = {"gate_steps": int(request["gate_steps"]), "warmup": int(request["warmup"]), "steps": int(request["steps"])}
    if "specs" in request:
        specs = [RunSpec.from_dict(raw) for raw in request["specs"]]
        rounds = int(request.get("rounds") or ALTERNATION_ROUNDS)
        turns = Turns.from_request(request.get("turns"), rounds)
        try:
            variants = measure_alternating(backend_name, specs, rounds=rounds,
                                           loser_fraction=request.get("loser_fraction"), turns=turns, **counts)
        finally:
            if turns is not None:
                turns.leave()  # a partner stops waiting for this process, however it ended
        write_json_atomic(out_path, {"status": "ok", "variants": variants,
                                     "paired": turns.paired if turns is not None else None})
        return 0 if all(v.get("status") == "ok" for v in variants) else 1
    spec = RunSpec.from_dict(request["spec"])
    backend = get_backend(backend_name)
    try:
        result = measure_candidate(backend, spec, stop_below=request.get("stop_below"), **counts)
        code = 0
    except Exception as exc:  # recorded for the search table: a candidate that cannot run is excluded
        traceback.print_exc(file=sys.stderr)  # the parent keeps the tail of stderr
        result = _error(backend, exc)
        code = 1
    write_json_atomic(out_path, result)
    return code
