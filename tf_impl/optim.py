"""The optimizer with common.optim_reference semantics and the compiled train step (mirror of torch_impl/optim.py).

Why a custom ``keras.optimizers.Optimizer`` subclass: Keras's built-in SGD
folds the LR into the momentum buffer (``v = m*v - lr*g``), which diverges
from torch as soon as the LR changes, and Keras's Adam adds epsilon before
the bias correction. ``_ReferenceSemanticsOptimizer.update_step`` implements
the torch conventions of ``common/optim_reference.py`` (coupled L2 or
decoupled decay, per-parameter decay flags from ``optim_reference.decays``).
Being a real Keras optimizer it keeps Keras's machinery: its LR is a
``tf.Variable`` (assigned outside the traced step, so a new LR never
retraces), ``iterations`` counts applied steps, and fp16 dynamic loss scaling
is Keras's own ``LossScaleOptimizer`` wrapped around it (torch GradScaler's
defaults: initial scale 2**16, x2 after 2000 finite steps, /2 and skip the
step on inf/NaN gradients).

Execution modes: "eager" runs the step as plain Python (op by op); "graph"
wraps it in ``tf.function``; "xla" in ``tf.function(jit_compile=True)``.
"""
from __future__ import annotations

from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from common.architectures import ArchSpec
from common.config import Recipe
from common.optim_reference import decays
from tf_impl.layers import BatchNorm
from tf_impl.weights import trainable_variable_names

LOSS_NAME = "softmax_cross_entropy_from_logits"
FP16_INITIAL_LOSS_SCALE = 2.0 ** 16  # torch.amp.GradScaler's init_scale (Keras's default is 2**15)
FP16_GROWTH_STEPS = 2000  # finite steps before the loss scale doubles (GradScaler's growth_interval)
EXECUTION_MODES = ("eager", "graph", "xla")
# BatchNorm kernel per execution mode (see tf_impl.layers.BatchNorm.implementation): TF's fused
# kernel where TF runs it (fastest, accurate), composed two-pass ops under XLA (XLA's lowering of
# the fused op uses a one-pass variance that fails parity). benchmarks/tf_bn_kernels.py, resnet20
# train b128, 2 cores, median of 2 rounds (2026-11-23 19:43 UTC): graph fused 651 / composed 436
# img/s; xla composed 331 / fused 316 img/s - the accurate choice is also the faster one in both modes.
_BN_IMPLEMENTATION = {"eager": "fused", "graph": "fused", "xla": "composed"}


