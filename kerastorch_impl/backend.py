"""``Backend``: Keras 3 on PyTorch behind common.backend.Backend (mirror of torch_impl/backend.py).

The documentation of every method lives on the protocol in common/backend.py.
The Keras objects (models, BatchNorm, optimizer, weight I/O, their audit
read-backs) are keras_impl's, the code tf_impl runs on TensorFlow; the torch
process settings (threads, TF32, determinism, cuDNN, seeds), the device, the
input pipelines, synchronisation and memory figures are PyTorch's, so this
class extends torch_impl's Backend and replaces what Keras does differently.
"""
from __future__ import annotations

import random
from typing import Any, Callable

import keras
import numpy as np
import torch

from common.audit import fallbacks_text
from common.config import RunSpec
from common.errors import UserError
from common.execution import requested
from keras_impl import weights as _keras_weights
from keras_impl import audit as _keras_audit
from keras_impl import fit as _keras_fit
from kerastorch_impl.data import EvalPipeline, TrainPipeline
from kerastorch_impl.models import create_model
from kerastorch_impl.optim import EvalStep, TrainStep, _fit_step
from torch_impl import backend as _torch_backend

# The fixed fallback mode per device type ("best": used where no per-machine search chose one, see
# common.execution.FALLBACK, i.e. runs too short to pay for a search): eager on the CPU, because
# torch.compile of the Keras step costs tens of seconds per process before its first step (seed_cnn,
# batch 32, 2-core Xeon, 2026-11-29, one tune candidate each: 32 s to compile, then 297 img/s against
# eager's 210, so a long run gains and its search finds that); jit_compile (torch.compile) on CUDA, the
# usual fastest there (fused BN/ReLU epilogues), unmeasured until a GPU run of benchmarks/tune_check.py.
FALLBACK_MODE = {"cpu": "eager", "cuda": "jit_compile"}
_POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
_PRECISION_OF_POLICY = {v: k for k, v in _POLICIES.items()}
resolve_device = _torch_backend.resolve_device  # the same device syntax and checks as the torch side


def resolve_mode(mode: str, device: torch.device) -> str:
    """Resolve "best" (and "auto" when no search resolved it) to this device type's fallback mode."""
    return FALLBACK_MODE[device.type] if mode in ("best", "auto") else mode


