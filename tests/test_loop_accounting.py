"""common.loop's time accounting on a fake clock with a fake asynchronous device.

Every cost is a distinct power of two, so each figure the loop reports is an
exact sum that says which costs it contains:

* a batch costs FETCH host seconds plus BATCH_DEVICE queued device seconds (torch
  builds batches with lazy device kernels), a step STEP_DEVICE device seconds
  (the compile step COMPILE host seconds more);
* an epoch's pipeline costs BUILD when its first batch is fetched and TEARDOWN when
  it is closed (tf.data cancels its prefetch threads);
* evaluation costs EVAL_FETCH per batch and EVAL_STEP per call, none of it training.

40 images in batches of 10: 4 steps per epoch. warmup_steps=4: step 1 compiles,
steps 2-5 warm up (the warm-up ends on the first step of epoch 2), steps 6.. are steady.
"""
from __future__ import annotations

import numpy as np
import pytest

import common.loop as loop
from common.config import Recipe, RunSpec
from common.loop import LoopState
from common.schedules import lr_at
from tests.fake_clock import FakeClock

FETCH, BATCH_DEVICE, STEP_DEVICE, COMPILE = 1.0, 2.0, 8.0, 256.0
BUILD, TEARDOWN = 64.0, 32.0
EVAL_FETCH, EVAL_STEP = 0.5, 128.0
STEP = STEP_DEVICE  # a steady step's window: its own device work only
FIRST = COMPILE + STEP_DEVICE  # the compile step's window
PER_BATCH = FETCH + BATCH_DEVICE + STEP  # one steady step, fetch included
EPOCH = BUILD + 4 * PER_BATCH + TEARDOWN  # a steady epoch, build and teardown included
EPOCH_1 = EPOCH + COMPILE  # the epoch with the compile step


class LazyDeviceBackend:
    """The parts of common.backend.Backend the loop calls, costed on a FakeClock."""

    def __init__(self, clock: FakeClock):
        self.clock = clock
        self.lrs: list[float] = []

    def synchronize(self):
        self.clock.synchronize()

    def to_numpy(self, value):
        return np.asarray(value)

    def train_batches(self, plan):
        self.clock.host(BUILD)  # a generator: the pipeline is built at the first fetch
        try:
            for size in plan.batch_sizes():
                self.clock.host(FETCH)
                self.clock.launch(BATCH_DEVICE)
                yield np.zeros((size, 1)), np.zeros(size, np.int64)
        finally:
            self.clock.host(TEARDOWN)

    def eval_batches(self):
        for _ in range(3):
            self.clock.host(EVAL_FETCH)
            self.clock.launch(EVAL_FETCH)
            yield np.zeros((2, 1)), np.zeros(2, np.int64)

    def train_step(self, compiled: list):
        def step(images, labels, lr):
            self.lrs.append(lr)
            if not compiled:
                compiled.append(True)
                self.clock.host(COMPILE)
            self.clock.launch(STEP_DEVICE)
            return np.float32(1.0), np.int64(len(labels))
        return step

    def eval_step(self, images):
        self.clock.launch(EVAL_STEP)
        return np.zeros((len(images), 10), np.float32)


def _spec(epochs: int = 3, eval_every_steps: int | None = None) -> RunSpec:
    return RunSpec(model="seed_cnn", backend="torch", warmup_steps=4, eval_every_steps=eval_every_steps,
                   recipe=Recipe(batch_size=10, epochs=epochs, lr=0.1, schedule="cosine"))


def _train(monkeypatch, state: LoopState | None = None, eval_every_steps: int | None = None):
    clock = FakeClock()
    clock.install(monkeypatch, loop)
    backend = LazyDeviceBackend(clock)
    result = loop.train(backend, backend.train_step([]), backend.eval_step, _spec(eval_every_steps=eval_every_steps),
                        num_train=40, test_labels=np.zeros(6, np.int64), state=state,
                        memory=lambda: {"host_peak_rss_bytes": 7, "device_peak_bytes": None})
    return clock, backend, result


def test_every_clock_read_follows_a_synchronize(monkeypatch):
    clock, _, _ = _train(monkeypatch)
    # today's loop read t0 right after the fetch, with the batch's device work still queued
    assert clock.unsynced_reads == []


