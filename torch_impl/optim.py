"""The optimizer and the training step (mirror of tf_impl/optim.py).

Recipe -> torch's native optimizers, matching common.optim_reference (whose
conventions ARE torch's):

* sgd + coupled_l2  -> ``torch.optim.SGD(momentum, nesterov, weight_decay)``
* sgd + decoupled   -> ``torch.optim.SGD(weight_decay=0)`` plus ``p *= 1 - lr*wd`` on the decaying
  parameters right before ``step()`` (torch has no decoupled SGD; this is AdamW's rule, in the
  reference's order: decay first, then the gradient update)
* adam|adamw + decoupled  -> ``torch.optim.AdamW``;  adam|adamw + coupled_l2 -> ``torch.optim.Adam``
  (the reference defines the update by ``weight_decay_mode`` alone, so "adamw" with coupled_l2
  is Adam with L2 in the gradient)

``decay_bn_and_bias=False`` gives two parameter groups (kernels decay, the rest
do not). Fused kernels (CPU and CUDA) are used where torch has them, else foreach.
The learning rate arrives per step as a Python float and is written into the
param groups; only the forward + loss is compiled, so a new LR never recompiles.

Data-parallel (``engine``, torch_impl.distributed): the forward runs through
DDP, which averages the gradients over the replicas during backward; the
step's loss and correct count are then summed over the replicas in one
all-reduce (as on the TensorFlow side), so it returns the global mean loss.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from common.architectures import ArchSpec
from common.config import Recipe
from common.optim_reference import decays
from common.weights import from_torch, to_torch
from torch_impl.weights import canonical_variables

LOSS_NAME = "softmax_cross_entropy_from_logits"
# fp16 dynamic loss scaling, set explicitly (these are GradScaler's defaults; the Keras side sets the same)
FP16_INITIAL_LOSS_SCALE = 2.0 ** 16  # initial scale
FP16_GROWTH_STEPS = 2000  # finite steps before the loss scale doubles
EXECUTION_MODES = ("eager", "compile")
_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_SLOT_PREFIX = {"momentum_buffer": "momentum", "exp_avg": "m", "exp_avg_sq": "v"}  # torch key -> canonical


def _fused_supported(device: torch.device) -> bool:
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    return device.type in _get_fused_kernels_supported_devices()


def build_optimizer(groups: list[dict[str, Any]], recipe: Recipe, device: torch.device) -> torch.optim.Optimizer:
    """The torch optimizer for ``recipe`` over ``groups`` (each with its own weight_decay)."""
    # fused: one kernel per step on CUDA/CPU; foreach (multi-tensor) otherwise. torch's default
    # picks foreach only on CUDA, so both are set explicitly.
    impl = {"fused": True} if _fused_supported(device) else {"foreach": True}
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum,
                               nesterov=recipe.nesterov and recipe.momentum > 0, **impl)
    adam = torch.optim.AdamW if recipe.weight_decay_mode == "decoupled" else torch.optim.Adam
    # eps: torch adds it to sqrt(v_hat), the reference's placement (keras would add it before bias correction).
    return adam(groups, lr=recipe.lr, betas=(recipe.adam_beta1, recipe.adam_beta2), eps=recipe.adam_epsilon, **impl)


def _parameter_groups(model: nn.Module, arch: ArchSpec, recipe: Recipe) -> list[dict[str, Any]]:
    """One group that decays and one that does not (empty groups dropped), in canonical order."""
    tensors = canonical_variables(model, arch)
    decay, keep = [], []
    for name in arch.trainable_names():
        (decay if decays(name, recipe) else keep).append(tensors[name][2])
    sgd_decoupled = recipe.optimizer == "sgd" and recipe.weight_decay_mode == "decoupled"
    wd = recipe.weight_decay
    # "sgd_decoupled_decay" is our own group key (torch keeps extra keys): the factor of p *= 1 - lr*wd.
    # The no-decay group sets weight_decay=0 explicitly: AdamW's default is 0.01.
    groups = [{"params": decay, "weight_decay": 0.0 if sgd_decoupled else wd,
               "sgd_decoupled_decay": wd if sgd_decoupled else 0.0},
              {"params": keep, "weight_decay": 0.0, "sgd_decoupled_decay": 0.0}]
    return [g for g in groups if g["params"]]


def softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy from logits in float32; target (1-e)*onehot + e/K (torch's label smoothing)."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


class TrainingLoss:
    """The loss the train step calls: ``softmax_cross_entropy`` with this object's ``label_smoothing``.

    The audit reads ``name`` and ``label_smoothing`` from here, the object the
    step really calls, so changing them after the build changes both the loss
    and what the audit reports.
    """

    name = LOSS_NAME

    def __init__(self, label_smoothing: float = 0.0, num_classes: int | None = None):
        self.label_smoothing = float(label_smoothing)
        self.num_classes = num_classes  # unused: torch's label smoothing takes K from the logits

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return softmax_cross_entropy(logits, labels, self.label_smoothing)


def compile_function(fn: Callable, mode: str) -> Callable:
    """``fn`` as run in execution ``mode``: eager (as is) or compile (torch.compile, inductor).

    dynamic=False: at most two batch shapes (a kept last partial batch), each specialised.
    """
    if mode not in EXECUTION_MODES:
        raise ValueError(f"unknown execution mode {mode!r}; choose one of {EXECUTION_MODES}")
    return torch.compile(fn, dynamic=False) if mode == "compile" else fn


class TrainStep:
    """forward (autocast) -> float32 loss -> backward (GradScaler under fp16) -> optimizer step.

    ``__call__`` returns ``(mean_loss, correct_count)`` as device tensors (no host sync).
    """

    style = "custom"  # a hand-written training step (the Keras backends also offer Keras's fit)

    def __init__(self, model: nn.Module, arch: ArchSpec, recipe: Recipe, *, device: torch.device,
                 precision: str, mode: str, engine: Any = None):
        self.model, self.arch, self.recipe = model, arch, recipe
        self.engine = engine  # torch_impl.distributed.Engine of a data-parallel run, else None
        self.world_size = engine.replica.world_size if engine is not None else 1
        self.forward_model = engine.wrap_model(model) if engine is not None else model  # DDP or the model
        self.device, self.precision, self.mode = device, precision, mode
        self.autocast_dtype = _AUTOCAST_DTYPES[precision]
        self.loss = TrainingLoss(recipe.label_smoothing)
        tensors = canonical_variables(model, arch)
        self.trainable = {name: tensors[name] for name in arch.trainable_names()}
        self.optimizer = build_optimizer(_parameter_groups(model, arch, recipe), recipe, device)
        # fp16 needs dynamic loss scaling against gradient underflow; bf16 has fp32's range and does not.
        self.scaler = torch.amp.GradScaler(device.type, init_scale=FP16_INITIAL_LOSS_SCALE,
                                           growth_interval=FP16_GROWTH_STEPS, enabled=precision == "fp16")
        self.steps = 0  # optimizer steps taken (calls), for optimizer_state()["step"]
        # Only the model's forward is compiled (as a hand-written torch.compile loop does): backward runs
        # its compiled backward graph; the loss, the argmax and the optimizer run eager (the optimizer
        # reads the LR from the param groups, so changing the LR never recompiles). Compiling the loss
        # and the argmax into the same graph runs at the same speed (benchmarks/compile_region.py).
        self._model_forward = compile_function(self.forward_model, mode)

    @property
    def loss_scaling(self) -> str | None:
        return "dynamic" if self.scaler.is_enabled() else None

    def _forward_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            logits = self._model_forward(images)
        logits = logits.float()  # the loss is always computed in float32
        loss = self.loss(logits, labels)
        correct = (logits.argmax(dim=1) == labels).sum()
        return loss, correct

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.forward_model.training:
            self.forward_model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = float(lr)
        loss, correct = self._forward_loss(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self._decoupled_sgd_decay(float(lr))
        self.scaler.step(self.optimizer)  # plain optimizer.step() unless fp16
        self.scaler.update()
        self.steps += 1
        if self.world_size > 1:
            return self._global_mean(loss.detach(), correct)
        return loss.detach(), correct

    def _global_mean(self, loss: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss, correct count) over all replicas: one all-reduce of both (SUM), then / replicas."""
        totals = torch.stack([loss.float(), correct.float()])
        dist.all_reduce(totals)
        return totals[0] / self.world_size, totals[1]

    def _decoupled_sgd_decay(self, lr: float) -> None:
        """w *= 1 - lr*wd before the SGD update (decoupled decay; a no-op for other optimizers)."""
        groups = [g for g in self.optimizer.param_groups if g["sgd_decoupled_decay"]]
        if not groups:
            return
        with torch.no_grad():
            finite = None
            if self.scaler.is_enabled():
                # The scaler skips step() on inf/NaN gradients; skip the decay too, without a host
                # sync: unscale now (step() will not unscale twice) and mask the factor.
                self.scaler.unscale_(self.optimizer)
                grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
                finite = torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
            for group in groups:
                factor: Any = 1.0 - lr * group["sgd_decoupled_decay"]
                if finite is not None:
                    factor = torch.where(finite, torch.tensor(factor, device=self.device), 1.0)
                torch._foreach_mul_(group["params"], factor)

    # -- state for checkpoints -------------------------------------------------
    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Slots in the canonical layout ('momentum/<name>', 'm/<name>', 'v/<name>') and 'step'."""
        state: dict[str, np.ndarray] = {"step": np.array(self.steps, np.int64)}
        for name, (layer, param, tensor) in self.trainable.items():
            slots = self.optimizer.state.get(tensor, {})
            for key, prefix in _SLOT_PREFIX.items():
                if slots.get(key) is not None:
                    array = slots[key].detach().float().contiguous().cpu().numpy()
                    state[f"{prefix}/{name}"] = from_torch(layer, param, array)
            if "step" in slots:  # Adam's own count (excludes fp16-skipped steps)
                state["step"] = np.array(int(slots["step"].item()), np.int64)
        if self.scaler.is_enabled():
            state["loss_scale"] = np.array(self.scaler.get_scale(), np.float32)
            state["loss_scale_growth_tracker"] = np.array(self.scaler.state_dict()["_growth_tracker"], np.int64)
        return state

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore ``optimizer_state()`` output so the next step equals an uninterrupted run's."""
        self.steps = int(state["step"])
        index = {id(p): i for i, p in enumerate(p for g in self.optimizer.param_groups for p in g["params"])}
        restored: dict[int, dict[str, torch.Tensor]] = {}
        for name, (layer, param, tensor) in self.trainable.items():
            entry = {}
            for key, prefix in _SLOT_PREFIX.items():
                if f"{prefix}/{name}" in state:
                    array = to_torch(layer, param, np.asarray(state[f"{prefix}/{name}"], np.float32))
                    # empty_like keeps the parameter's device and memory format (channels_last)
                    entry[key] = torch.empty_like(tensor).copy_(torch.from_numpy(array))
            if entry and self.recipe.optimizer != "sgd":
                entry["step"] = torch.tensor(float(self.steps), dtype=torch.float32)
            if entry:
                restored[index[id(tensor)]] = entry
        saved = self.optimizer.state_dict()
        self.optimizer.load_state_dict({"state": restored, "param_groups": saved["param_groups"]})
        if self.scaler.is_enabled() and "loss_scale" in state:
            self.scaler.load_state_dict({**self.scaler.state_dict(), "scale": float(state["loss_scale"]),
                                         "_growth_tracker": int(state["loss_scale_growth_tracker"])})


class EvalStep:
    """images -> float32 logits in eval mode (autocast per precision; compiled in compile mode)."""

    def __init__(self, model: nn.Module, *, device: torch.device, precision: str, mode: str):
        self.model, self.device = model, device
        self.autocast_dtype = _AUTOCAST_DTYPES[precision]
        self._forward = compile_function(self._logits, mode)

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            return self.model(images).float()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.model.training:
            self.model.eval()
        with torch.no_grad():
            return self._forward(images)