class _ReferenceSemanticsOptimizer(keras.optimizers.Optimizer):
    """SGD (momentum, Nesterov) / Adam / AdamW with torch semantics, as ``common.optim_reference``.

    ``variable_names`` are the canonical names of the variables the optimizer
    is built on, in the same order; they decide which parameters decay.
    Slots: "momentum" (SGD with momentum > 0) or "m" and "v" (Adam/AdamW).

    The hyperparameters are this object's own attributes, set once from the
    recipe and the only values ``update_step`` reads, so the fairness audit
    reads what the optimizer really applies: ``kind`` ("sgd" | "adam"),
    ``sgd_momentum``, ``nesterov``, ``beta_1``, ``beta_2``, ``adam_epsilon``,
    ``decay_coefficient``, ``decay_mode`` and ``decay_flags`` (one per
    variable). Keras's own ``weight_decay`` stays None: decay is
    applied per parameter in ``update_step``.
    """

    def __init__(self, recipe: Recipe, variable_names: list[str], name: str | None = None):
        super().__init__(learning_rate=recipe.lr, name=name or f"reference_{recipe.optimizer}")
        self.variable_names = list(variable_names)
        self.kind = "sgd" if recipe.optimizer == "sgd" else "adam"  # adam and adamw differ only in decay mode
        self.sgd_momentum = float(recipe.momentum)
        self.nesterov = bool(recipe.nesterov and recipe.momentum > 0)  # as torch's SGD is built
        self.beta_1, self.beta_2 = float(recipe.adam_beta1), float(recipe.adam_beta2)
        self.adam_epsilon = float(recipe.adam_epsilon)
        self.decay_coefficient = float(recipe.weight_decay)
        self.decay_mode = recipe.weight_decay_mode
        self.decay_flags = [decays(name, recipe) for name in self.variable_names]  # aligned with the names

    def build(self, variables):
        if self.built:
            return
        if len(variables) != len(self.variable_names):
            raise ValueError(f"{len(variables)} variables but {len(self.variable_names)} names")
        super().build(variables)
        if self.kind == "sgd":
            names = ("momentum",) if self.sgd_momentum > 0 else ()
        else:
            names = ("m", "v")
        self.slot_names = names
        self.slots = [[self.add_variable_from_reference(v, slot) for v in variables] for slot in names]

    def slot_variables(self) -> dict[str, list]:
        """Slot name -> its variables, aligned with ``variable_names``."""
        return dict(zip(self.slot_names, self.slots))

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        lr = tf.cast(learning_rate, variable.dtype)
        grad = tf.cast(gradient, variable.dtype)
        if self.decay_flags[index]:
            if self.decay_mode == "coupled_l2":
                grad = grad + self.decay_coefficient * variable  # torch: grad.add(param, alpha=wd)
            else:
                self.assign(variable, variable * (1.0 - lr * self.decay_coefficient))  # torch AdamW
        if self.kind == "sgd":
            self._sgd_step(index, variable, grad, lr)
        else:
            self._adam_step(index, variable, grad, lr)

    def _sgd_step(self, index, variable, grad, lr):
        if self.sgd_momentum == 0:
            self.assign_sub(variable, lr * grad)
            return
        buffer = self.slots[0][index]
        # torch: buf = m*buf + g (the first step's buf = g equals this with buf initialised to 0)
        self.assign(buffer, self.sgd_momentum * buffer + grad)
        direction = grad + self.sgd_momentum * buffer if self.nesterov else buffer
        self.assign_sub(variable, lr * direction)

    def _adam_step(self, index, variable, grad, lr):
        m, v = self.slots[0][index], self.slots[1][index]
        self.assign(m, self.beta_1 * m + (1.0 - self.beta_1) * grad)
        self.assign(v, self.beta_2 * v + (1.0 - self.beta_2) * grad * grad)
        # Bias corrections in float64, as torch computes them from a Python step count:
        # 1 - 0.999**t in float32 is off by ~1e-5 relative at t = 1.
        step = tf.cast(self.iterations + 1, tf.float64)
        correction1 = 1.0 - tf.pow(tf.constant(self.beta_1, tf.float64), step)
        correction2 = 1.0 - tf.pow(tf.constant(self.beta_2, tf.float64), step)
        step_size = tf.cast(tf.cast(lr, tf.float64) / correction1, variable.dtype)
        correction2_sqrt = tf.cast(tf.sqrt(correction2), variable.dtype)
        # torch placement of epsilon: after sqrt(v) / sqrt(1 - b2^t) (Keras adds it before).
        denominator = tf.sqrt(v) / correction2_sqrt + self.adam_epsilon
        self.assign_sub(variable, step_size * m / denominator)


def build_optimizer(recipe: Recipe, variable_names: list[str], precision: str) -> keras.optimizers.Optimizer:
    """The optimizer for ``recipe`` over the variables named ``variable_names`` (dynamic loss scaling for fp16)."""
    optimizer = _ReferenceSemanticsOptimizer(recipe, variable_names)
    if precision != "fp16":
        return optimizer  # bf16 has float32's range: no loss scaling, as torch autocast
    return keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=FP16_INITIAL_LOSS_SCALE,
                                               dynamic_growth_steps=FP16_GROWTH_STEPS)


def softmax_cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
    """Mean cross-entropy from logits in float32; target (1-e)*onehot + e/K (torch's label smoothing)."""
    logits = tf.cast(logits, tf.float32)
    target = tf.one_hot(labels, num_classes, dtype=tf.float32)
    if label_smoothing:
        target = target * (1.0 - label_smoothing) + label_smoothing / num_classes
    return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels=target, logits=logits))


class TrainingLoss:
    """The loss the train step calls: ``softmax_cross_entropy`` with this object's ``label_smoothing``.

    The audit reads ``name`` and ``label_smoothing`` from here, the object the
    step really calls (read when the step is traced), so changing them after
    the build changes both the loss and what the audit reports.
    """

    name = LOSS_NAME

    def __init__(self, label_smoothing: float = 0.0, num_classes: int | None = None):
        self.label_smoothing = float(label_smoothing)
        self.num_classes = num_classes  # K of the smoothed target

    def __call__(self, logits, labels):
        return softmax_cross_entropy(logits, labels, self.num_classes, self.label_smoothing)


