"""The compiled training and evaluation steps on Keras/PyTorch (mirror of torch_impl/optim.py).

The optimizer (torch semantics, common.optim_reference) and the loss are
keras_impl/optim.py's, written in keras.ops for both Keras backends. What is
PyTorch's own lives here, written the way Keras documents a custom training
step on this backend: the Keras model's forward builds torch's autograd graph,
``loss.backward()`` fills each variable's ``.grad``, and the Keras optimizer
applies them under ``torch.no_grad()``. Execution modes: "eager" (op by op)
or "jit_compile": the whole step under ``torch.compile``, which is what
Keras's own ``jit_compile=True`` does on this backend (its torch trainer
compiles ``train_step``). The LR is a Keras variable (a torch tensor)
assigned outside the compiled function, so a new LR never recompiles.
"""
from __future__ import annotations

from typing import Callable

import keras
import numpy as np
import torch
from keras import ops

from common.architectures import ArchSpec
from common.config import Recipe
from keras_impl import optim as _keras_optim
from keras_impl import fit as _keras_fit
from keras_impl.optim import (FP16_GROWTH_STEPS, FP16_INITIAL_LOSS_SCALE, LOSS_NAME, TrainingLoss,  # noqa: F401
                              build_optimizer, softmax_cross_entropy)
from keras_impl import weights as _keras_weights
from kerastorch_impl.layers import BatchNorm

EXECUTION_MODES = ("eager", "jit_compile")
# BatchNorm kernel per execution mode (keras_impl.layers.BatchNorm.implementation): torch's own
# batch_norm kernel in both (benchmarks/bn_kernels.py measures it against the composed keras.ops
# formula per mode).
_BN_IMPLEMENTATION = {"eager": "fused", "jit_compile": "fused"}
# Keras's own compile() flags per mode for the fit style (its torch trainer wraps train_step in
# torch.compile when jit_compile=True; run_eagerly has no meaning on this backend).
_FIT_FLAGS = {"eager": {"jit_compile": False}, "jit_compile": {"jit_compile": True}}


def compile_function(fn: Callable, mode: str) -> Callable:
    """``fn`` as run in execution ``mode``: eager (as is) or jit_compile (torch.compile, inductor).

    dynamic=False: at most two batch shapes (a kept last partial batch), each specialised.
    """
    if mode not in EXECUTION_MODES:
        raise ValueError(f"unknown execution mode {mode!r}; choose one of {EXECUTION_MODES}")
    return torch.compile(fn, dynamic=False) if mode == "jit_compile" else fn


class TrainStep(_keras_optim.OptimizerStateMixin):
    """forward (dtype policy) -> float32 loss -> backward (loss-scaled under fp16) -> optimizer update.

    ``__call__`` returns ``(mean_loss, correct_count)`` as device tensors (no host sync).
    """

    style = "custom"  # the hand-written step (kerastorch_impl.backend builds keras_impl.fit.FitStep for fit)

    def __init__(self, model: keras.Model, arch: ArchSpec, recipe: Recipe, *, device: str = "cpu",
                 precision: str = "fp32", mode: str = "eager"):
        self.model, self.arch, self.recipe = model, arch, recipe
        self.device, self.precision, self.mode = device, precision, mode
        self.variables = list(model.trainable_variables)
        self.variable_names = _keras_weights.trainable_variable_names(model, arch)
        self.loss = TrainingLoss(recipe.label_smoothing, num_classes=int(model.output_shape[-1]))
        self.optimizer = build_optimizer(recipe, self.variable_names, precision)
        self.inner_optimizer = _keras_optim.inner_optimizer(self.optimizer)
        with keras.device(device):
            self.optimizer.build(self.variables)
        self._step = compile_function(self._train_step, mode)

    @property
    def loss_scaling(self) -> str | None:
        return _keras_optim.loss_scaling(self.optimizer)

    def _train_step(self, images, labels):
        logits = self.model(images, training=True)
        loss = self.loss(logits, labels)
        scaled = self.optimizer.scale_loss(loss)  # identity unless fp16 loss scaling
        self.model.zero_grad(set_to_none=True)  # as Keras's torch trainer: no gradient left from the last step
        scaled.backward()
        gradients = [variable.value.grad for variable in self.variables]
        with torch.no_grad():
            self.optimizer.apply(gradients, self.variables)  # unscales (fp16) and skips non-finite steps
        return loss.detach(), _keras_optim.correct_count(logits.detach(), labels)

    def __call__(self, images, labels, lr: float):
        # Assigning the LR variable here, outside the compiled function, never recompiles it.
        self.inner_optimizer.learning_rate = float(lr)
        with keras.device(self.device), BatchNorm.using(_BN_IMPLEMENTATION[self.mode]):
            return self._step(images, labels)


class EvalStep:
    """images -> float32 logits in inference mode (BN moving statistics, no dropout), compiled per mode."""

    def __init__(self, model: keras.Model, *, device: str = "cpu", mode: str = "eager"):
        self.model, self.device, self.mode = model, device, mode
        self._forward = compile_function(self._logits, mode)

    def _logits(self, images):
        return ops.cast(self.model(images, training=False), "float32")

    def __call__(self, images):
        with torch.no_grad(), keras.device(self.device):
            return self._forward(images)


def _fit_step(model: keras.Model, arch: ArchSpec, recipe: Recipe, *, device: str, precision: str, mode: str,
              epoch_data: Callable, synchronize: Callable[[], None]) -> _keras_fit.FitStep:
    """The fit style (keras_impl.fit) with this backend's Keras flags and BatchNorm kernel for ``mode``."""
    if mode not in EXECUTION_MODES:
        raise ValueError(f"unknown execution mode {mode!r}; choose one of {EXECUTION_MODES}")
    return _keras_fit.FitStep(model, arch, recipe, device=device, precision=precision, mode=mode,
                              epoch_data=epoch_data, synchronize=synchronize, compile_flags=_FIT_FLAGS[mode],
                              bn_implementation=_BN_IMPLEMENTATION[mode])
