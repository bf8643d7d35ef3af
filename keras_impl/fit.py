"""The ``fit`` execution style: Keras's own ``model.compile`` + ``model.fit``, on either Keras backend.

The idiomatic Keras training loop on the same pipeline, model, optimizer
and loss as the hand-written step (``style = "custom"``), so that the ratio
fit / custom measures the cost of the idiom and nothing else:

* ``model.compile(optimizer=<the reference-semantics optimizer>, loss=<the
  same cross-entropy as a keras Loss>, metrics=[accuracy])`` with the
  backend's execution mode as Keras's own flags (``run_eagerly`` /
  ``jit_compile``: on TensorFlow tf.function or XLA, on PyTorch torch.compile);
* ``model.fit`` over one epoch of the backend's pipeline in the form ``fit``
  takes on that backend (a tf.data.Dataset; a torch DataLoader), called once
  per epoch so that common.loop evaluates between epochs, timed apart;
* the learning rate of every step comes from common.schedules, assigned by a
  callback before the step (``LearningRateFromSchedule``);
* per-step times come from a callback (``StepClock``) that synchronises the
  device before each clock read, like common.loop's own step window. Fit's
  window holds what fit does per step: on TensorFlow the hand-over of the
  prefetched batch (the iterator is read inside the compiled function),
  fit's metric updates and, because a per-batch callback is present, the
  read-back of the step's logs (what a progress bar also costs). The first
  step (tracing/compilation) is the compile step, as in the custom loop.

``FitStep.__call__`` is one step through Keras's ``train_on_batch`` (the same
compiled train function), for bench and parity, which take single steps.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

import keras
import numpy as np

from common.architectures import ArchSpec
from common.config import Recipe
from keras_impl import optim as keras_optim
from keras_impl.layers import BatchNorm
from keras_impl.weights import trainable_variable_names

# on_step(step index in the epoch, clock at its start, clock at its end (perf_counter seconds, both read
# after a synchronize), fit's logs so far) -> True to stop training (a non-finite loss)
StepCallback = Callable[[int, float, float, dict[str, float]], bool]


class FitLoss(keras.losses.Loss):
    """keras_impl.optim's softmax cross-entropy as a Keras loss (per image; fit takes the batch mean).

    ``name`` and ``label_smoothing`` are what the audit reads, from the object fit calls.
    """

    def __init__(self, label_smoothing: float = 0.0, num_classes: int | None = None):
        super().__init__(name=keras_optim.LOSS_NAME, reduction="sum_over_batch_size")
        self.label_smoothing = float(label_smoothing)
        self.num_classes = num_classes

    def call(self, y_true, y_pred):
        return keras_optim.softmax_cross_entropy(y_pred, y_true, self.num_classes, self.label_smoothing,
                                                 reduce=False)


class LearningRateFromSchedule(keras.callbacks.Callback):
    """Assigns ``lrs[step]`` (common.schedules, per step) to the optimizer before each training step."""

    def __init__(self, optimizer: keras.optimizers.Optimizer, lrs: list[float]):
        super().__init__()
        self.optimizer_to_set, self.lrs = optimizer, list(lrs)

    def on_train_batch_begin(self, batch, logs=None):
        self.optimizer_to_set.learning_rate = float(self.lrs[batch])


class StepClock(keras.callbacks.Callback):
    """Times each training step of ``fit`` between synchronised clock reads; hands each to ``on_step``."""

    def __init__(self, synchronize: Callable[[], None], on_step: StepCallback):
        super().__init__()
        self.synchronize, self.on_step = synchronize, on_step
        self._t0 = 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self.synchronize()  # the device work queued before this step is not this step's
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.synchronize()
        if self.on_step(int(batch), self._t0, time.perf_counter(), dict(logs or {})):
            self.model.stop_training = True


class FitStep(keras_optim.OptimizerStateMixin):
    """The model compiled for ``fit`` with the reference-semantics optimizer; one epoch per ``fit_epoch``.

    ``epoch_data(plan)`` gives one epoch of the pipeline as ``fit`` takes it on
    this backend; ``compile_flags`` are the backend's Keras flags for ``mode``
    (``run_eagerly``, ``jit_compile``); ``bn_implementation`` the BatchNorm kernel
    for that mode; ``synchronize`` the backend's device synchronisation.
    """

    style = "fit"

    def __init__(self, model: keras.Model, arch: ArchSpec, recipe: Recipe, *, device: str, precision: str,
                 mode: str, epoch_data: Callable[[Any], Any], synchronize: Callable[[], None],
                 compile_flags: dict[str, bool], bn_implementation: str):
        self.model, self.arch, self.recipe = model, arch, recipe
        self.device, self.precision, self.mode = device, precision, mode
        self.epoch_data, self.synchronize = epoch_data, synchronize
        self.bn_implementation = bn_implementation
        self.variables = list(model.trainable_variables)
        self.variable_names = trainable_variable_names(model, arch)
        self.loss = FitLoss(recipe.label_smoothing, num_classes=int(model.output_shape[-1]))
        self.optimizer = keras_optim.build_optimizer(recipe, self.variable_names, precision)
        self.inner_optimizer = keras_optim.inner_optimizer(self.optimizer)
        with keras.device(device):
            self.optimizer.build(self.variables)
        self.compile_flags = dict(compile_flags)
        model.compile(optimizer=self.optimizer, loss=self.loss,
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")], **self.compile_flags)

    @property
    def loss_scaling(self) -> str | None:
        return keras_optim.loss_scaling(self.optimizer)

    @contextlib.contextmanager
    def _placed(self):
        with keras.device(self.device), BatchNorm.using(self.bn_implementation):
            yield

    def fit_epoch(self, plan: Any, lrs: list[float], on_step: StepCallback) -> dict[str, float]:
        """``model.fit`` over one epoch of ``plan``, ``len(lrs)`` steps with those learning rates.

        Returns fit's epoch logs: ``loss`` and ``accuracy`` (means over the epoch's images).
        """
        callbacks = [StepClock(self.synchronize, on_step), LearningRateFromSchedule(self.inner_optimizer, lrs)]
        with self._placed():
            history = self.model.fit(self.epoch_data(plan), epochs=1, steps_per_epoch=len(lrs), verbose=0,
                                     shuffle=False, callbacks=callbacks)
        return {key: float(values[-1]) for key, values in history.history.items()}

    def __call__(self, images, labels, lr: float):
        """One step through ``train_on_batch`` (fit's compiled train function): (batch loss, correct count)."""
        self.inner_optimizer.learning_rate = float(lr)
        with self._placed():
            logs = self.model.train_on_batch(images, labels, return_dict=True)
        return np.float32(logs["loss"]), np.float32(logs["accuracy"] * int(labels.shape[0]))