def compile_function(fn: Callable, mode: str) -> Callable:
    """``fn`` as run in execution ``mode``: eager (as is), graph (tf.function) or xla (jit_compile)."""
    if mode == "eager":
        return fn
    if mode not in EXECUTION_MODES:
        raise ValueError(f"unknown execution mode {mode!r}; choose one of {EXECUTION_MODES}")
    # reduce_retracing: a final partial batch retraces once with a generic batch dimension, not per size.
    return tf.function(fn, jit_compile=mode == "xla", reduce_retracing=True)


class TrainStep:
    """forward (dtype policy) -> float32 loss -> gradients (loss-scaled under fp16) -> optimizer update.

    ``__call__`` returns ``(mean_loss, correct_count)`` as device tensors (no host sync).
    """

    def __init__(self, model: keras.Model, arch: ArchSpec, recipe: Recipe, *, device: str = "/CPU:0",
                 precision: str = "fp32", mode: str = "graph"):
        self.model, self.arch, self.recipe = model, arch, recipe
        self.device, self.precision, self.mode = device, precision, mode
        self.variables = list(model.trainable_variables)
        self.variable_names = trainable_variable_names(model, arch)
        self.loss = TrainingLoss(recipe.label_smoothing, num_classes=int(model.output_shape[-1]))
        self.optimizer = build_optimizer(recipe, self.variable_names, precision)
        self.inner_optimizer = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        with tf.device(device):
            self.optimizer.build(self.variables)
        self.trace_count = 0  # Python side effect: counts traces in graph/xla modes
        self._step = compile_function(self._train_step, mode)

    @property
    def loss_scaling(self) -> str | None:
        return "dynamic" if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer) else None

    def _train_step(self, images, labels):
        self.trace_count += 1
        with tf.GradientTape() as tape, BatchNorm.using(_BN_IMPLEMENTATION[self.mode]):
            logits = self.model(images, training=True)
            loss = self.loss(logits, labels)
            scaled = self.optimizer.scale_loss(loss)  # identity unless fp16 loss scaling
        gradients = tape.gradient(scaled, self.variables)
        self.optimizer.apply(gradients, self.variables)  # unscales (fp16) and skips non-finite steps
        predictions = tf.argmax(logits, axis=-1, output_type=tf.int64)
        correct = tf.reduce_sum(tf.cast(tf.equal(predictions, tf.cast(labels, tf.int64)), tf.int32))
        return loss, correct

    def __call__(self, images, labels, lr: float):
        # Assigning the LR variable here, outside the traced function, never retraces it.
        self.inner_optimizer.learning_rate = float(lr)
        with tf.device(self.device):
            return self._step(images, labels)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Slots keyed "<slot>/<canonical name>" (canonical layout = Keras layout), plus "step".

        Under fp16 also "loss_scale" and "loss_scale_growth_tracker" (the
        dynamic loss scaler's state, needed for an exact resume).
        """
        state = {"step": np.array(int(self.inner_optimizer.iterations.numpy()), np.int64)}
        for slot, variables in self.inner_optimizer.slot_variables().items():
            for name, variable in zip(self.variable_names, variables):
                state[f"{slot}/{name}"] = np.array(variable.numpy(), np.float32, copy=True)
        if self.loss_scaling:
            state["loss_scale"] = np.array(self.optimizer.dynamic_scale.numpy(), np.float32)
            state["loss_scale_growth_tracker"] = np.array(self.optimizer.step_counter.numpy(), np.int64)
        return state

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        """Inverse of ``optimizer_state``: same keys, every shape asserted before its copy."""
        expected = {k: v.shape for k, v in self.optimizer_state().items()}
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or extra:
            raise ValueError(f"optimizer state mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
        for key, shape in expected.items():
            if tuple(np.shape(state[key])) != tuple(shape):
                raise ValueError(f"optimizer state {key}: shape {np.shape(state[key])}, expected {shape}")
        self.inner_optimizer.iterations.assign(int(state["step"]))
        for slot, variables in self.inner_optimizer.slot_variables().items():
            for name, variable in zip(self.variable_names, variables):
                variable.assign(np.asarray(state[f"{slot}/{name}"], np.float32))
        if self.loss_scaling:
            self.optimizer.dynamic_scale.assign(float(state["loss_scale"]))
            self.optimizer.step_counter.assign(int(state["loss_scale_growth_tracker"]))


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

