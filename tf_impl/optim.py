"""The compiled training and evaluation steps on Keras/TensorFlow (mirror of torch_impl/optim.py).

The optimizer (torch semantics, common.optim_reference) and the loss are
keras_impl/optim.py's, written in keras.ops for both Keras backends. What is
TensorFlow's own lives here: the step records the forward pass on a
``tf.GradientTape`` and runs in one of three execution modes: "eager" (plain
Python, op by op), "graph" (``tf.function``) or "xla"
(``tf.function(jit_compile=True)``). The LR is a Keras variable assigned
outside the traced function, so a new LR never retraces.

Data-parallel (``engine``, tf_impl.distributed): a custom loop, ``strategy.run``
of the same per-replica step inside a ``tf.function`` (under XLA only the
per-replica step is jit-compiled; the collectives stay outside). Keras's
optimizer SUMS the gradients over replicas, so each replica's mean loss is
divided by the replica count before its gradient, exactly once (the loss is our
own function, not a Keras loss that would scale it again): the mean gradient.
Loss and correct count are summed over replicas in one reduce, as on the torch
side, so the step returns the global mean loss.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from common.architectures import ArchSpec
from common.config import Recipe
from keras_impl import optim as _keras_optim
from keras_impl import fit as _keras_fit
from keras_impl.optim import (FP16_GROWTH_STEPS, FP16_INITIAL_LOSS_SCALE, LOSS_NAME, TrainingLoss,  # noqa: F401
                              build_optimizer, softmax_cross_entropy)
from keras_impl import weights as _keras_weights
from tf_impl.layers import BatchNorm

EXECUTION_MODES = ("eager", "graph", "xla")
# BatchNorm kernel per execution mode (see keras_impl.layers.BatchNorm.implementation): TF's fused
# kernel where TF runs it (fastest, accurate), composed two-pass ops under XLA (XLA's lowering of
# the fused op uses a one-pass variance that fails parity). That the accurate choice is also the
# faster one in each mode is measured by benchmarks/tf_bn_kernels.py (figures in the README).
_BN_IMPLEMENTATION = {"eager": "fused", "graph": "fused", "xla": "composed"}
# Keras's own compile() flags per mode for the fit style: eager runs the train step op by op, graph
# in a tf.function, xla in a tf.function(jit_compile=True), as TrainStep does.
_FIT_FLAGS = {"eager": {"run_eagerly": True, "jit_compile": False}, "graph": {"run_eagerly": False,
              "jit_compile": False}, "xla": {"run_eagerly": False, "jit_compile": True}}


def compile_function(fn: Callable, mode: str) -> Callable:
    """``fn`` as run in execution ``mode``: eager (as is), graph (tf.function) or xla (jit_compile)."""
    if mode == "eager":
        return fn
    if mode not in EXECUTION_MODES:
        raise ValueError(f"unknown execution mode {mode!r}; choose one of {EXECUTION_MODES}")
    # reduce_retracing: a final partial batch retraces once with a generic batch dimension, not per size.
    return tf.function(fn, jit_compile=mode == "xla", reduce_retracing=True)


class TrainStep(_keras_optim.OptimizerStateMixin):
    """forward (dtype policy) -> float32 loss -> gradients (loss-scaled under fp16) -> optimizer update.

    ``__call__`` returns ``(mean_loss, correct_count)`` as device tensors (no host sync).
    """

    style = "custom"  # the hand-written step (keras_impl.fit.FitStep is Keras's own fit)

    def __init__(self, model: keras.Model, arch: ArchSpec, recipe: Recipe, *, device: str = "/CPU:0",
                 precision: str = "fp32", mode: str = "graph", engine=None):
        self.model, self.arch, self.recipe = model, arch, recipe
        self.engine = engine  # tf_impl.distributed.Engine of a data-parallel run, else None
        self.strategy = engine.strategy if engine is not None else None
        self.loss_divisor = engine.replica.world_size if engine is not None else 1  # see the module docstring
        self.device, self.precision, self.mode = device, precision, mode
        self.variables = list(model.trainable_variables)
        self.variable_names = _keras_weights.trainable_variable_names(model, arch)
        self.loss = TrainingLoss(recipe.label_smoothing, num_classes=int(model.output_shape[-1]))
        # under the strategy, the Keras optimizer must be created in its scope (it binds it at __init__)
        with tf.device(device), (engine.scope() if engine is not None else contextlib.nullcontext()):
            self.optimizer = build_optimizer(recipe, self.variable_names, precision)
            self.optimizer.build(self.variables)
        self.inner_optimizer = _keras_optim.inner_optimizer(self.optimizer)
        self.trace_count = 0  # Python side effect: counts traces in graph/xla modes
        if engine is None:
            self._step = compile_function(self._train_step, mode)
        else:
            self._replica_step_fn = compile_function(self._replica_step, "xla") if mode == "xla" else self._replica_step
            self._step = compile_function(self._distributed_step, "eager" if mode == "eager" else "graph")

    @property
    def loss_scaling(self) -> str | None:
        return _keras_optim.loss_scaling(self.optimizer)

    def _train_step(self, images, labels):
        self.trace_count += 1
        with tf.GradientTape() as tape, BatchNorm.using(_BN_IMPLEMENTATION[self.mode]):
            logits = self.model(images, training=True)
            loss = self.loss(logits, labels)
            replica_share = loss if self.loss_divisor == 1 else loss / self.loss_divisor
            scaled = self.optimizer.scale_loss(replica_share)  # identity unless fp16 loss scaling
        gradients = tape.gradient(scaled, self.variables)
        self.optimizer.apply(gradients, self.variables)  # unscales (fp16) and skips non-finite steps
        return loss, _keras_optim.correct_count(logits, labels)

    def _replica_step(self, images, labels):
        loss, correct = self._train_step(images, labels)
        return tf.stack([loss, tf.cast(correct, tf.float32)])

    def _distributed_step(self, images, labels):
        """Every replica's step on its own batch, then (mean loss, correct count) over all replicas."""
        per_replica = self.strategy.run(self._replica_step_fn, args=(images, labels))
        totals = self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
        return totals[0] / self.loss_divisor, totals[1]

    def __call__(self, images, labels, lr: float):
        # Assigning the LR variable here, outside the traced function, never retraces it.
        self.inner_optimizer.learning_rate = float(lr)
        with tf.device(self.device):
            return self._step(images, labels)


class EvalStep:
    """images -> float32 logits in inference mode (BN moving statistics, no dropout), compiled per mode."""

    def __init__(self, model: keras.Model, *, device: str = "/CPU:0", mode: str = "graph"):
        self.model, self.device, self.mode = model, device, mode
        self._forward = compile_function(self._logits, mode)

    def _logits(self, images):
        return tf.cast(self.model(images, training=False), tf.float32)

    def __call__(self, images):
        with tf.device(self.device):
            return self._forward(images)


def _fit_step(model: keras.Model, arch: ArchSpec, recipe: Recipe, *, device: str, precision: str, mode: str,
              epoch_data: Callable, synchronize: Callable[[], None]) -> _keras_fit.FitStep:
    """The fit style (keras_impl.fit) with this backend's Keras flags and BatchNorm kernel for ``mode``."""
    if mode not in EXECUTION_MODES:
        raise ValueError(f"unknown execution mode {mode!r}; choose one of {EXECUTION_MODES}")
    return _keras_fit.FitStep(model, arch, recipe, device=device, precision=precision, mode=mode,
                              epoch_data=epoch_data, synchronize=synchronize, compile_flags=_FIT_FLAGS[mode],
                              bn_implementation=_BN_IMPLEMENTATION[mode])