def test_compile_step_apart_and_warm_up_excluded(monkeypatch):
    _, _, result = _train(monkeypatch)
    assert result.compile_s == FIRST  # without the batch's device work (BATCH_DEVICE)
    # 12 steps: 1 compile + 4 warm-up excluded, 7 steady; each window is the step's device work only
    assert result.step_times_s == [STEP] * 7
    assert result.step_batch_sizes == [10] * 7 and result.steady_images == 70


def test_epoch_time_counts_pipeline_build_and_teardown_and_excludes_evaluation(monkeypatch):
    _, _, result = _train(monkeypatch)
    walls = [e["train_time_s"] for e in result.state.epochs]
    assert walls == [EPOCH_1, EPOCH, EPOCH]
    assert result.state.train_time_s == EPOCH_1 + 2 * EPOCH
    # evaluation (3 calls per epoch): the first call (compile) apart, then 8 calls of EVAL_STEP each,
    # the batches' production outside their windows
    assert result.eval_compile_s == EVAL_STEP and result.eval_time_s == 8 * EVAL_STEP
    assert result.eval_images == 16


def test_steady_window_counts_build_and_teardown_for_whole_epochs_only(monkeypatch):
    _, _, result = _train(monkeypatch)
    # epoch 2: warm-up ends at its first step; its last three steps (fetch included), no teardown;
    # epoch 3: all of it, build and teardown included
    assert result.steady_wall_s == 3 * PER_BATCH + EPOCH
    summary = result.summary()
    assert summary["pipeline_images_per_sec"] == pytest.approx(70 / (3 * PER_BATCH + EPOCH))
    assert summary["train_images_per_sec"] == pytest.approx(10 / STEP)
    assert summary["compile_s"] == FIRST and summary["epoch_wall_s"] == EPOCH


def test_resume_across_the_warm_up_boundary(monkeypatch):
    """A run resumed after epoch 1 compiles and warms up again in its new process."""
    _, _, first = _train(monkeypatch)
    saved = LoopState(epoch=1, global_step=4, train_time_s=EPOCH_1, epochs=[first.state.epochs[0]])
    _, backend, result = _train(monkeypatch, state=saved)
    assert result.state.epoch == 3 and result.state.global_step == 12 and len(result.state.epochs) == 3
    # the LR schedule continues from the saved step
    assert backend.lrs == [lr_at(_spec().recipe, step, 4) for step in range(4, 12)]
    # process steps: epoch 2 = 1 compile + 3 warm-up, epoch 3 = 1 warm-up + 3 steady
    assert result.compile_s == FIRST and result.step_times_s == [STEP] * 3
    assert result.steady_wall_s == 3 * PER_BATCH  # epoch 3 is the boundary epoch: no build, no teardown
    assert result.state.train_time_s == EPOCH_1 + EPOCH_1 + EPOCH
    assert [e["epoch"] for e in result.state.epochs] == [1, 2, 3]


def test_step_time_p50_is_the_median_of_steady_steps():
    result = loop.LoopResult()
    for elapsed in (9.0, 1.0, 2.0, 2.0, 3.0, 100.0):  # compile, one warm-up, then 2, 2, 3, 100
        result.record_step(2, elapsed, 10)
    assert result.step_times_s == [2.0, 2.0, 3.0, 100.0] and result.compile_s == 9.0
    assert result.summary()["step_time_p50_s"] == 2.5  # the median; the mean would be 26.75


EVAL = 3 * (2 * EVAL_FETCH + EVAL_STEP)  # one evaluation: 3 batches, fetch (host + device) and step each


