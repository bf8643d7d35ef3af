"""ONE timed training loop for both backends.

What is timed, and where the clock is read:

* ``backend.synchronize()`` runs before every ``perf_counter()`` read, so a
  timed interval covers its device work, not just its launch.
* Step time (compute-only) = from just before the step call to after its
  synchronize. The batch is fetched from the pipeline and then synchronized
  BEFORE ``t0``: torch builds batches lazily on the device (gather, flip,
  normalise are queued kernels) while tf.data hands over finished, prefetched
  batches, so without that synchronize torch's batch production would be
  charged to its compute step and TensorFlow's would not.
* Epoch train time (pipeline-inclusive) = from just before the epoch's pipeline
  is built to after it is torn down (``_close``): build AND teardown are counted
  on both sides (tf.data's teardown cancels prefetch threads; torch's closes a
  generator), because a user of either framework's own epoch loop pays both
  every epoch. Evaluation is timed separately and excluded.
* The run's first step in this process is the compile step (tracing, XLA /
  inductor compilation, cuDNN autotune): reported as ``compile_s``, excluded
  from throughput along with the next ``spec.warmup_steps`` steps. A resumed
  run compiles again, so the count restarts with every process.
* Pipeline-inclusive images/s = steady-state images / steady-state wall time.
  An epoch entirely in steady state counts its build and teardown; the epoch in
  which warm-up ends counts neither (from the end of the last warm-up step to
  the end of its last step), so every epoch's share holds both or none.
* The loss is read to the host after the clock stops (a NaN/inf loss ends the
  run with status ``diverged``); no other host round trip in the hot loop.
* Evaluations: after every epoch and, with ``spec.eval_every_steps`` S, after every
  S-th optimiser step inside an epoch. A mid-epoch evaluation is a pause: its wall
  time (synchronized before and after) is taken out of the epoch's training time and
  out of the steady-state window. Each evaluation records the cumulative training
  wall-clock at that point (``wall_s``: compile step, pipeline build/teardown and
  steps included, evaluation and process start-up excluded), which is what time to
  accuracy reads (DAWNBench / MLPerf), and the throughput of the steps since the
  previous evaluation (``LoopState.evaluations``, ``EVALUATION_KEYS``).

Data-parallel runs (``replica.world_size > 1``, common.distributed): every process
runs this loop on its shard of the global plan; the step returns the GLOBAL mean
loss and correct count, and images are counted per global batch, so images/s is
the whole run's throughput as seen from each replica's clock. Only the chief
(replica 0) evaluates, with its own BN statistics, at the end of every epoch and
at every mid-epoch evaluation point (the same global steps on every replica); the
others skip the evaluation (no pause, no row) and go on to the next collective,
which waits for the chief. The chief's clock, the one its RunResult reports,
excludes its evaluations; a non-chief's clock holds that wait inside its next step.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from common.config import RunSpec
from common.distributed import Replica, global_plan, lr_factor, replica_plan, single_process
from common.loop_fit import fit_epoch
from common.metrics import classification_report, cross_entropy, median_ci, percentile
from common.schedules import lr_at


@dataclass
class LoopState:
    """Where training is; saved in checkpoints so a resumed run continues exactly."""

    epoch: int = 0  # epochs completed
    global_step: int = 0  # optimiser steps completed
    train_time_s: float = 0.0  # cumulative training wall time (evaluation excluded)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # every evaluation, in order (EVALUATION_KEYS)


# One row per evaluation: where (step; epoch as a fraction), the test metrics, the training metrics and
# throughput of the steps since the previous evaluation, the training clock, and the memory peaks so far.
EVALUATION_KEYS = ("step", "epoch", "epoch_end", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                   "wall_s", "lr", "images_per_sec", "step_ms", "eval_s", "host_peak_rss_bytes",
                   "device_peak_bytes")


@dataclass
class _Interval:
    """Training since the previous evaluation (the figures of the next evaluation row)."""

    wall_s: float  # cumulative training time at the previous evaluation
    loss_sum: float = 0.0
    correct: float = 0.0
    images: int = 0
    step_times_s: list[float] = field(default_factory=list)  # this process's steps after its compile step

    def add(self, loss: float, correct: float, size: int, step_s: float | None) -> None:
        self.loss_sum += loss * size
        self.correct += correct
        self.images += size
        if step_s is not None:
            self.step_times_s.append(step_s)


@dataclass
class LoopResult:
    status: str = "ok"  # ok | diverged
    diverged_step: int | None = None
    state: LoopState = field(default_factory=LoopState)
    compile_s: float | None = None
    eval_compile_s: float | None = None
    step_times_s: list[float] = field(default_factory=list)  # steady-state steps only
    step_batch_sizes: list[int] = field(default_factory=list)
    steady_images: int = 0  # images in steady-state steps
    steady_wall_s: float = 0.0  # pipeline-inclusive wall time of those steps
    eval_images: int = 0
    eval_time_s: float = 0.0
    final_logits: np.ndarray | None = None
    process_steps: int = 0  # training steps run by this process (its first is the compile step)
    interval: "_Interval | None" = None  # training since the last evaluation

    def record_step(self, skip: int, elapsed_s: float, batch_size: int) -> None:
        """Count one step of this process: the first is the compile step; after the first ``skip``, steady state."""
        self.process_steps += 1
        if self.process_steps == 1:
            self.compile_s = elapsed_s
        elif self.process_steps > skip:
            self.step_times_s.append(elapsed_s)
            self.step_batch_sizes.append(batch_size)
            self.steady_images += batch_size

    def summary(self) -> dict[str, Any]:
        """Throughput figures for the RunResult (None where not measured)."""
        per_step = [b / t for b, t in zip(self.step_batch_sizes, self.step_times_s) if t > 0]
        median, lo, hi = median_ci(per_step) if per_step else (None, None, None)
        walls = [e["train_time_s"] for e in self.state.epochs if e.get("train_time_s")]
        return {
            "train_images_per_sec": median,
            "train_images_per_sec_ci": [lo, hi] if per_step else None,
            "pipeline_images_per_sec": (self.steady_images / self.steady_wall_s) if self.steady_wall_s > 0 else None,
            "eval_images_per_sec": (self.eval_images / self.eval_time_s) if self.eval_time_s > 0 else None,
            "step_time_p50_s": percentile(self.step_times_s, 50) if self.step_times_s else None,
            "step_time_p90_s": percentile(self.step_times_s, 90) if self.step_times_s else None,
            "compile_s": self.compile_s,
            "eval_compile_s": self.eval_compile_s,
            "train_time_s": self.state.train_time_s,
            "epoch_wall_s": float(np.median(walls)) if walls else None,
        }


def evaluate(backend: Any, eval_step: Callable, result: LoopResult) -> np.ndarray:
    """Logits for the whole test split (numpy, in test-set order), timed apart from training."""
    outputs = []
    backend.synchronize()
    for index, (images, _labels) in enumerate(backend.eval_batches()):
        backend.synchronize()  # the batch's own device work is not the eval step's
        t0 = time.perf_counter()
        logits = eval_step(images)
        backend.synchronize()
        elapsed = time.perf_counter() - t0
        array = backend.to_numpy(logits)
        if result.eval_compile_s is None and index == 0:
            result.eval_compile_s = elapsed  # first call traces/compiles: not throughput
        else:
            result.eval_images += len(array)
            result.eval_time_s += elapsed
        outputs.append(array.astype(np.float32))
    return np.concatenate(outputs)


def train(backend: Any, train_step: Callable, eval_step: Callable, spec: RunSpec, num_train: int,
          test_labels: np.ndarray, *, state: LoopState | None = None,
          on_epoch_end: Callable[[LoopState], None] | None = None,
          on_step: Callable[[int, int, float], None] | None = None,
          replica: Replica | None = None,
          memory: Callable[[], dict[str, Any]] | None = None) -> LoopResult:
    """Train for ``spec.recipe.epochs`` epochs (continuing from ``state``) and evaluate after each.

    ``replica``: this process's place in a data-parallel run (None: a single process).
    ``memory``: called after every evaluation (outside the clocks); its dict (host and device
    peaks so far) goes into the evaluation's row.
    """
    recipe, replica = spec.recipe, replica or single_process()
    result = LoopResult(state=state or LoopState())
    result.interval = _Interval(wall_s=result.state.train_time_s)
    first_plan = global_plan(spec, 0, num_train)
    steps_per_epoch = min(first_plan.num_batches, spec.max_steps_per_epoch or first_plan.num_batches)
    skip = 1 + spec.warmup_steps  # compile step + warm-up steps, counted from this process's start
    schedule = _Schedule(spec, steps_per_epoch)

    def evaluation(wall_s: float, epoch_end: bool) -> tuple[np.ndarray | None, float]:
        """Evaluate now (a pause of the training clock); returns the logits and the pause's length.

        A non-chief replica does not evaluate: (None, 0.0), no row (see the module docstring).
        """
        if not replica.is_chief:
            return None, 0.0
        backend.synchronize()
        started = time.perf_counter()
        logits = evaluate(backend, eval_step, result)
        backend.synchronize()
        paused = time.perf_counter() - started
        result.state.evaluations.append(_evaluation_row(result, logits, test_labels, wall_s, paused, epoch_end,
                                                        schedule, steps_per_epoch, memory))
        return logits, paused

    while result.state.epoch < recipe.epochs:
        plan = first_plan if result.state.epoch == 0 else global_plan(spec, result.state.epoch, num_train)
        run_epoch = fit_epoch if getattr(train_step, "style", "custom") == "fit" else _train_epoch
        epoch = run_epoch(backend, train_step, schedule, plan, replica, steps_per_epoch, skip, result, on_step,
                          spec.eval_every_steps, evaluation)
        if epoch is None:
            return result  # diverged
        train_time, loss_sum, correct, seen = epoch
        result.state.train_time_s += train_time
        logits, _ = evaluation(result.state.train_time_s, True)  # None on a non-chief replica
        result.final_logits = logits
        result.state.epoch += 1
        lr_last = schedule(max(result.state.global_step - 1, 0))
        result.state.epochs.append(_epoch_row(result.state, logits, test_labels, loss_sum, correct, seen,
                                              train_time, lr_last))
        if on_epoch_end is not None:
            on_epoch_end(result.state)
    return result


class _Schedule:
    """The learning rate the loop feeds both sides at a global step (common.schedules x lr_factor)."""

    def __init__(self, spec: RunSpec, steps_per_epoch: int):
        self.recipe, self.steps_per_epoch, self.factor = spec.recipe, steps_per_epoch, lr_factor(spec)

    def __call__(self, step: int) -> float:
        lr = lr_at(self.recipe, step, self.steps_per_epoch)
        return lr if self.factor == 1.0 else lr * self.factor


def _evaluation_row(result: LoopResult, logits: np.ndarray, test_labels: np.ndarray, wall_s: float,
                    eval_s: float, epoch_end: bool, schedule: _Schedule, steps_per_epoch: int,
                    memory: Callable[[], dict[str, Any]] | None) -> dict[str, Any]:
    """One entry of LoopState.evaluations; starts the next interval."""
    state, interval = result.state, result.interval
    step = state.global_step
    trained_s = wall_s - interval.wall_s
    row = {
        "step": step, "epoch": step / steps_per_epoch, "epoch_end": epoch_end,
        "train_loss": interval.loss_sum / interval.images if interval.images else None,
        "train_accuracy": interval.correct / interval.images if interval.images else None,
        "test_loss": cross_entropy(logits, test_labels),
        "test_accuracy": float((logits.argmax(axis=1) == test_labels).mean()),
        "wall_s": wall_s, "lr": schedule(max(step - 1, 0)),
        "images_per_sec": interval.images / trained_s if trained_s > 0 and interval.images else None,
        "step_ms": 1000 * float(np.median(interval.step_times_s)) if interval.step_times_s else None,
        "eval_s": eval_s, "host_peak_rss_bytes": None, "device_peak_bytes": None,
    }
    row.update(memory() if memory is not None else {})
    result.interval = _Interval(wall_s=wall_s)
    return row


def _train_epoch(backend: Any, train_step: Callable, schedule: _Schedule, plan: Any, replica: Replica,
                 steps_per_epoch: int, skip: int, result: LoopResult,
                 on_step: Callable[[int, int, float], None] | None,
                 eval_every: int | None = None, evaluation: Callable[[float, bool], Any] | None = None
                 ) -> tuple[float, float, float, int] | None:
    """One epoch of training steps: (train_time_s, loss_sum, correct, seen), None if the loss diverged.

    ``plan`` is the global plan: this replica trains on its shard, and counts every step's
    global batch (the step returns the global mean loss and correct count).

    Mid-epoch evaluations (every ``eval_every`` global steps, not after the epoch's last step,
    whose evaluation the caller makes) are paused out of the epoch's time and the steady window.
    The global step is the same on every replica, so every replica reaches each evaluation
    point at the same step; only the chief evaluates (``evaluation`` returns a zero pause on
    the others).
    """
    loss_sum, correct, seen = 0.0, 0.0, 0
    whole_epoch_steady = result.process_steps >= skip
    backend.synchronize()
    epoch_start = time.perf_counter()
    steady_start = epoch_start if whole_epoch_steady else None
    last_step_end = epoch_start
    paused = paused_before_steady = 0.0  # evaluation time inside this epoch, in total / before steady_start
    batches = backend.train_batches(replica_plan(plan, replica))  # building the pipeline is training time
    # islice: a capped epoch never fetches a batch past its last step
    steps = itertools.islice(zip(batches, plan.batch_sizes()), steps_per_epoch)
    for index, ((images, labels), size) in enumerate(steps):
        lr = schedule(result.state.global_step)
        backend.synchronize()  # the batch's own device work ends here, outside the step's window
        t0 = time.perf_counter()
        loss, n_correct = train_step(images, labels, lr)
        backend.synchronize()
        last_step_end = time.perf_counter()
        loss_value = float(backend.to_numpy(loss))
        result.state.global_step += 1
        result.record_step(skip, last_step_end - t0, size)
        if result.process_steps == skip:
            steady_start, paused_before_steady = last_step_end, paused  # pipeline-inclusive clock starts
        if not math.isfinite(loss_value):
            result.status, result.diverged_step = "diverged", result.state.global_step
            _close(batches)
            return None
        step_correct = float(backend.to_numpy(n_correct))
        loss_sum += loss_value * size
        correct += step_correct
        seen += size
        result.interval.add(loss_value, step_correct, size,
                            last_step_end - t0 if result.process_steps > 1 else None)
        if on_step is not None:
            on_step(result.state.epoch, index, loss_value)
        if eval_every and result.state.global_step % eval_every == 0 and index < steps_per_epoch - 1:
            wall = result.state.train_time_s + (last_step_end - epoch_start - paused)
            paused += evaluation(wall, False)[1]
    _close(batches)  # teardown is training time, like the build (see the module docstring)
    backend.synchronize()
    epoch_end = time.perf_counter()
    if steady_start is not None:
        window_end = epoch_end if whole_epoch_steady else last_step_end
        result.steady_wall_s += window_end - steady_start - (paused - paused_before_steady)
    return epoch_end - epoch_start - paused, loss_sum, correct, seen


def _epoch_row(state: LoopState, logits: np.ndarray | None, test_labels: np.ndarray, loss_sum: float,
               correct: float, seen: int, train_time: float, lr_last: float) -> dict[str, Any]:
    """One entry of RunResult.epochs (``state.epoch`` already counts the epoch just finished).

    ``logits`` None: this replica did not evaluate (only the chief does); test figures are None.
    """
    return {
        "epoch": state.epoch,
        "train_loss": loss_sum / max(seen, 1),
        "train_accuracy": correct / max(seen, 1),
        "test_loss": cross_entropy(logits, test_labels) if logits is not None else None,
        "test_accuracy": float((logits.argmax(axis=1) == test_labels).mean()) if logits is not None else None,
        "wall_s": state.train_time_s,  # cumulative training time at this evaluation
        "train_time_s": train_time,
        "images": seen,
        "lr_last": lr_last,
    }


def final_report(result: LoopResult, test_labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Accuracy, loss, confusion matrix and per-class scores of the final evaluation."""
    if result.final_logits is None:
        return {}
    return classification_report(result.final_logits, test_labels, num_classes)


def _close(batches: Any) -> None:
    """Finish a (possibly partly consumed) batch iterator now rather than whenever it is collected."""
    close = getattr(batches, "close", None)
    if close is not None:
        close()


def plan_for(spec: RunSpec, epoch: int, num_train: int):
    """The sampler's plan of ``epoch`` with the recipe's batching and augmentation: the global plan
    (common.distributed.global_plan; the single-process plan when the world is 1)."""
    return global_plan(spec, epoch, num_train)
