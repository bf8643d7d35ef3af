"""tf.data input pipelines that apply common.sampler's plan exactly (mirror of torch_impl/data.py).

The uint8 dataset is stored ONCE (in ``attach_data``), zero-padded by
``crop_padding``, in a host-memory ``tf.Variable``. Every epoch's map function
captures that variable by handle, so building an epoch's pipeline copies only
the plan (~1 MB for CIFAR-10), never the pixels (``from_tensor_slices`` over
the images would embed a 150 MB constant per epoch).

Per epoch, ``from_tensor_slices`` over the plan's (order, offsets, flips) is
batched by ``plan.batch_size`` (dropping the remainder iff ``plan.drop_last``,
i.e. exactly ``plan.batch_bounds()``); a ``map`` on whole batches gathers the
crops with ONE ``gather_nd`` (row/column indices from the offsets, columns
reversed with ``tf.where`` where flipped: no per-sample tf.image calls), casts
and normalises ``(x/255 - mean)/std`` in that op order, in float32. Then
``prefetch(tf.data.AUTOTUNE)``. ``data_threads`` (common.execution.ExecutionConfig)
gives the pipelines a private thread pool of that size instead of tf.data's
shared default pool (one thread per core, on top of TensorFlow's op pools).
On a GPU, batches are copied to the device inside
tf.data (``copy_to_device`` + ``prefetch``) so step i+1's batch is already
there while step i runs (not exercised on a GPU yet: the development machine
has none). Whether that path works is probed once when a pipeline is built; if
it does not, batches are prefetched on the host and copied per step, and the
fallback is recorded (the backend's ``fallback_notes``: run manifest and audit).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

from common.sampler import EpochPlan, augmentation_text, check_plan


def normalize(images_uint8_nhwc: tf.Tensor, mean: tf.Tensor, std: tf.Tensor) -> tf.Tensor:
    """uint8 NHWC -> float32 NHWC ``(x/255 - mean)/std`` (same op order as common.sampler.normalize_reference)."""
    x = tf.cast(images_uint8_nhwc, tf.float32) / 255.0
    return (x - mean) / std


class _Placement:
    """Where the dataset lives (host memory) and where batches are delivered (the compute device).

    ``fallbacks``: a list (the backend's) that a fallback from the on-device
    prefetch path is appended to, so the run's manifest and audit show it.
    """

    def __init__(self, device: str, mean: Sequence[float], std: Sequence[float],
                 fallbacks: list[str] | None = None):
        self.device = device
        self.on_gpu = "GPU" in device.upper()
        self.mean = tf.constant(mean, tf.float32)
        self.std = tf.constant(std, tf.float32)
        self.fallbacks = [] if fallbacks is None else fallbacks
        self.copy_in_pipeline = self.on_gpu and self._device_copy_works()
        host = "uint8 dataset in host memory (tf.Variable); batches built by tf.data on the host"
        if not self.on_gpu:
            self.placement = f"{host}, prefetched"
        elif self.copy_in_pipeline:
            self.placement = f"{host}, copied to {device} inside tf.data (copy_to_device + prefetch)"
        else:
            self.placement = f"{host}, prefetched on the host, copied to {device} per step (fallback)"

    def _device_copy_works(self) -> bool:
        """Probe tf.data's copy_to_device once: does an iterator on the device hand back tensors there?"""
        probe = tf.data.Dataset.from_tensors(tf.zeros([1], tf.uint8))
        try:
            with tf.device(self.device):  # the iterator must live on the device it prefetches to
                element = next(iter(probe.apply(tf.data.experimental.copy_to_device(self.device)).prefetch(1)))
        except (tf.errors.OpError, NotImplementedError, ValueError, RuntimeError) as exc:
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        else:
            if "GPU" in element.device.upper():
                return True
            reason = f"batches arrived on {element.device}"
        self.fallbacks.append(f"tf.data copy_to_device({self.device}) unusable ({reason[:200]}): batches are "
                              "prefetched on the host and copied to the device per step")
        return False

    def deliver(self, dataset: tf.data.Dataset) -> Iterator[tuple[tf.Tensor, tf.Tensor]]:
        """Iterate ``dataset`` prefetched on the compute device (or, after a fallback, copied per step)."""
        if self.copy_in_pipeline:
            on_device = dataset.apply(tf.data.experimental.copy_to_device(self.device)).prefetch(tf.data.AUTOTUNE)
            with tf.device(self.device):
                iterator = iter(on_device)
            yield from iterator
            return
        for images, labels in dataset.prefetch(tf.data.AUTOTUNE):
            if self.on_gpu:
                with tf.device(self.device):
                    images, labels = tf.identity(images), tf.identity(labels)
            yield images, labels


def _with_threads(dataset: tf.data.Dataset, data_threads: int | None) -> tf.data.Dataset:
    """``dataset`` on a private tf.data thread pool of ``data_threads`` threads (None: tf.data's default)."""
    if data_threads is None:
        return dataset
    options = tf.data.Options()
    options.threading.private_threadpool_size = int(data_threads)
    return dataset.with_options(options)


def _private_threadpool_size(dataset: tf.data.Dataset) -> int:
    """The private thread pool size read back from a dataset's options (0: tf.data's shared default)."""
    return int(dataset.options().threading.private_threadpool_size or 0)


def _host_variable(array: np.ndarray, name: str) -> tf.Variable:
    with tf.device("/CPU:0"):  # tf.data runs on the host; the GPU gets finished batches
        return tf.Variable(array, trainable=False, name=name)


def _held(variable: tf.Variable) -> tuple[str, int]:
    """(where, bytes) of a dataset variable: a variable always holds its own copy."""
    where = "host" if "CPU" in variable.device.upper() else "device"
    return where, int(variable.shape.num_elements()) * variable.dtype.size


class TrainPipeline:
    """Training batches of an EpochPlan: gather + pad-and-crop + flip + normalise, batched."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, device: str, *, crop_padding: int,
                 mean: Sequence[float], std: Sequence[float], fallbacks: list[str] | None = None,
                 data_threads: int | None = None, random_crop: bool = True, horizontal_flip: bool = True):
        self.io = _Placement(device, mean, std, fallbacks)
        self.data_threads = data_threads
        self.pad = int(crop_padding)
        self.random_crop, self.horizontal_flip = bool(random_crop), bool(horizontal_flip)
        self.height, self.width = int(images.shape[1]), int(images.shape[2])
        self.num_examples = len(labels)
        pad = ((0, 0), (self.pad, self.pad), (self.pad, self.pad), (0, 0))
        self.images = _host_variable(np.pad(np.asarray(images, np.uint8), pad), "train_images_padded")
        self.labels = _host_variable(np.asarray(labels, np.int64), "train_labels")

    def held_arrays(self) -> dict[str, tuple[str, int]]:
        """{array: (where, bytes)} of the dataset copies this pipeline holds (common.backend.data_residency)."""
        return {"train_images": _held(self.images), "train_labels": _held(self.labels)}

    def augmentation(self) -> str:
        """What this pipeline was built to apply (common.sampler.augmentation_text), for the audit."""
        return augmentation_text(self.pad, self.random_crop, self.horizontal_flip)

    def _dataset(self, plan: EpochPlan, raw: bool = False) -> tf.data.Dataset:
        """The tf.data pipeline of one epoch (host side, before device placement)."""
        check_plan(plan, self.pad, self.random_crop, self.horizontal_flip)
        if plan.dataset_size != self.num_examples:
            raise ValueError(f"plan covers {plan.dataset_size} images, the dataset has {self.num_examples}")
        plan_slices = (plan.order.astype(np.int64), plan.crop_offsets.astype(np.int32), plan.flips.astype(bool))
        dataset = tf.data.Dataset.from_tensor_slices(plan_slices)
        dataset = dataset.batch(plan.batch_size, drop_remainder=plan.drop_last)
        dataset = dataset.map(lambda index, offsets, flips: self._batch(index, offsets, flips, raw),
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return _with_threads(dataset, self.data_threads)

    def batches(self, plan: EpochPlan, raw: bool = False) -> Iterator[tuple[tf.Tensor, tf.Tensor]]:
        """``(images, labels)`` for every batch of ``plan``, in order (uint8 NHWC if ``raw``)."""
        return self.io.deliver(self._dataset(plan, raw))

    def _batch(self, index, offsets, flips, raw: bool):
        rows = offsets[:, 0:1] + tf.range(self.height)  # (B, H) rows of the padded image
        cols = offsets[:, 1:2] + tf.range(self.width)  # (B, W)
        cols = tf.where(flips[:, None], tf.reverse(cols, axis=[1]), cols)  # mirror = read columns reversed
        batch = tf.shape(index)[0]
        gather_at = tf.stack([
            tf.broadcast_to(tf.cast(index, tf.int32)[:, None, None], [batch, self.height, self.width]),
            tf.broadcast_to(rows[:, :, None], [batch, self.height, self.width]),
            tf.broadcast_to(cols[:, None, :], [batch, self.height, self.width]),
        ], axis=-1)  # (B, H, W, 3): (image, row, col) of every output pixel
        images = tf.gather_nd(self.images, gather_at)  # (B, H, W, C) uint8, one gather
        labels = tf.gather(self.labels, index)
        return (images if raw else normalize(images, self.io.mean, self.io.std)), labels


class EvalPipeline:
    """The test set in order, fixed-size batches (last partial one kept), no augmentation."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, device: str, *, batch_size: int,
                 mean: Sequence[float], std: Sequence[float], fallbacks: list[str] | None = None,
                 data_threads: int | None = None):
        self.io = _Placement(device, mean, std, fallbacks)
        self.data_threads = data_threads
        self.batch_size = int(batch_size)
        self.num_examples = len(labels)
        self.images = _host_variable(np.asarray(images, np.uint8), "test_images")
        self.labels = _host_variable(np.asarray(labels, np.int64), "test_labels")

    def held_arrays(self) -> dict[str, tuple[str, int]]:
        """{array: (where, bytes)} of the dataset copies this pipeline holds (common.backend.data_residency)."""
        return {"test_images": _held(self.images), "test_labels": _held(self.labels)}

    def _dataset(self, raw: bool = False) -> tf.data.Dataset:
        dataset = tf.data.Dataset.range(self.num_examples).batch(self.batch_size)
        dataset = dataset.map(lambda index: self._batch(index, raw), num_parallel_calls=tf.data.AUTOTUNE,
                              deterministic=True)
        return _with_threads(dataset, self.data_threads)

    def batches(self, raw: bool = False) -> Iterator[tuple[tf.Tensor, tf.Tensor]]:
        return self.io.deliver(self._dataset(raw))

    def _batch(self, index, raw: bool):
        images = tf.gather(self.images, index)
        labels = tf.gather(self.labels, index)
        return (images if raw else normalize(images, self.io.mean, self.io.std)), labels