def test_evaluations_every_s_steps_pause_the_training_clock(monkeypatch):
    """--eval-every-steps 2 adds evaluations after steps 2, 6, 10 (4 steps per epoch; epoch ends
    evaluate anyway); the training clock, the epochs' times and the steady window are unchanged."""
    clock, _, result = _train(monkeypatch, eval_every_steps=2)
    assert clock.unsynced_reads == []
    rows = result.state.evaluations
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    assert [r["epoch_end"] for r in rows] == [False, True] * 3 and [r["epoch"] for r in rows] == [0.5, 1.0, 1.5,
                                                                                                2.0, 2.5, 3.0]
    assert [e["train_time_s"] for e in result.state.epochs] == [EPOCH_1, EPOCH, EPOCH]
    assert result.steady_wall_s == 3 * PER_BATCH + EPOCH
    # the training clock at each evaluation: everything trained so far, no evaluation in it
    mid = BUILD + 2 * PER_BATCH  # an epoch's first two steps, its build included
    assert [r["wall_s"] for r in rows] == [mid + COMPILE, EPOCH_1, EPOCH_1 + mid, EPOCH_1 + EPOCH,
                                           EPOCH_1 + EPOCH + mid, EPOCH_1 + 2 * EPOCH]
    assert all(r["eval_s"] == EVAL for r in rows)
    # throughput of the steps since the previous evaluation: 20 images over that stretch of the clock
    assert rows[0]["images_per_sec"] == pytest.approx(20 / (mid + COMPILE))
    assert rows[1]["images_per_sec"] == pytest.approx(20 / (EPOCH_1 - mid - COMPILE))
    assert rows[0]["step_ms"] == 1000 * STEP  # the compile step is not in it
    assert all(r["train_accuracy"] == 1.0 and r["train_loss"] == 1.0 for r in rows)
    assert all(r["host_peak_rss_bytes"] == 7 and r["device_peak_bytes"] is None for r in rows)


def test_epoch_end_evaluations_alone_without_eval_every_steps(monkeypatch):
    _, _, result = _train(monkeypatch)
    rows = result.state.evaluations
    assert [r["step"] for r in rows] == [4, 8, 12] and all(r["epoch_end"] for r in rows)
    assert [r["wall_s"] for r in rows] == [e["wall_s"] for e in result.state.epochs]


def test_several_pauses_in_one_epoch_all_stay_off_the_clock(monkeypatch):
    _, _, result = _train(monkeypatch, eval_every_steps=1)
    rows = result.state.evaluations
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["wall_s"] for r in rows[:4]] == [BUILD + COMPILE + k * PER_BATCH for k in (1, 2, 3)] + [EPOCH_1]
    assert [e["train_time_s"] for e in result.state.epochs] == [EPOCH_1, EPOCH, EPOCH]
    assert result.steady_wall_s == 3 * PER_BATCH + EPOCH


def test_data_parallel_mid_epoch_evaluations_are_the_chiefs_alone(monkeypatch):
    """--nproc 2 with --eval-every-steps: every replica reaches each evaluation point at the same global
    step; the chief evaluates (a pause of its clock, one row each), the other replica skips it (no eval
    call, no row, no pause) and goes on to its next step, whose all-reduce waits for the chief."""
    from common.distributed import Replica

    spec = RunSpec(model="seed_cnn", backend="torch", warmup_steps=4, eval_every_steps=1, nproc=2,
                   recipe=Recipe(batch_size=10, epochs=2, lr=0.1, schedule="cosine"))
    runs = {}
    for rank in (0, 1):
        clock = FakeClock()
        clock.install(monkeypatch, loop)
        backend = LazyDeviceBackend(clock)
        calls: list[int] = []

        def eval_step(images, backend=backend, calls=calls):
            calls.append(len(images))
            return backend.eval_step(images)

        result = loop.train(backend, backend.train_step([]), eval_step, spec, num_train=40,
                            test_labels=np.zeros(6, np.int64), replica=Replica(rank=rank, world_size=2))
        runs[rank] = result, calls, backend.lrs, clock
    (chief, chief_calls, chief_lrs, chief_clock), (other, other_calls, other_lrs, _) = runs[0], runs[1]
    # a global batch of 20 (2 x 10): 2 steps per epoch; a mid-epoch evaluation after each epoch's first step
    rows = chief.state.evaluations
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["epoch_end"] for r in rows] == [False, True] * 2
    assert len(chief_calls) == 4 * 3 and all(r["eval_s"] == EVAL for r in rows)
    assert chief_clock.unsynced_reads == []
    assert other_calls == [] and other.state.evaluations == [] and other.final_logits is None
    assert [e["test_accuracy"] for e in other.state.epochs] == [None, None]
    assert other.state.global_step == chief.state.global_step == 4 and other_lrs == chief_lrs
    # the chief's pauses stay off its clock: both replicas trained for the same time on the fake clock
    assert [e["train_time_s"] for e in chief.state.epochs] == [e["train_time_s"] for e in other.state.epochs]
    assert rows[0]["wall_s"] == BUILD + COMPILE + PER_BATCH  # each replica's own batches (10 images per step)
    assert rows[0]["images_per_sec"] == pytest.approx(20 / rows[0]["wall_s"])  # global images per step


