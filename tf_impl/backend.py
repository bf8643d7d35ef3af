"""The TensorFlow/Keras implementation of common.backend.Backend (mirror of torch_impl/backend.py).

Thin by design: the contract's documentation lives in common/backend.py.
Every framework default that affects fairness is set explicitly in
``setup`` (threads, TF32, determinism, dtype policy, data format) and read
back from the framework in ``setup``'s return value and in ``audit``.
"""
from __future__ import annotations

import os

# Before TensorFlow loads: hide TF's C++ INFO/WARNING chatter in workers (level 2 still shows
# errors). KERAS_BACKEND is set once, in tf_impl/__init__.py.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import re  # noqa: E402
from typing import Any, Callable, Iterator  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from common.audit import fallbacks_text, normalization_text, single_value  # noqa: E402
from common.backend import residency_summary  # noqa: E402
from common.config import RunSpec  # noqa: E402
from common.distributed import Replica, audit_settings, single_process, thread_budget  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.execution import requested  # noqa: E402
from common.sampler import EpochPlan, epoch_plan  # noqa: E402
from tf_impl import data as tf_data  # noqa: E402
from keras_impl import audit as _keras_audit  # noqa: E402
from tf_impl import distributed  # noqa: E402
from tf_impl import weights as tf_weights  # noqa: E402
from tf_impl.models import create_model  # noqa: E402
from keras_impl import fit as _keras_fit  # noqa: E402
from tf_impl.optim import EvalStep, TrainStep, _fit_step  # noqa: E402

# The fixed fallback mode per device type ("best": used where no per-machine search chose one,
# see common.execution.FALLBACK): chosen with benchmarks/mode_matrix.py on the CPU; GPU: XLA, which
# fuses the BN/ReLU/add chains between the cuDNN convs (Keras's own jit_compile="auto" choice on a
# GPU), unmeasured until a GPU run of benchmarks/tune_check.py confirms it.
FALLBACK_MODE = {"cpu": "graph", "gpu": "xla"}
_POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
_PRECISION_OF_POLICY = {v: k for k, v in _POLICIES.items()}
_DATA_FORMAT_NAMES = {"channels_last": "NHWC", "channels_first": "NCHW"}

