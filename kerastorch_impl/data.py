"""Input pipelines of the Keras-on-PyTorch side (mirror of torch_impl/data.py): torch_impl's, handing over NHWC.

The lockstep pipelines are torch_impl's (one gather per batch, flip with
``torch.where``, float32 normalisation, the dataset on the GPU when it fits),
proven byte-equal to tf.data's by the tests. Keras computes in NHWC, so the
normalised batch is handed over in NHWC: torch_impl builds it in a contiguous
NHWC buffer and views it as NCHW in channels_last memory format; this side
takes the NHWC view of that same buffer (no copy).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from common.sampler import EpochPlan
from torch_impl import data as _torch_data


def normalize(images_uint8_nhwc: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float32 NHWC ``(x/255 - mean)/std`` (torch_impl's op order; common.sampler.normalize_reference)."""
    return _torch_data.normalize(images_uint8_nhwc, mean, std, channels_last=True).permute(0, 2, 3, 1)


def _nhwc(batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same batches with images as NHWC views (closing this closes ``batches``)."""
    try:
        for images, labels in batches:
            yield images.permute(0, 2, 3, 1), labels
    finally:
        batches.close()


class TrainPipeline(_torch_data.TrainPipeline):
    """Training batches of an EpochPlan: torch_impl's pipeline, normalised images as NHWC."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, device: torch.device, *, crop_padding: int,
                 mean: Sequence[float], std: Sequence[float], random_crop: bool = True, horizontal_flip: bool = True):
        super().__init__(images, labels, device, crop_padding=crop_padding, mean=mean, std=std, channels_last=True,
                         random_crop=random_crop, horizontal_flip=horizontal_flip)

    def batches(self, plan: EpochPlan, raw: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images, labels)`` for every batch of ``plan``, in order: float32 NHWC (uint8 NHWC if ``raw``)."""
        batches = super().batches(plan, raw)
        return batches if raw else _nhwc(batches)


class EvalPipeline(_torch_data.EvalPipeline):
    """The test set in order, fixed-size batches (last partial one kept), no augmentation, NHWC."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, device: torch.device, *, batch_size: int,
                 mean: Sequence[float], std: Sequence[float]):
        super().__init__(images, labels, device, batch_size=batch_size, mean=mean, std=std, channels_last=True)

    def batches(self, raw: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = super().batches(raw)
        return batches if raw else _nhwc(batches)
