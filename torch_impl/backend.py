"""``Backend``: PyTorch behind common.backend.Backend (mirror of tf_impl/backend.py).

The documentation of every method lives on the protocol in common/backend.py;
this file records only the torch-specific choices, with the framework
defaults they override.
"""
from __future__ import annotations

import os
import re
import shutil
from importlib import metadata
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from common.audit import decay_settings, fallbacks_text, normalization_text, single_value
from common.backend import residency_summary
from common.config import RunSpec
from common.distributed import Replica, audit_settings, single_process, thread_budget
from common.errors import UserError
from common.execution import ExecutionConfig, requested
from common.sampler import EpochPlan
from torch_impl import distributed
from torch_impl import weights as weight_io
from torch_impl.data import EvalPipeline, TrainPipeline
from torch_impl.models import create_model
from torch_impl.optim import EvalStep, TrainStep

# The fixed fallback mode per device type ("best": used where no per-machine search chose one,
# see common.execution.FALLBACK): chosen with benchmarks/mode_matrix.py on the CPU; CUDA: the usual
# fastest for convnets (NHWC tensor-core convs, fused BN/ReLU epilogues), unmeasured until a GPU run
# of benchmarks/tune_check.py confirms it.
FALLBACK_MODE = {"cpu": "eager", "cuda": "compile"}
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|(?:cuda|gpu)(?::(\d+))?)$")


def resolve_device(text: str) -> torch.device:
    """auto | cpu | cuda | cuda:N | gpu | gpu:N -> torch.device; UserError naming the fix otherwise."""
    match = _DEVICE_PATTERN.match(text.strip().lower())
    if match is None:
        raise UserError(f"unknown device {text!r}: use auto, cpu, cuda, cuda:N, gpu or gpu:N")
    kind, index = match.group(1), match.group(2)
    if kind == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"--device {text} requested but no CUDA device is visible to PyTorch: "
                        "use --device cpu or auto")
    index = int(index or 0)
    if index >= torch.cuda.device_count():
        raise UserError(f"--device {text}: PyTorch sees {torch.cuda.device_count()} CUDA device(s) "
                        f"(0..{torch.cuda.device_count() - 1}): pick one of those or use --device auto")
    return torch.device(f"cuda:{index}")


def resolve_mode(mode: str, device: torch.device) -> str:
    """Resolve "best" (and "auto" when no search resolved it) to this device type's fallback mode."""
    if mode in ("best", "auto"):
        mode = FALLBACK_MODE[device.type]
    if mode == "compile" and device.type == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None:
        raise UserError("--mode compile on the CPU needs a C++ compiler for TorchInductor (g++ not found): "
                        "install g++ or use --mode eager")
    return mode


def _replica_device(device: torch.device, spec: RunSpec) -> torch.device:
    """A data-parallel process on CUDA uses the GPU of its local rank (torchrun's convention)."""
    if spec.world_size == 1 or device.type != "cuda":
        return device
    if re.search(r":\d+$", spec.device.strip()):
        raise UserError(f"--device {spec.device} would put every process on one GPU: use --device cuda "
                        "(process i of a host uses GPU i)")
    index = distributed.local_rank()
    if index >= torch.cuda.device_count():
        raise UserError(f"--nproc {spec.nproc} needs {spec.nproc} GPUs on this host, PyTorch sees "
                        f"{torch.cuda.device_count()}: lower --nproc or use --device cpu")
    return torch.device(f"cuda:{index}")