class Backend:
    """TensorFlow 2 / Keras 3 behind the shared interface."""

    name = "tensorflow"

    def __init__(self) -> None:
        self.device = "/CPU:0"  # logical device every model, step and batch is placed on
        self.device_type = "cpu"
        self.mode = FALLBACK_MODE["cpu"]
        self.precision = "fp32"
        self.data_threads: int | None = None  # tf.data private thread pool (ExecutionConfig.data_threads)
        self._gpu = None  # the physical GPU in use (tf.config.PhysicalDevice), if any
        self._train: tf_data.TrainPipeline | None = None
        self._eval: tf_data.EvalPipeline | None = None
        self._fallbacks: list[str] = []  # what this process could not apply as asked (fallback_notes)
        self.spec: RunSpec | None = None
        self.engine: distributed.Engine | None = None  # MultiWorkerMirroredStrategy, in a data-parallel run

    # -- environment ---------------------------------------------------------
    def setup(self, spec: RunSpec) -> dict[str, Any]:
        self._fallbacks = []
        self.spec = spec
        self.device_type, gpu_index = resolve_device(spec.device)
        self._select_device(_replica_gpu(gpu_index, spec), spec.device)
        execution = requested(spec)
        threads = thread_budget(spec)  # all usable cores, or their share per process
        # TF's defaults: a pool per core for intra-op and inter-op each. Intra-op: set explicitly (the same
        # count as torch); inter-op and tf.data's pool: the execution configuration's (0 / None = TF's
        # default), within the process's share of the cores when several processes share the host.
        inter, self.data_threads = execution.inter_op_threads, execution.data_threads
        if spec.world_size > 1:
            inter, self.data_threads = min(inter or threads, threads), min(self.data_threads or threads, threads)
        self._fallbacks += _set_threads(threads, inter or 0)
        if spec.world_size > 1 and self.engine is None:
            # before any other TF op: the strategy configures the runtime's collectives
            self.engine = distributed.Engine(spec, self.device_type)
        # TF enables TF32 by default on Ampere+ (torch does not): always set from the spec.
        tf.config.experimental.enable_tensor_float_32_execution(bool(spec.allow_tf32))
        _set_determinism(spec.deterministic)
        keras.utils.set_random_seed(spec.seed)  # Python, NumPy and TF RNGs (dropout masks)
        keras.config.set_image_data_format("channels_last")  # NHWC: Keras's default, made explicit
        self.precision = spec.precision
        keras.mixed_precision.set_global_policy(_POLICIES[spec.precision])
        self.mode = resolve_mode(execution.mode, self.device_type)
        return self._effective_settings()

    def _effective_settings(self) -> dict[str, Any]:
        """Device, mode, precision, threads, TF32, determinism as read back from TF/Keras."""
        return {"device": self._device_name(), "device_type": self.device_type, "execution_mode": self.mode,
                "precision": _PRECISION_OF_POLICY.get(keras.mixed_precision.global_policy().name, "unknown"),
                "dtype_policy": keras.mixed_precision.global_policy().name,
                "data_format": _DATA_FORMAT_NAMES[keras.config.image_data_format()],
                "channels_last": keras.config.image_data_format() == "channels_last",
                "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
                "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
                "onednn": _onednn_enabled(),
                "tf32": bool(tf.config.experimental.tensor_float_32_execution_enabled()),
                "deterministic": _determinism_enabled(), "fallbacks": self.fallback_notes()}

    def fallback_notes(self) -> list[str]:
        return list(dict.fromkeys(self._fallbacks))  # both pipelines may note the same data-path fallback

    def _select_device(self, gpu_index: int | None, requested: str) -> None:
        gpus = tf.config.list_physical_devices("GPU")
        if self.device_type == "gpu":
            if gpu_index >= len(gpus):
                seen = f"{len(gpus)} GPU(s)" if gpus else "no GPU"
                raise UserError(f"--device {requested} requested but TensorFlow sees {seen}: "
                                "use --device cpu or auto (or a smaller GPU index)")
            visible = [gpus[gpu_index]]
        else:
            visible = []
        logical_index = 0
        try:
            # Only the chosen GPU is visible (as logical GPU:0); memory growth so the allocator's
            # peak, not TF's default grab-everything reservation, is what the GPU holds.
            tf.config.set_visible_devices(visible, "GPU")
            for gpu in visible:
                tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as exc:  # runtime already initialised (tests): keep it, place ops explicitly
            logical_index = gpu_index or 0
            if gpus:  # with no GPU there was nothing to hide or to grow
                self._fallbacks.append(f"GPU visibility and memory growth unchanged (the TensorFlow runtime had "
                                       f"started: {str(exc).splitlines()[0]}); ops placed on GPU:{logical_index} "
                                       "explicitly, other GPUs stay visible")
        self._gpu = visible[0] if visible else None
        self.device = f"/GPU:{logical_index}" if self.device_type == "gpu" else "/CPU:0"
        if self.device_type == "gpu" and not tf.config.list_logical_devices("GPU"):
            raise UserError(f"--device {requested}: the GPU was hidden earlier in this process; "
                            "run in a fresh process")

    def replica(self) -> Replica:
        return self.engine.replica if self.engine is not None else single_process()

    def finish(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    def _device_name(self) -> str:
        if self.device_type == "cpu":
            return "cpu"
        details = tf.config.experimental.get_device_details(self._gpu)
        return f"{self.device} ({details.get('device_name', 'GPU')})"

    def versions(self) -> dict[str, str]:
        build = tf.sysconfig.get_build_info()
        out = {"tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__}
        for key in ("cuda_version", "cudnn_version"):
            if build.get(key):
                out[key.replace("_version", "")] = str(build[key])
        return out

    # -- model ---------------------------------------------------------------
    def build_model(self, name: str, num_classes: int, in_shape: tuple[int, int, int],
                    bn_momentum: float = 0.1, bn_epsilon: float = 1e-5, dropout: float | None = None) -> keras.Model:
        with tf.device(self.device), self._scope():
            return create_model(name, num_classes, in_shape, bn_momentum, bn_epsilon, dropout)

    def _scope(self):
        """The strategy's scope in a data-parallel run (variables mirrored over the workers)."""
        return self.engine.scope() if self.engine is not None else contextlib.nullcontext()

    def trainable_param_count(self, model: keras.Model) -> int:
        return _keras_audit.trainable_param_count(model)

    def buffer_count(self, model: keras.Model) -> int:
        # Keras's count_params() includes the BN moving statistics; they are buffers, not parameters.
        return int(sum(np.prod(v.shape) for v in model.non_trainable_weights))

    def get_weights(self, model: keras.Model) -> dict[str, np.ndarray]:
        return tf_weights.get_weights(model, model.arch_spec)

    def set_weights(self, model: keras.Model, weights: dict[str, np.ndarray]) -> None:
        tf_weights.set_weights(model, model.arch_spec, weights)

    def predict(self, model: keras.Model, images_nhwc_float32: np.ndarray, training: bool = False) -> np.ndarray:
        with tf.device(self.device):
            return tf_weights.predict(model, images_nhwc_float32, training)

    def embed(self, model: keras.Model, images_nhwc_float32: np.ndarray) -> np.ndarray:
        with tf.device(self.device):
            return tf_weights.embed(model, images_nhwc_float32)

    def layer_outputs(self, model: keras.Model, images_nhwc_float32: np.ndarray,
                      training: bool = False) -> dict[str, np.ndarray]:
        with tf.device(self.device):
            return tf_weights.layer_outputs(model, model.arch_spec, images_nhwc_float32, training)

    # -- training ------------------------------------------------------------
    def attach_data(self, dataset: Any, spec: RunSpec) -> None:
        recipe = spec.recipe
        normalisation = {"mean": recipe.mean, "std": recipe.std, "fallbacks": self._fallbacks,
                         "data_threads": self.data_threads}
        self._train = tf_data.TrainPipeline(dataset.train_images, dataset.train_labels, self.device,
                                            crop_padding=recipe.crop_padding, random_crop=recipe.augment,
                                            horizontal_flip=recipe.augment and recipe.horizontal_flip,
                                            **normalisation)
        self._eval = tf_data.EvalPipeline(dataset.test_images, dataset.test_labels, self.device,
                                          batch_size=recipe.eval_batch_size, **normalisation)

    def train_batches(self, plan: EpochPlan, raw: bool = False) -> Iterator[tuple[Any, Any]]:
        if self._train is None:
            raise RuntimeError("attach_data() first")
        return self._train.batches(plan, raw)

    def eval_batches(self, raw: bool = False) -> Iterator[tuple[Any, Any]]:
        if self._eval is None:
            raise RuntimeError("attach_data() first")
        return self._eval.batches(raw)

    def make_train_step(self, model: keras.Model, spec: RunSpec) -> TrainStep | _keras_fit.FitStep:
        if spec.style == "fit":
            return _fit_step(model, model.arch_spec, spec.recipe, device=self.device, precision=self.precision,
                             mode=self.mode, epoch_data=self._fit_epoch_data, synchronize=self.synchronize)
        return TrainStep(model, model.arch_spec, spec.recipe, device=self.device, precision=self.precision,
                         mode=self.mode, engine=self.engine)

    def _fit_epoch_data(self, plan: EpochPlan) -> tf.data.Dataset:
        """One epoch of the pipeline as ``fit`` takes data on this backend: the tf.data.Dataset, prefetched."""
        if self._train is None:
            raise RuntimeError("attach_data() first")
        return self._train._dataset(plan).prefetch(tf.data.AUTOTUNE)

    def make_eval_step(self, model: keras.Model) -> Callable[[Any], Any]:
        return EvalStep(model, device=self.device, mode=self.mode)

    def to_numpy(self, value: Any) -> np.ndarray:
        return np.asarray(value.numpy() if hasattr(value, "numpy") else value)

    def audit(self, model: keras.Model, train_step: TrainStep | _keras_fit.FitStep) -> dict[str, Any]:
        settings = self._effective_settings()
        return {**_keras_audit.model_settings(model, train_step), **self._pipeline_settings(),
                "precision": settings["precision"], "tf32": settings["tf32"],
                "deterministic": settings["deterministic"], "intra_op_threads": settings["intra_op_threads"],
                "inter_op_threads": settings["inter_op_threads"], "onednn": settings["onednn"],
                "data_threads": self._data_threads(), "device_type": self.device_type,
                "device": settings["device"], "data_format": settings["data_format"],
                "fallbacks": fallbacks_text(self.fallback_notes()), **self._distributed_audit(model, train_step)}

    def _distributed_audit(self, model: keras.Model, train_step: TrainStep) -> dict[str, Any]:
        if self.engine is None:
            return {}
        return audit_settings(self.spec, self.engine.replica, data_threads=self._data_threads(),
                              gradient_reduction=distributed.gradient_reduction(train_step),
                              bn_statistics=distributed.bn_statistics(model))

    def _pipeline_settings(self) -> dict[str, Any]:
        """Batch size, padding, normalisation and placement read from the built pipelines."""
        pipelines = [p for p in (self._train, self._eval) if p is not None]
        return {"eval_batch_size": self._eval.batch_size if self._eval else None,
                "crop_padding": self._train.pad if self._train else None,
                "augmentation": self._train.augmentation() if self._train else None,
                "input_normalization": single_value(
                    normalization_text(p.io.mean.numpy().tolist(), p.io.std.numpy().tolist()) for p in pipelines),
                "input_pipeline": self._train.io.placement if self._train else None}

    def _data_threads(self) -> int | None:
        """The tf.data private thread pool read back from a built training dataset (0: tf.data's default)."""
        if self._train is None:
            return None
        # any plan will do, as long as the pipeline accepts it: label it with the pipeline's own augmentation
        plan = dataclasses.replace(epoch_plan(0, 0, self._train.num_examples, 1, crop_padding=self._train.pad),
                                   random_crop=self._train.random_crop, horizontal_flip=self._train.horizontal_flip)
        probe = self._train._dataset(plan)
        return tf_data._private_threadpool_size(probe)

    # -- measurement ---------------------------------------------------------
    def synchronize(self) -> None:
        # CPU: TF runs ops synchronously, nothing to wait for. GPU: kernels are queued on the
        # device's compute stream; reading back a tiny tensor made on that stream waits for them.
        if self.device_type == "gpu":
            with tf.device(self.device):
                tf.zeros([1]).numpy()

    def reset_peak_memory(self) -> None:
        if self.device_type == "gpu":
            tf.config.experimental.reset_memory_stats(self.device.lstrip("/"))

    def peak_device_memory_bytes(self) -> int | None:
        if self.device_type != "gpu":
            return None
        return int(tf.config.experimental.get_memory_info(self.device.lstrip("/"))["peak"])

    def data_residency(self) -> dict[str, Any]:
        if self._train is None or self._eval is None:
            raise RuntimeError("attach_data() first")
        return residency_summary({**self._train.held_arrays(), **self._eval.held_arrays()})

    def is_out_of_memory(self, error: BaseException) -> bool:
        if isinstance(error, (tf.errors.ResourceExhaustedError, MemoryError)):
            return True
        # XLA reports allocation failures as other error types with RESOURCE_EXHAUSTED in the text.
        text = str(error)
        return isinstance(error, tf.errors.OpError) and ("RESOURCE_EXHAUSTED" in text or "Out of memory" in text)


def _replica_gpu(gpu_index: int | None, spec: RunSpec) -> int | None:
    """A data-parallel worker on GPUs uses the GPU of its local rank (as torch's processes do)."""
    if spec.world_size == 1 or gpu_index is None:
        return gpu_index
    if re.search(r":\d+$", spec.device.strip()):
        raise UserError(f"--device {spec.device} would put every process on one GPU: use --device cuda "
                        "(process i of a host uses GPU i)")
    return distributed.local_rank()


def resolve_mode(mode: str, device_type: str) -> str:
    """Resolve "best" (and "auto" when no search resolved it) to this device type's ("cpu" | "gpu") fallback mode."""
    return FALLBACK_MODE[device_type] if mode in ("best", "auto") else mode


def _onednn_enabled() -> bool:
    """Whether TensorFlow runs its oneDNN kernels in this process (TF_ENABLE_ONEDNN_OPTS, read at load time)."""
    from tensorflow.python.util import _pywrap_util_port  # IsMklEnabled has no public API

    return bool(_pywrap_util_port.IsMklEnabled())


def resolve_device(device: str) -> tuple[str, int | None]:
    """'auto' | 'cpu' | 'cuda[:N]' | 'gpu[:N]' -> ('cpu', None) or ('gpu', N)."""
    text = device.strip().lower()
    if text == "auto":
        return ("gpu", 0) if tf.config.list_physical_devices("GPU") else ("cpu", None)
    if text == "cpu":
        return "cpu", None
    match = re.fullmatch(r"(cuda|gpu)(?::(\d+))?", text)
    if not match:
        raise UserError(f"unknown --device {device!r}; use auto, cpu, cuda, cuda:N, gpu or gpu:N")
    return "gpu", int(match.group(2) or 0)


def _set_threads(intra: int, inter: int) -> list[str]:
    """Set both pools; TF allows it only before its runtime starts (then: a fallback note, if they differ)."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:  # the TF runtime already started in this process (tests); audit reads back
        current = (tf.config.threading.get_intra_op_parallelism_threads(),
                   tf.config.threading.get_inter_op_parallelism_threads())
        if current != (intra, inter):
            return [f"(intra, inter) threads stay {current}, not {(intra, inter)}: the TensorFlow runtime "
                    "had started in this process"]
    return []


def _set_determinism(enabled: bool) -> None:
    from tensorflow.python.framework import config as tf_config  # disable/is_enabled are not public

    if enabled:
        tf.config.experimental.enable_op_determinism()
    else:
        tf_config.disable_op_determinism()


def _determinism_enabled() -> bool:
    from tensorflow.python.framework import config as tf_config

    return bool(tf_config.is_op_determinism_enabled())
