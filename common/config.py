"""Typed, frozen configuration: the training recipe and the spec of one run.

Every field carries its unit. Both backends read the same Recipe, so every
hyperparameter that differs between framework defaults (BN momentum, Adam
epsilon, weight-decay semantics...) is set here once, explicitly.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from common.errors import ConfigError
from common.execution import ExecutionConfig

OPTIMIZERS = ("sgd", "adam", "adamw")
WEIGHT_DECAY_MODES = ("coupled_l2", "decoupled")
SCHEDULES = ("constant", "step", "cosine", "onecycle")
PRECISIONS = ("fp32", "bf16", "fp16")
INIT_SCHEMES = ("torch_default", "he_normal_fan_out", "glorot_uniform")
LR_SCALING = ("none", "linear")  # data-parallel LR rule: as given, or x world size (Goyal et al. 2017)
# Execution modes per backend. "auto": the configuration measured fastest (and correct) on this
# machine by compare.tune (cached per machine); "best": the fixed fallback (common.execution.FALLBACK).
BACKEND_MODES = {
    "torch": ("auto", "best", "eager", "compile"),
    "tensorflow": ("auto", "best", "eager", "graph", "xla"),
    "keras-torch": ("auto", "best", "eager", "jit_compile"),  # jit_compile: torch.compile, as Keras's own flag
}
# Execution styles per backend: "custom" = the hand-written training step; "fit" = Keras's own
# model.compile + model.fit on the same pipeline, model, optimizer and loss (keras_impl.fit).
BACKEND_STYLES = {
    "torch": ("custom",),
    "tensorflow": ("custom", "fit"),
    "keras-torch": ("custom", "fit"),
}
STYLES = ("custom", "fit")
# Backends without a data-parallel engine (keras-torch: Keras's torch backend has no distribution API
# for a custom loop; DDP around a Keras model is not Keras's own engine): nproc * nnodes must be 1.
SINGLE_PROCESS_BACKENDS = ("keras-torch",)
DEVICE_PATTERN = re.compile(r"^(auto|cpu|(cuda|gpu)(:\d+)?)$", re.IGNORECASE)  # what both backends accept
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # per-channel mean of CIFAR-10 train, in [0, 1]
CIFAR_STD = (0.2470, 0.2435, 0.2616)  # per-channel std of CIFAR-10 train, in [0, 1]
# Recipe fields whose default depends on the dataset (common.data.defaults fills those a user did not set)
DATA_DEFAULT_FIELDS = ("crop_padding", "horizontal_flip", "mean", "std")


@dataclass(frozen=True)
class Recipe:
    """How to train. Identical for both backends; each maps it onto its own API."""

    epochs: int = 10  # full passes over the training set
    batch_size: int = 128  # images per training step
    eval_batch_size: int = 500  # images per evaluation step (does not change results)
    drop_last: bool = True  # drop the final partial training batch
    optimizer: str = "sgd"  # one of OPTIMIZERS
    lr: float = 0.05  # peak learning rate (per step, not scaled by batch size)
    momentum: float = 0.9  # SGD momentum (torch semantics: buf = m*buf + g)
    nesterov: bool = True  # SGD Nesterov momentum
    weight_decay: float = 5e-4  # L2 / decoupled decay coefficient
    weight_decay_mode: str = "coupled_l2"  # coupled_l2: g += wd*w (torch SGD); decoupled: w -= lr*wd*w
    decay_bn_and_bias: bool = True  # apply weight decay to BN parameters and biases too
    adam_beta1: float = 0.9  # Adam first-moment decay
    adam_beta2: float = 0.999  # Adam second-moment decay
    adam_epsilon: float = 1e-8  # added to sqrt(v_hat) (torch placement, not keras's)
    schedule: str = "cosine"  # one of SCHEDULES; evaluated per step in common.schedules
    warmup_epochs: float = 0.0  # linear warm-up from 0 to lr, in epochs
    step_milestones: tuple[float, ...] = (0.5, 0.75)  # step schedule: fractions of training
    step_gamma: float = 0.1  # step schedule: LR multiplier at each milestone
    onecycle_pct_start: float = 0.25  # one-cycle: fraction of steps spent rising
    final_lr_fraction: float = 0.0  # cosine / one-cycle: final LR as a fraction of lr
    label_smoothing: float = 0.0  # cross-entropy label smoothing, in [0, 1)
    bn_momentum: float = 0.1  # torch convention: running = (1-m)*running + m*batch
    bn_epsilon: float = 1e-5  # added to the variance in BatchNorm
    dropout: float | None = None  # dropout rate of models that have a dropout layer; None = the architecture's
    init_scheme: str = "torch_default"  # one of INIT_SCHEMES (common.init)
    augment: bool = True  # random pad-and-crop, plus a horizontal flip where horizontal_flip
    crop_padding: int = 4  # pixels of zero padding before the random crop (dataset default: side / 8)
    horizontal_flip: bool = True  # mirror half of the crops at random (dataset default: off for digits)
    mean: tuple[float, ...] = CIFAR_MEAN  # normalisation mean per channel, in [0, 1]
    std: tuple[float, ...] = CIFAR_STD  # normalisation std per channel, in [0, 1]
    defaults_source: str = ""  # whose defaults filled defaulted_fields ("" = this dataclass's own, CIFAR-10's)
    defaulted_fields: tuple[str, ...] = ()  # DATA_DEFAULT_FIELDS that took the dataset's default, not a flag

    def __post_init__(self) -> None:
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("weight_decay_mode", self.weight_decay_mode, WEIGHT_DECAY_MODES)
        _one_of("schedule", self.schedule, SCHEDULES)
        _one_of("init_scheme", self.init_scheme, INIT_SCHEMES)
        for name in ("epochs", "batch_size", "eval_batch_size", "lr", "adam_epsilon", "bn_epsilon", "step_gamma"):
            _positive(name, getattr(self, name))
        for name in ("momentum", "adam_beta1", "adam_beta2", "bn_momentum", "label_smoothing"):
            _in_unit_interval(name, getattr(self, name))
        if self.dropout is not None:
            _in_unit_interval("dropout", self.dropout)
        for name in ("weight_decay", "crop_padding"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}", name)
        if not 0.0 < self.onecycle_pct_start < 1.0:
            raise ConfigError(f"onecycle_pct_start must be in (0, 1), got {self.onecycle_pct_start}",
                              "onecycle_pct_start")
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ConfigError(f"final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}",
                              "final_lr_fraction")
        if any(not 0.0 <= m <= 1.0 for m in self.step_milestones):
            raise ConfigError(f"step_milestones are fractions of training in [0, 1], got {self.step_milestones}",
                              "step_milestones")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise ConfigError(f"warmup_epochs must be in [0, epochs], got {self.warmup_epochs}", "warmup_epochs")
        if len(self.mean) != len(self.std):
            raise ConfigError("mean and std need one value per channel", "std")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std must be > 0 per channel, got {self.std}", "std")
        unknown = sorted(set(self.defaulted_fields) - set(DATA_DEFAULT_FIELDS))
        if unknown:
            raise ConfigError(f"defaulted_fields may only name {', '.join(DATA_DEFAULT_FIELDS)}, got {unknown}",
                              "defaulted_fields")


@dataclass(frozen=True)
class RunSpec:
    """One run: one backend training one model on one dataset with one seed."""

    model: str  # registered model name (common.registry.list_models())
    backend: str  # "torch" or "tensorflow" (or a test backend)
    data: str = "synthetic"  # dataset SPEC (common.data)
    seed: int = 0  # drives init weights, sampler order, augmentation, subsets
    device: str = "auto"  # auto | cpu | cuda | cuda:N (TensorFlow: GPU:N)
    precision: str = "fp32"  # one of PRECISIONS
    mode: str = "auto"  # requested execution mode, one of BACKEND_MODES[backend]
    style: str = "custom"  # execution style, one of BACKEND_STYLES[backend]: custom step or Keras fit
    channels_last: bool | None = None  # torch memory format; None = the search / fallback decides
    execution: ExecutionConfig | None = None  # resolved by the parent (compare.tune); None: fallback + pins
    deterministic: bool = False  # framework determinism switches (slower)
    allow_tf32: bool = False  # TensorFloat-32 matmuls/convs on Ampere+ GPUs
    threads: int | None = None  # intra-op threads for both frameworks; None = all cores
    train_subset: int | None = None  # stratified training subset size (images)
    test_subset: int | None = None  # stratified test subset size (images)
    warmup_steps: int = 5  # steps excluded from throughput (after the compile step)
    max_steps_per_epoch: int | None = None  # cap steps per epoch (smoke tests, bench)
    checkpoint_dir: str | None = None  # per-epoch checkpoints here; resume if present
    nproc: int = 1  # data-parallel processes per host (each framework's own engine when the world is > 1)
    nnodes: int = 1  # hosts taking part; world size = nproc * nnodes replicas, one per process
    lr_scaling: str = "none"  # one of LR_SCALING: peak LR as given, or x world size ("linear")
    collective_timeout_s: float = 300.0  # a collective waiting longer than this ends the run (seconds)
    final_weights_path: str | None = None  # the worker saves the final canonical weights here (.npz); None: not kept
    eval_every_steps: int | None = None  # also evaluate every this many optimiser steps (None: epoch ends only)
    target_accuracy: float | None = None  # test accuracy in (0, 1] whose first crossing is timed (time to accuracy)
    recipe: Recipe = field(default_factory=Recipe)  # recipe.batch_size is PER REPLICA (global = x world size)

    def __post_init__(self) -> None:
        modes = BACKEND_MODES.get(self.backend)
        if modes is not None:
            _one_of("mode", self.mode, modes, what=f"mode for {self.backend}")
            if self.execution is not None and self.execution.mode != "best":
                _one_of("mode", self.execution.mode, modes[2:], what=f"execution mode for {self.backend}")
        _one_of("style", self.style, BACKEND_STYLES.get(self.backend, ("custom",)),
                what=f"execution style for {self.backend}")
        _one_of("precision", self.precision, PRECISIONS)
        if not DEVICE_PATTERN.match(str(self.device).strip()):
            raise ConfigError(f"unknown device {self.device!r}: use auto, cpu, cuda, cuda:N, gpu or gpu:N", "device")
        if self.target_accuracy is not None and not 0.0 < self.target_accuracy <= 1.0:
            raise ConfigError(f"target_accuracy is a fraction in (0, 1], got {self.target_accuracy}", "target_accuracy")
        for name in ("threads", "train_subset", "test_subset", "max_steps_per_epoch", "eval_every_steps"):
            value = getattr(self, name)
            if value is not None:
                _positive(name, value)
        for name in ("warmup_steps", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}", name)
        _positive("nproc", self.nproc)
        _positive("nnodes", self.nnodes)
        _positive("collective_timeout_s", self.collective_timeout_s)
        _one_of("lr_scaling", self.lr_scaling, LR_SCALING)
        if self.world_size > 1 and not self.recipe.drop_last:
            # DDP and tf.distribute average per-replica means: replicas need equal batches
            raise ConfigError("a data-parallel run needs drop_last (equal per-replica batches)", "nproc")
        if self.world_size > 1 and self.backend in SINGLE_PROCESS_BACKENDS:
            engines = ", ".join(b for b in BACKEND_MODES if b not in SINGLE_PROCESS_BACKENDS)
            raise ConfigError(f"{self.backend} has no data-parallel engine here: run it with nproc 1 "
                              f"(data-parallel runs: {engines})", "nproc")
        if self.world_size > 1 and self.style != "custom":
            raise ConfigError(f"the {self.style} style runs in one process: data-parallel runs use the custom step",
                              "nproc")

    @property
    def world_size(self) -> int:
        """Data-parallel replicas (processes) in the run."""
        return self.nproc * self.nnodes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RunSpec":
        raw = dict(raw)
        recipe_raw = dict(raw.pop("recipe", {}) or {})
        for key in ("step_milestones", "mean", "std", "defaulted_fields"):
            if key in recipe_raw:
                recipe_raw[key] = tuple(recipe_raw[key])
        execution = raw.pop("execution", None)
        execution = ExecutionConfig.from_dict(execution) if isinstance(execution, dict) else execution
        return cls(**raw, recipe=Recipe(**recipe_raw), execution=execution)

    def run_id(self) -> str:
        """Stable identifier of this run inside a results folder (``__worldN`` for data-parallel runs)."""
        base = f"{self.model}__{self.series()}__seed{self.seed}".replace(":", "-")
        return base if self.world_size == 1 else f"{base}__world{self.world_size}"

    def series(self) -> str:
        """What the tables compare: the backend, or "<backend>:fit" for Keras's fit style."""
        return series_name(self.backend, self.style)


def series_name(backend: str, style: str = "custom") -> str:
    """"tensorflow" for the custom step, "tensorflow:fit" for the fit style (tables, plots, the audit)."""
    return backend if style == "custom" else f"{backend}:{style}"


def _one_of(name: str, value: Any, allowed: tuple[str, ...], what: str | None = None) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {what or name} {value!r}; choose one of: {', '.join(allowed)}", name)


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}", name)


def _in_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), got {value}", name)
