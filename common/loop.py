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

Data-parallel runs (``replica.world_size > 1``, common.distributed): every process
runs this loop on its shard of the global plan; the step returns the GLOBAL mean
loss and correct count, and images are counted per global batch, so images/s is
the whole run's throughput as seen from each replica's clock. Only the chief
(replica 0) evaluates, with its own BN statistics; the others go on to the
next collective, which waits for it.
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
from common.metrics import classification_report, cross_entropy, median_ci, percentile
from common.schedules import lr_at


@dataclass
class LoopState:
    """Where training is; saved in checkpoints so a resumed run continues exactly."""

    epoch: int = 0  # epochs completed
    global_step: int = 0  # optimiser steps completed
    train_time_s: float = 0.0  # cumulative training wall time (evaluation excluded)
    epochs: list[dict[str, Any]] = field(default_factory=list)


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
          replica: Replica | None = None) -> LoopResult:
    """Train for ``spec.recipe.epochs`` epochs (continuing from ``state``) and evaluate after each.

    ``replica``: this process's place in a data-parallel run (None: a single process).
    """
    recipe, replica = spec.recipe, replica or single_process()
    result = LoopResult(state=state or LoopState())
    first_plan = global_plan(spec, 0, num_train)
    steps_per_epoch = min(first_plan.num_batches, spec.max_steps_per_epoch or first_plan.num_batches)
    skip = 1 + spec.warmup_steps  # compile step + warm-up steps, counted from this process's start
    schedule = _Schedule(spec, steps_per_epoch)
    while result.state.epoch < recipe.epochs:
        plan = first_plan if result.state.epoch == 0 else global_plan(spec, result.state.epoch, num_train)
        epoch = _train_epoch(backend, train_step, schedule, plan, replica, steps_per_epoch, skip, result, on_step)
        if epoch is None:
            return result  # diverged
        train_time, loss_sum, correct, seen = epoch
        result.state.train_time_s += train_time
        logits = evaluate(backend, eval_step, result) if replica.is_chief else None
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


def _train_epoch(backend: Any, train_step: Callable, schedule: _Schedule, plan: Any, replica: Replica,
                 steps_per_epoch: int, skip: int, result: LoopResult,
                 on_step: Callable[[int, int, float], None] | None) -> tuple[float, float, float, int] | None:
    """One epoch of training steps: (train_time_s, loss_sum, correct, seen), None if the loss diverged.

    ``plan`` is the global plan: this replica trains on its shard, and counts every step's
    global batch (the step returns the global mean loss and correct count).
    """
    loss_sum, correct, seen = 0.0, 0.0, 0
    whole_epoch_steady = result.process_steps >= skip
    backend.synchronize()
    epoch_start = time.perf_counter()
    steady_start = epoch_start if whole_epoch_steady else None
    last_step_end = epoch_start
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
            steady_start = last_step_end  # pipeline-inclusive clock starts after warm-up
        if not math.isfinite(loss_value):
            result.status, result.diverged_step = "diverged", result.state.global_step
            _close(batches)
            return None
        loss_sum += loss_value * size
        correct += float(backend.to_numpy(n_correct))
        seen += size
        if on_step is not None:
            on_step(result.state.epoch, index, loss_value)
    _close(batches)  # teardown is training time, like the build (see the module docstring)
    backend.synchronize()
    epoch_end = time.perf_counter()
    if steady_start is not None:
        result.steady_wall_s += (epoch_end if whole_epoch_steady else last_step_end) - steady_start
    return epoch_end - epoch_start, loss_sum, correct, seen


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