class Backend:
    """PyTorch implementation of common.backend.Backend."""

    name = "torch"

    def __init__(self) -> None:
        # Defaults until setup(): CPU, fp32, eager, NCHW (tests may build models without setup).
        self.device = torch.device("cpu")
        self.precision, self.mode, self.channels_last = "fp32", "eager", False
        self._train: TrainPipeline | None = None
        self._eval: EvalPipeline | None = None
        self._fallbacks: list[str] = []  # what this process could not apply as asked (fallback_notes)
        self.spec: RunSpec | None = None
        self.engine: distributed.Engine | None = None  # torch.distributed, in a data-parallel run

    # -- environment ---------------------------------------------------------
    def setup(self, spec: RunSpec) -> dict[str, Any]:
        self.spec = spec
        self.device = _replica_device(resolve_device(spec.device), spec)
        execution = requested(spec)
        self.mode = resolve_mode(execution.mode, self.device)
        self.channels_last = bool(execution.channels_last)
        self._configure_torch(spec, execution)
        if spec.world_size > 1 and self.engine is None:
            self.engine = distributed.Engine(spec, self.device)
        return {"device": self._device_name(), "device_type": self._device_type(), "execution_mode": self.mode,
                "channels_last": self.channels_last, "precision": self.precision,
                "intra_op_threads": torch.get_num_threads(), "inter_op_threads": torch.get_num_interop_threads(),
                "onednn": _onednn_enabled(), "tf32": self._tf32(), "deterministic": torch.are_deterministic_algorithms_enabled(),
                "cudnn_benchmark": torch.backends.cudnn.benchmark, "fallbacks": self.fallback_notes()}

    def _configure_torch(self, spec: RunSpec, execution: ExecutionConfig) -> None:
        """Precision check, threads (intra-op; ``execution``'s inter-op pool), TF32, determinism, cuDNN
        autotune and seeds for ``self.device`` (PyTorch's process settings; the Keras-on-PyTorch backend
        applies them too)."""
        self.precision = spec.precision
        self._fallbacks = []
        if spec.precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError(f"--precision bf16: {torch.cuda.get_device_name(self.device)} has no bfloat16 "
                            "support: use --precision fp16 or fp32")
        threads = thread_budget(spec)  # all usable cores, or their share per process
        torch.set_num_threads(threads)
        inter = execution.inter_op_threads  # None: torch's default (one per core)
        if spec.world_size > 1:  # within the process's share of the cores
            inter = min(inter or threads, threads)
        if inter is not None:
            self._set_interop_threads(inter)
        # torch's defaults: TF32 off for matmuls but ON for cuDNN convs; both set explicitly.
        torch.backends.cuda.matmul.allow_tf32 = spec.allow_tf32
        torch.backends.cudnn.allow_tf32 = spec.allow_tf32
        if spec.deterministic and self.device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
        # warn_only: an op without a deterministic kernel warns instead of aborting the run.
        if spec.deterministic or torch.are_deterministic_algorithms_enabled():
            # (the call imports torch's compiler stack, ~2 s per process: skipped when it changes nothing)
            torch.use_deterministic_algorithms(spec.deterministic, warn_only=True)
        torch.backends.cudnn.deterministic = spec.deterministic
        torch.backends.cudnn.benchmark = not spec.deterministic  # autotuned conv algorithms (fixed shapes)
        torch.manual_seed(spec.seed)  # dropout masks (CPU and every CUDA device)

    def _set_interop_threads(self, threads: int) -> None:
        """Set the inter-op pool; torch allows it only before its first inter-op work (then: a fallback note)."""
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError as exc:
            if torch.get_num_interop_threads() != threads:
                self._fallbacks.append(f"inter-op threads stay {torch.get_num_interop_threads()}, not {threads}: "
                                       f"{str(exc).splitlines()[0]}")

    def fallback_notes(self) -> list[str]:
        return list(self._fallbacks)

    def versions(self) -> dict[str, str]:
        versions = {"torch": torch.__version__, "numpy": np.__version__}
        if torch.version.cuda:
            versions["cuda_build"] = torch.version.cuda
        if torch.cuda.is_available():
            versions["cudnn"] = str(torch.backends.cudnn.version())
            versions["gpu"] = torch.cuda.get_device_name(self.device if self.device.type == "cuda" else 0)
        try:  # inductor's GPU code generator; its metadata only (importing triton beside TF can crash)
            versions["triton"] = metadata.version("triton")
        except metadata.PackageNotFoundError:
            pass
        return versions

    def replica(self) -> Replica:
        return self.engine.replica if self.engine is not None else single_process()

    def finish(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    def _device_type(self) -> str:
        return "gpu" if self.device.type == "cuda" else "cpu"

    def _device_name(self) -> str:
        if self.device.type == "cuda":
            return f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        return "cpu"

    @staticmethod
    def _tf32() -> bool:
        matmul, conv = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        assert matmul == conv, f"TF32 flags disagree: matmul {matmul}, cudnn {conv}"
        return bool(matmul)

    # -- model ---------------------------------------------------------------
    def build_model(self, name: str, num_classes: int, in_shape: tuple[int, int, int],
                    bn_momentum: float = 0.1, bn_epsilon: float = 1e-5, dropout: float | None = None) -> nn.Module:
        model = create_model(name, num_classes, in_shape, bn_momentum, bn_epsilon, dropout)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return model.to(self.device, memory_format=memory_format)

    def trainable_param_count(self, model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def buffer_count(self, model: nn.Module) -> int:
        # BN running mean/var only: torch also keeps num_batches_tracked, which is not a weight.
        return sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))

    def get_weights(self, model: nn.Module) -> dict[str, np.ndarray]:
        return weight_io.get_weights(model, model.arch_spec)

    def set_weights(self, model: nn.Module, weights: dict[str, np.ndarray]) -> None:
        weight_io.set_weights(model, model.arch_spec, weights)

    def predict(self, model: nn.Module, images_nhwc_float32: np.ndarray, training: bool = False) -> np.ndarray:
        return weight_io.predict(model, images_nhwc_float32, training)

    def embed(self, model: nn.Module, images_nhwc_float32: np.ndarray) -> np.ndarray:
        return weight_io.embed(model, images_nhwc_float32)

    def layer_outputs(self, model: nn.Module, images_nhwc_float32: np.ndarray,
                      training: bool = False) -> dict[str, np.ndarray]:
        return weight_io.layer_outputs(model, model.arch_spec, images_nhwc_float32, training)

    # -- training ------------------------------------------------------------
    def attach_data(self, dataset: Any, spec: RunSpec) -> None:
        r = spec.recipe
        normalisation = {"mean": r.mean, "std": r.std, "channels_last": self.channels_last}
        self._train = TrainPipeline(dataset.train_images, dataset.train_labels, self.device,
                                    crop_padding=r.crop_padding, random_crop=r.augment,
                                    horizontal_flip=r.augment and r.horizontal_flip, **normalisation)
        self._eval = EvalPipeline(dataset.test_images, dataset.test_labels, self.device,
                                  batch_size=r.eval_batch_size, **normalisation)

    def train_batches(self, plan: EpochPlan, raw: bool = False) -> Iterator[tuple[Any, Any]]:
        if self._train is None:
            raise RuntimeError("attach_data() must be called before train_batches()")
        return self._train.batches(plan, raw)

    def eval_batches(self, raw: bool = False) -> Iterator[tuple[Any, Any]]:
        if self._eval is None:
            raise RuntimeError("attach_data() must be called before eval_batches()")
        return self._eval.batches(raw)

    def make_train_step(self, model: nn.Module, spec: RunSpec) -> TrainStep:
        return TrainStep(model, model.arch_spec, spec.recipe, device=self.device, precision=self.precision,
                         mode=self.mode, engine=self.engine)

    def make_eval_step(self, model: nn.Module) -> Callable[[Any], Any]:
        return EvalStep(model, device=self.device, precision=self.precision, mode=self.mode)

    def to_numpy(self, value: Any) -> np.ndarray:
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if value.dtype in (torch.bfloat16, torch.float16):
                value = value.float()  # numpy has no bfloat16
            return value.cpu().numpy()
        return np.asarray(value)

    def audit(self, model: nn.Module, train_step: TrainStep) -> dict[str, Any]:
        return {**_model_settings(model), **_optimizer_settings(train_step), **self._pipeline_settings(),
                "trainable_params": self.trainable_param_count(model),
                "loss": train_step.loss.name, "label_smoothing": float(train_step.loss.label_smoothing),
                "loss_scaling": _loss_scaling(train_step.scaler),
                "precision": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[train_step.autocast_dtype],
                "tf32": self._tf32(), "deterministic": torch.are_deterministic_algorithms_enabled(),
                "intra_op_threads": torch.get_num_threads(), "inter_op_threads": torch.get_num_interop_threads(),
                "onednn": _onednn_enabled(), "data_threads": None,  # batches are built in the step's thread
                "device_type": self._device_type(), "device": self._device_name(),
                "execution_mode": train_step.mode, "execution_style": train_step.style,
                "data_format": "NCHW channels_last" if weight_io._uses_channels_last(model) else "NCHW",
                "fallbacks": fallbacks_text(self.fallback_notes()), **self._distributed_audit(train_step)}

    def _distributed_audit(self, train_step: TrainStep) -> dict[str, Any]:
        if self.engine is None:
            return {}
        wrapped = train_step.forward_model
        # torch builds batches in the step's thread: its input pipeline uses the intra-op pool
        return audit_settings(self.spec, self.engine.replica, data_threads=torch.get_num_threads(),
                              gradient_reduction=distributed.gradient_reduction(wrapped),
                              bn_statistics=distributed.bn_statistics(wrapped))

    def _pipeline_settings(self) -> dict[str, Any]:
        """Batch size, padding, normalisation and placement read from the built pipelines."""
        pipelines = [p for p in (self._train, self._eval) if p is not None]
        return {"eval_batch_size": self._eval.batch_size if self._eval else None,
                "crop_padding": self._train.pad if self._train else None,
                "augmentation": self._train.augmentation() if self._train else None,
                "input_normalization": single_value(
                    normalization_text(p.io.mean.tolist(), p.io.std.tolist()) for p in pipelines),
                "input_pipeline": self._train.io.placement if self._train else None}

    # -- measurement ---------------------------------------------------------
    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_device_memory_bytes(self) -> int | None:
        return int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None

    def data_residency(self) -> dict[str, Any]:
        if self._train is None or self._eval is None:
            raise RuntimeError("attach_data() must be called before data_residency()")
        return residency_summary({**self._train.held_arrays(), **self._eval.held_arrays()})

    def is_out_of_memory(self, error: BaseException) -> bool:
        if isinstance(error, torch.OutOfMemoryError):
            return True
        message = str(error).lower()
        return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def _model_settings(model: nn.Module) -> dict[str, Any]:
    """BN (every layer), dropout and padding conventions read back from the modules."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    symmetric = all(m.padding == (m.kernel_size[0] // 2, m.kernel_size[1] // 2) and m.padding_mode == "zeros"
                    for m in convs)
    return {"bn_momentum": single_value(float(m.momentum) for m in norms),  # torch convention already
            "bn_epsilon": single_value(float(m.eps) for m in norms),
            # torch's BatchNorm always updates running_var with the unbiased batch variance
            "bn_running_variance": "unbiased" if norms else None,
            "dropout": single_value(float(m.p) for m in model.modules() if isinstance(m, nn.Dropout)),
            "strided_conv_padding": "symmetric" if symmetric else "asymmetric"}


def _onednn_enabled() -> bool:
    """Whether torch runs its oneDNN (mkldnn) CPU kernels: built in and switched on."""
    return bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def _group_decay(group: dict[str, Any]) -> float:
    """The decay coefficient of one param group: coupled (weight_decay) or our decoupled SGD key."""
    return float(group["weight_decay"]) + float(group.get("sgd_decoupled_decay", 0.0))


def _optimizer_settings(train_step: TrainStep) -> dict[str, Any]:
    """Optimizer hyperparameters and the decayed parameters, read from the optimizer's param groups."""
    optimizer = train_step.optimizer
    groups = optimizer.param_groups
    names = {id(tensor): name for name, (_layer, _param, tensor) in train_step.trainable.items()}
    decaying = [g for g in groups if _group_decay(g) > 0]
    decayed = [names.get(id(p), f"<not a model parameter: {tuple(p.shape)}>") for g in decaying for p in g["params"]]
    is_sgd = isinstance(optimizer, torch.optim.SGD)
    decoupled = isinstance(optimizer, torch.optim.AdamW) or any(g.get("sgd_decoupled_decay") for g in groups)
    kind = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw"}
    betas = [g["betas"] for g in groups] if not is_sgd else []
    return {"optimizer": kind.get(type(optimizer), type(optimizer).__name__),
            "momentum": single_value(float(g["momentum"]) for g in groups) if is_sgd else None,
            "nesterov": single_value(bool(g["nesterov"]) for g in groups) if is_sgd else None,
            "adam_beta1": single_value(float(b[0]) for b in betas) if betas else None,
            "adam_beta2": single_value(float(b[1]) for b in betas) if betas else None,
            "optimizer_epsilon": None if is_sgd else single_value(float(g["eps"]) for g in groups),
            "weight_decay": single_value(_group_decay(g) for g in decaying) if decaying else 0.0,
            "weight_decay_mode": ("decoupled" if decoupled else "coupled_l2") if decaying else None,
            **decay_settings(decayed, list(train_step.trainable))}


def _loss_scaling(scaler: torch.amp.GradScaler) -> str | None:
    """fp16 dynamic loss scaling as the GradScaler holds it; None when disabled."""
    if not scaler.is_enabled():
        return None
    # _init_scale: what the scale started from (get_scale() moves during training; no public getter)
    return f"dynamic (initial scale {scaler._init_scale:g}, growth interval {scaler.get_growth_interval()} steps)"
