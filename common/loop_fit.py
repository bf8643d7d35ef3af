"""common.loop's epoch for Keras's ``fit`` style: the same accounting as the custom loop's epoch.

Framework-free like common.loop (``train_step.fit_epoch`` runs Keras's fit in the backend's
process and reports every step through a callback); kept apart so that the loop's own module
holds the custom step's path and the rules every path follows (its module docstring).
"""
from __future__ import annotations

import itertools
import math
import time
from typing import TYPE_CHECKING, Any, Callable

from common.distributed import Replica

if TYPE_CHECKING:
    from common.loop import LoopResult


def fit_epoch(backend: Any, train_step: Any, schedule: Callable[[int], float], plan: Any, replica: Replica,
              steps_per_epoch: int, skip: int, result: LoopResult,
              on_step: Callable[[int, int, float], None] | None,
              eval_every: int | None = None, evaluation: Callable[[float, bool], Any] | None = None
              ) -> tuple[float, float, float, int] | None:
    """One epoch through Keras's ``fit`` (keras_impl.fit.FitStep), accounted exactly as common.loop's
    ``_train_epoch``: (train_time_s, loss_sum, correct, seen), None if the loss diverged.

    The epoch clock holds fit's whole call (building and tearing down its view of the
    pipeline included); each step's window is fit's own, between the synchronised clock
    reads of its StepClock callback; the learning rates are the loop's schedule, per step.
    Mid-epoch evaluations run from the step callback, after the step's clock stopped and
    before the next step's starts, and are paused out of the epoch's time and the steady
    window as in ``_train_epoch``. One process only (RunSpec refuses fit in a data-parallel run).
    """
    if replica.world_size != 1:
        raise ValueError("the fit style runs in one process")
    sizes = list(itertools.islice(plan.batch_sizes(), steps_per_epoch))
    lrs = [schedule(result.state.global_step + index) for index in range(len(sizes))]
    whole_epoch_steady = result.process_steps >= skip
    # fit's logs hold running means over the epoch's images: each step's own figures are differences
    clock = {"steady_start": None, "last_step_end": 0.0, "paused": 0.0, "paused_before_steady": 0.0,
             "seen": 0, "loss_total": 0.0, "correct_total": 0.0}

    def step_done(index: int, start: float, end: float, logs: dict[str, float]) -> bool:
        loss = float(logs.get("loss", math.nan))  # fit's running mean over the epoch: NaN once any step is
        result.state.global_step += 1
        result.record_step(skip, end - start, sizes[index])
        clock["last_step_end"] = end
        if result.process_steps == skip:
            clock["steady_start"], clock["paused_before_steady"] = end, clock["paused"]  # pipeline clock starts
        if not math.isfinite(loss):
            result.status, result.diverged_step = "diverged", result.state.global_step
            return True
        seen = clock["seen"] + sizes[index]
        loss_total, correct_total = loss * seen, float(logs.get("accuracy", math.nan)) * seen
        result.interval.add((loss_total - clock["loss_total"]) / sizes[index], correct_total - clock["correct_total"],
                            sizes[index], end - start if result.process_steps > 1 else None)
        clock.update(seen=seen, loss_total=loss_total, correct_total=correct_total)
        if on_step is not None:
            on_step(result.state.epoch, index, loss)
        if eval_every and result.state.global_step % eval_every == 0 and index < steps_per_epoch - 1:
            wall = result.state.train_time_s + (end - epoch_start - clock["paused"])
            clock["paused"] += evaluation(wall, False)[1]
        return False

    backend.synchronize()
    epoch_start = time.perf_counter()
    if whole_epoch_steady:
        clock["steady_start"] = epoch_start
    logs = train_step.fit_epoch(plan, lrs, step_done)
    backend.synchronize()
    epoch_end = time.perf_counter()
    if result.status == "diverged":
        return None
    paused = clock["paused"]
    if clock["steady_start"] is not None:
        window_end = epoch_end if whole_epoch_steady else clock["last_step_end"]
        result.steady_wall_s += window_end - clock["steady_start"] - (paused - clock["paused_before_steady"])
    seen = sum(sizes)
    return epoch_end - epoch_start - paused, logs["loss"] * seen, logs["accuracy"] * seen, seen