class Backend(_torch_backend.Backend):
    """Keras 3 (KERAS_BACKEND=torch) implementation of common.backend.Backend."""

    name = "keras-torch"

    def __init__(self) -> None:
        super().__init__()
        self.channels_last = True  # Keras computes NHWC: torch_impl's pipelines build batches that way

    # -- environment ---------------------------------------------------------
    def setup(self, spec: RunSpec) -> dict[str, Any]:
        if spec.world_size > 1:  # RunSpec refuses it already; a spec built around that check is refused here
            raise UserError("keras-torch has no data-parallel engine here: run it with --nproc 1")
        self.spec = spec
        self.device = resolve_device(spec.device)
        execution = requested(spec)  # mode and inter-op pool; oneDNN/malloc were applied to the environment
        self.mode = resolve_mode(execution.mode, self.device)
        self._configure_torch(spec, execution)  # threads, TF32, determinism, cuDNN autotune, torch's seed
        # Python's and NumPy's seeds (Keras draws a layer's own seed, e.g. Dropout's, from Python's
        # random). Not keras.utils.set_random_seed: it imports TensorFlow when it is installed, and a
        # keras-torch process never loads TensorFlow.
        random.seed(spec.seed)
        np.random.seed(spec.seed)
        keras.config.set_image_data_format("channels_last")  # NHWC: Keras's default, made explicit
        keras.mixed_precision.set_global_policy(_POLICIES[spec.precision])
        return self._effective_settings()

    def _effective_settings(self) -> dict[str, Any]:
        """Device, mode, precision, threads, TF32, determinism as read back from torch and Keras."""
        policy = keras.mixed_precision.global_policy().name
        return {"device": self._device_name(), "device_type": self._device_type(), "execution_mode": self.mode,
                "precision": _PRECISION_OF_POLICY.get(policy, "unknown"), "dtype_policy": policy,
                "data_format": _data_format(), "intra_op_threads": torch.get_num_threads(),
                "inter_op_threads": torch.get_num_interop_threads(), "onednn": _torch_backend._onednn_enabled(),
                "tf32": self._tf32(),
                "deterministic": torch.are_deterministic_algorithms_enabled(),
                "cudnn_benchmark": torch.backends.cudnn.benchmark, "fallbacks": self.fallback_notes()}

    @property
    def _keras_device(self) -> str:
        """The device name Keras's torch backend places variables and tensors on."""
        return str(self.device)

    def versions(self) -> dict[str, str]:
        return {**super().versions(), "keras": keras.__version__}

    # -- model ---------------------------------------------------------------
    def build_model(self, name: str, num_classes: int, in_shape: tuple[int, int, int],
                    bn_momentum: float = 0.1, bn_epsilon: float = 1e-5, dropout: float | None = None) -> keras.Model:
        with keras.device(self._keras_device):
            return create_model(name, num_classes, in_shape, bn_momentum, bn_epsilon, dropout)

    def trainable_param_count(self, model: keras.Model) -> int:
        return _keras_audit.trainable_param_count(model)

    def buffer_count(self, model: keras.Model) -> int:
        return int(sum(np.prod(v.shape) for v in model.non_trainable_weights))  # BN moving statistics

    def get_weights(self, model: keras.Model) -> dict[str, np.ndarray]:
        return _keras_weights.get_weights(model, model.arch_spec)

    def set_weights(self, model: keras.Model, weights: dict[str, np.ndarray]) -> None:
        _keras_weights.set_weights(model, model.arch_spec, weights)

    def predict(self, model: keras.Model, images_nhwc_float32: np.ndarray, training: bool = False) -> np.ndarray:
        with torch.no_grad(), keras.device(self._keras_device):
            return _keras_weights.predict(model, images_nhwc_float32, training)

    def embed(self, model: keras.Model, images_nhwc_float32: np.ndarray) -> np.ndarray:
        with torch.no_grad(), keras.device(self._keras_device):
            return _keras_weights.embed(model, images_nhwc_float32)

    def layer_outputs(self, model: keras.Model, images_nhwc_float32: np.ndarray,
                      training: bool = False) -> dict[str, np.ndarray]:
        with torch.no_grad(), keras.device(self._keras_device):
            return _keras_weights.layer_outputs(model, model.arch_spec, images_nhwc_float32, training)

    # -- training ------------------------------------------------------------
    def attach_data(self, dataset: Any, spec: RunSpec) -> None:
        r = spec.recipe
        normalisation = {"mean": r.mean, "std": r.std}
        self._train = TrainPipeline(dataset.train_images, dataset.train_labels, self.device,
                                    crop_padding=r.crop_padding, random_crop=r.augment,
                                    horizontal_flip=r.augment and r.horizontal_flip, **normalisation)
        self._eval = EvalPipeline(dataset.test_images, dataset.test_labels, self.device,
                                  batch_size=r.eval_batch_size, **normalisation)

    def make_train_step(self, model: keras.Model, spec: RunSpec) -> TrainStep | _keras_fit.FitStep:
        if spec.style == "fit":
            return _fit_step(model, model.arch_spec, spec.recipe, device=self._keras_device,
                             precision=self.precision, mode=self.mode, epoch_data=self._fit_epoch_data,
                             synchronize=self.synchronize)
        return TrainStep(model, model.arch_spec, spec.recipe, device=self._keras_device, precision=self.precision,
                         mode=self.mode)

    def _fit_epoch_data(self, plan: Any) -> Any:
        """One epoch of the pipeline as ``fit`` takes data on this backend: a torch DataLoader (no re-batching)."""
        if self._train is None:
            raise RuntimeError("attach_data() must be called before fit")
        return torch.utils.data.DataLoader(_EpochBatches(self._train, plan), batch_size=None)

    def make_eval_step(self, model: keras.Model) -> Callable[[Any], Any]:
        return EvalStep(model, device=self._keras_device, mode=self.mode)

    def audit(self, model: keras.Model, train_step: TrainStep | _keras_fit.FitStep) -> dict[str, Any]:
        settings = self._effective_settings()
        return {**_keras_audit.model_settings(model, train_step), **self._pipeline_settings(),
                "precision": settings["precision"], "tf32": settings["tf32"],
                "deterministic": settings["deterministic"], "intra_op_threads": settings["intra_op_threads"],
                "inter_op_threads": settings["inter_op_threads"], "onednn": settings["onednn"],
                "data_threads": None,  # torch_impl's pipeline builds batches in the step's thread
                "device_type": settings["device_type"],
                "device": settings["device"], "data_format": settings["data_format"],
                "fallbacks": fallbacks_text(self.fallback_notes())}


class _EpochBatches(torch.utils.data.IterableDataset):
    """The training pipeline's batches of one epoch plan, as an IterableDataset for a DataLoader."""

    def __init__(self, pipeline: TrainPipeline, plan: Any):
        super().__init__()
        self.pipeline, self.plan = pipeline, plan

    def __iter__(self):
        return self.pipeline.batches(self.plan)


def _data_format() -> str:
    return {"channels_last": "NHWC", "channels_first": "NCHW"}[keras.config.image_data_format()]
