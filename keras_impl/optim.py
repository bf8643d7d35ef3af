"""The optimizer with common.optim_reference semantics and the loss, in keras.ops, for every Keras backend.

Why a custom ``keras.optimizers.Optimizer`` subclass: Keras's built-in SGD
folds the LR into the momentum buffer (``v = m*v - lr*g``), which diverges
from torch as soon as the LR changes, and Keras's Adam adds epsilon before
the bias correction. ``ReferenceSemanticsOptimizer.update_step`` implements
the torch conventions of ``common/optim_reference.py`` (coupled L2 or
decoupled decay, per-parameter decay flags from ``optim_reference.decays``)
with ``keras.ops`` only, so the same update rule runs on TensorFlow and on
PyTorch. Being a real Keras optimizer it keeps Keras's machinery: its LR is a
Keras variable (assigned outside a compiled step, so a new LR never
retraces or recompiles), ``iterations`` counts applied steps, and fp16
dynamic loss scaling is Keras's own ``LossScaleOptimizer`` wrapped around it
(torch GradScaler's defaults: initial scale 2**16, x2 after 2000 finite
steps, /2 and skip the step on inf/NaN gradients).

The compiled training steps that call it are backend-specific
(tf_impl/optim.py, kerastorch_impl/optim.py); the optimizer's state I/O in
the canonical layout is shared here.
"""
from __future__ import annotations

import keras
import numpy as np
from keras import ops

from common.config import Recipe
from common.optim_reference import decays
from keras_impl.weights import to_numpy

LOSS_NAME = "softmax_cross_entropy_from_logits"
FP16_INITIAL_LOSS_SCALE = 2.0 ** 16  # torch.amp.GradScaler's init_scale (Keras's default is 2**15)
FP16_GROWTH_STEPS = 2000  # finite steps before the loss scale doubles (GradScaler's growth_interval)


class ReferenceSemanticsOptimizer(keras.optimizers.Optimizer):
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
        lr = ops.cast(learning_rate, variable.dtype)
        grad = ops.cast(gradient, variable.dtype)
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
        step = ops.cast(self.iterations + 1, "float64")
        correction1 = 1.0 - ops.power(ops.cast(self.beta_1, "float64"), step)
        correction2 = 1.0 - ops.power(ops.cast(self.beta_2, "float64"), step)
        step_size = ops.cast(ops.cast(lr, "float64") / correction1, variable.dtype)
        correction2_sqrt = ops.cast(ops.sqrt(correction2), variable.dtype)
        # torch placement of epsilon: after sqrt(v) / sqrt(1 - b2^t) (Keras adds it before).
        denominator = ops.sqrt(v) / correction2_sqrt + self.adam_epsilon
        self.assign_sub(variable, step_size * m / denominator)


def build_optimizer(recipe: Recipe, variable_names: list[str], precision: str) -> keras.optimizers.Optimizer:
    """The optimizer for ``recipe`` over the variables named ``variable_names`` (dynamic loss scaling for fp16)."""
    optimizer = ReferenceSemanticsOptimizer(recipe, variable_names)
    if precision != "fp16":
        return optimizer  # bf16 has float32's range: no loss scaling, as torch autocast
    return keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=FP16_INITIAL_LOSS_SCALE,
                                               dynamic_growth_steps=FP16_GROWTH_STEPS)


def softmax_cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0, reduce: bool = True):
    """Cross-entropy from logits in float32 (the batch mean, or per image without ``reduce``);
    target (1-e)*onehot + e/K (torch's label smoothing)."""
    logits = ops.cast(logits, "float32")
    target = ops.one_hot(ops.cast(labels, "int32"), num_classes, dtype="float32")
    if label_smoothing:
        target = target * (1.0 - label_smoothing) + label_smoothing / num_classes
    per_image = ops.categorical_crossentropy(target, logits, from_logits=True)
    return ops.mean(per_image) if reduce else per_image


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


def correct_count(logits, labels):
    """Number of images whose arg-max logit is the label (int32 scalar tensor)."""
    predictions = ops.argmax(logits, axis=-1)
    return ops.sum(ops.cast(ops.equal(ops.cast(predictions, "int64"), ops.cast(labels, "int64")), "int32"))


def inner_optimizer(optimizer: keras.optimizers.Optimizer) -> ReferenceSemanticsOptimizer:
    """The reference-semantics optimizer itself (inside a LossScaleOptimizer under fp16)."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def loss_scaling(optimizer: keras.optimizers.Optimizer) -> str | None:
    """"dynamic" when fp16 loss scaling wraps the optimizer, else None."""
    return "dynamic" if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) else None


def optimizer_state(optimizer: keras.optimizers.Optimizer, variable_names: list[str]) -> dict[str, np.ndarray]:
    """Slots keyed "<slot>/<canonical name>" (canonical layout = Keras layout), plus "step".

    Under fp16 also "loss_scale" and "loss_scale_growth_tracker" (the
    dynamic loss scaler's state, needed for an exact resume).
    """
    inner = inner_optimizer(optimizer)
    state = {"step": np.array(int(to_numpy(inner.iterations, np.int64)), np.int64)}
    for slot, variables in inner.slot_variables().items():
        for name, variable in zip(variable_names, variables):
            state[f"{slot}/{name}"] = to_numpy(variable).copy()
    if loss_scaling(optimizer):
        state["loss_scale"] = to_numpy(optimizer.dynamic_scale)
        state["loss_scale_growth_tracker"] = to_numpy(optimizer.step_counter, np.int64)
    return state


def load_optimizer_state(optimizer: keras.optimizers.Optimizer, variable_names: list[str],
                         state: dict[str, np.ndarray]) -> None:
    """Inverse of ``optimizer_state``: same keys, every shape asserted before its copy."""
    expected = {k: v.shape for k, v in optimizer_state(optimizer, variable_names).items()}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"optimizer state mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
    for key, shape in expected.items():
        if tuple(np.shape(state[key])) != tuple(shape):
            raise ValueError(f"optimizer state {key}: shape {np.shape(state[key])}, expected {shape}")
    inner = inner_optimizer(optimizer)
    inner.iterations.assign(int(state["step"]))
    for slot, variables in inner.slot_variables().items():
        for name, variable in zip(variable_names, variables):
            variable.assign(np.asarray(state[f"{slot}/{name}"], np.float32))
    if loss_scaling(optimizer):
        optimizer.dynamic_scale.assign(float(state["loss_scale"]))
        optimizer.step_counter.assign(int(state["loss_scale_growth_tracker"]))


class OptimizerStateMixin:
    """``optimizer_state`` / ``load_optimizer_state`` of a Keras train step (custom or fit, either backend):
    the step holds ``optimizer`` and ``variable_names`` (canonical names, in the optimizer's order)."""

    optimizer: keras.optimizers.Optimizer
    variable_names: list[str]

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Slots keyed "<slot>/<canonical name>", "step" (and the fp16 loss scaler's state)."""
        return optimizer_state(self.optimizer, self.variable_names)

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        """Inverse of ``optimizer_state``: same keys, every shape asserted before its copy."""
        load_optimizer_state(self.optimizer, self.variable_names, state)