# -- Keras's fit style (common.loop_fit): the same accounting from fit's step callback ---------------------

class FakeFitStep:
    """A FitStep as the loop sees it: ``fit_epoch`` builds the pipeline, runs the steps with the given LRs
    and reports each between synchronised clock reads with fit's running-mean logs (keras_impl.fit)."""

    style = "fit"

    def __init__(self, backend: LazyDeviceBackend, losses: list[float]):
        self.backend, self.losses, self.compiled, self.lrs = backend, iter(losses), False, []

    def fit_epoch(self, plan, lrs, on_step):
        clock, totals = self.backend.clock, {"loss": 0.0, "correct": 0.0, "seen": 0}
        batches = self.backend.train_batches(plan)
        try:
            for index, (lr, (_images, labels)) in enumerate(zip(lrs, batches)):  # LRs first: no extra fetch
                self.backend.synchronize()
                t0 = clock.perf_counter()
                self.lrs.append(lr)
                if not self.compiled:
                    self.compiled = True
                    clock.host(COMPILE)
                clock.launch(STEP_DEVICE)
                self.backend.synchronize()
                t1 = clock.perf_counter()
                totals["seen"] += len(labels)
                totals["loss"] += next(self.losses) * len(labels)
                totals["correct"] += len(labels) / 2  # half of every batch right
                logs = {"loss": totals["loss"] / totals["seen"], "accuracy": totals["correct"] / totals["seen"]}
                if on_step(index, t0, t1, logs):
                    break
        finally:
            batches.close()
        return logs


def test_fit_style_epochs_and_mid_epoch_evaluations_are_accounted_as_the_custom_loops(monkeypatch):
    """The fit epoch (common.loop_fit) on the same fake costs: the same epoch times, compile and steady
    figures and evaluation rows as the custom loop's, the schedule's LR at every step, and each interval's
    training loss from fit's running means (the steps' own losses, not the epoch's running mean)."""
    import common.loop_fit as loop_fit

    clock = FakeClock()
    clock.install(monkeypatch, loop)
    clock.install(monkeypatch, loop_fit)
    backend = LazyDeviceBackend(clock)
    step = FakeFitStep(backend, losses=[float(k) for k in range(1, 13)])
    spec = _spec(eval_every_steps=2)
    result = loop.train(backend, step, backend.eval_step, spec, num_train=40, test_labels=np.zeros(6, np.int64),
                        memory=lambda: {"host_peak_rss_bytes": 7, "device_peak_bytes": None})
    assert clock.unsynced_reads == []
    assert step.lrs == [lr_at(spec.recipe, k, 4) for k in range(12)]
    assert result.compile_s == FIRST and result.step_times_s == [STEP] * 7
    assert [e["train_time_s"] for e in result.state.epochs] == [EPOCH_1, EPOCH, EPOCH]
    assert result.steady_wall_s == 3 * PER_BATCH + EPOCH
    rows = result.state.evaluations
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12] and all(r["eval_s"] == EVAL for r in rows)
    mid = BUILD + 2 * PER_BATCH
    assert [r["wall_s"] for r in rows] == [mid + COMPILE, EPOCH_1, EPOCH_1 + mid, EPOCH_1 + EPOCH,
                                           EPOCH_1 + EPOCH + mid, EPOCH_1 + 2 * EPOCH]
    assert [r["train_loss"] for r in rows] == pytest.approx([1.5, 3.5, 5.5, 7.5, 9.5, 11.5])
    assert all(r["train_accuracy"] == pytest.approx(0.5) for r in rows)
    assert [e["train_loss"] for e in result.state.epochs] == pytest.approx([2.5, 6.5, 10.5])
