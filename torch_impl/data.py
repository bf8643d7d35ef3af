"""Batched torch input pipelines that apply common.sampler's plan exactly (mirror of tf_impl/data.py).

The uint8 dataset lives in one tensor, zero-padded once by ``crop_padding``
so that a batch (index + pad-and-crop) is ONE gather; the flip is a
``torch.where`` over a mirrored copy, then float32 ``(x/255 - mean)/std`` in
that op order and a permute to NCHW. No per-sample Python work.

Placement: on CUDA the padded dataset is kept on the GPU (CIFAR-10 padded is
~240 MB) and batches are built there; a dataset larger than
``_DEVICE_RESIDENT_MAX_BYTES`` stays in host memory, batches are gathered on the
CPU as uint8, pinned, and copied with ``non_blocking=True`` (4x fewer bytes
than float32), then normalised on the GPU. Batches are produced lazily: GPU
kernels are asynchronous, so building batch i+1 queues behind step i.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from common.sampler import EpochPlan, augmentation_text, check_plan

_DEVICE_RESIDENT_MAX_BYTES = 2 << 30  # keep the uint8 dataset on the GPU up to this size


def normalize(images_uint8_nhwc: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              channels_last: bool) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW ``(x/255 - mean)/std`` (same op order as common.sampler.normalize_reference)."""
    x = images_uint8_nhwc.to(torch.float32).div_(255.0).sub_(mean).div_(std)
    x = x.permute(0, 3, 1, 2)  # a contiguous NHWC buffer viewed as NCHW IS channels_last memory format
    return x if channels_last else x.contiguous()


class _Normalizer:
    """Per-channel mean/std on the target device, plus where batches are assembled."""

    def __init__(self, images: np.ndarray, device: torch.device, mean: Sequence[float],
                 std: Sequence[float], channels_last: bool):
        self.device = device
        self.channels_last = channels_last
        resident = device.type == "cpu" or images.nbytes <= _DEVICE_RESIDENT_MAX_BYTES
        self.storage_device = device if resident else torch.device("cpu")
        # what the audit shows as input_pipeline (placement differs by design between the frameworks)
        if resident:
            self.placement = f"uint8 dataset on {device}; batches built there"
        else:
            self.placement = (f"uint8 dataset in host memory (over {_DEVICE_RESIDENT_MAX_BYTES >> 30} GiB); "
                              f"batches gathered on the host, pinned, copied to {device} asynchronously")
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(std, dtype=torch.float32, device=device)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Move a batch assembled in host memory to the device (pinned, asynchronous)."""
        if tensor.device == self.device:
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def finish(self, images: torch.Tensor, labels: torch.Tensor, raw: bool) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.to_device(images), self.to_device(labels)
        if raw:
            return images, labels
        return normalize(images, self.mean, self.std, self.channels_last), labels


def _held(tensor: torch.Tensor, source: np.ndarray) -> tuple[str, int]:
    """(where, bytes) a dataset tensor adds: 0 bytes when it is a view of common.data's own array."""
    if tensor.device.type == "cpu":
        shared = np.may_share_memory(tensor.numpy(), source)
        return "host", 0 if shared else tensor.numel() * tensor.element_size()
    return "device", tensor.numel() * tensor.element_size()


class TrainPipeline:
    """Training batches of an EpochPlan: gather + pad-and-crop + flip + normalise, batched."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, device: torch.device, *,
                 crop_padding: int, mean: Sequence[float], std: Sequence[float], channels_last: bool,
                 random_crop: bool = True, horizontal_flip: bool = True):
        self.io = _Normalizer(images, device, mean, std, channels_last)
        self.pad = int(crop_padding)
        self.random_crop, self.horizontal_flip = bool(random_crop), bool(horizontal_flip)
        self.height, self.width = images.shape[1], images.shape[2]
        pad = ((0, 0), (self.pad, self.pad), (self.pad, self.pad), (0, 0))
        self.images = torch.from_numpy(np.pad(images, pad)).to(self.io.storage_device)
        self.labels = torch.from_numpy(np.asarray(labels, np.int64)).to(self.io.storage_device)
        self.rows = torch.arange(self.height, device=self.io.storage_device)
        self.cols = torch.arange(self.width, device=self.io.storage_device)
        self._held = {"train_images": _held(self.images, images), "train_labels": _held(self.labels, labels)}

    def held_arrays(self) -> dict[str, tuple[str, int]]:
        """{array: (where, bytes)} of the dataset copies this pipeline holds (common.backend.data_residency)."""
        return dict(self._held)

    def augmentation(self) -> str:
        """What this pipeline was built to apply (common.sampler.augmentation_text), for the audit."""
        return augmentation_text(self.pad, self.random_crop, self.horizontal_flip)

    def batches(self, plan: EpochPlan, raw: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images, labels)`` for every batch of ``plan``, in order (uint8 NHWC if ``raw``)."""
        check_plan(plan, self.pad, self.random_crop, self.horizontal_flip)
        if plan.dataset_size != len(self.labels):
            raise ValueError(f"plan covers {plan.dataset_size} images, the dataset has {len(self.labels)}")
        where = self.io.storage_device
        # One host -> device copy of the epoch's plan; per batch only slicing.
        order = torch.from_numpy(plan.order.astype(np.int64)).to(where)
        offsets = torch.from_numpy(plan.crop_offsets.astype(np.int64)).to(where)
        flips = torch.from_numpy(plan.flips.astype(bool)).to(where)
        for start, stop in plan.batch_bounds():
            index = order[start:stop]
            images = self._augment(index, offsets[start:stop], flips[start:stop])
            yield self.io.finish(images, self.labels[index], raw)

    def _augment(self, index: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        rows = offsets[:, 0, None] + self.rows  # (B, H) rows of the padded image
        cols = offsets[:, 1, None] + self.cols  # (B, W)
        crops = self.images[index[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
        return torch.where(flips[:, None, None, None], crops.flip(2), crops)


class EvalPipeline:
    """The test set in order, fixed-size batches (last partial one kept), no augmentation."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, device: torch.device, *,
                 batch_size: int, mean: Sequence[float], std: Sequence[float], channels_last: bool):
        self.io = _Normalizer(images, device, mean, std, channels_last)
        self.batch_size = int(batch_size)
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(self.io.storage_device)
        self.labels = torch.from_numpy(np.asarray(labels, np.int64)).to(self.io.storage_device)
        self._held = {"test_images": _held(self.images, images), "test_labels": _held(self.labels, labels)}

    def held_arrays(self) -> dict[str, tuple[str, int]]:
        """{array: (where, bytes)} of the dataset copies this pipeline holds (common.backend.data_residency)."""
        return dict(self._held)

    def batches(self, raw: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.labels), self.batch_size):
            stop = start + self.batch_size
            yield self.io.finish(self.images[start:stop], self.labels[start:stop], raw)

