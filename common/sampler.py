"""The lockstep sampler: all training randomness, drawn once in numpy.

For a (seed, epoch) it fixes the order of the training set, the pad-and-crop
offset and the flip bit of every sample, and the batch boundaries. Both
backend pipelines apply exactly these numbers, so both frameworks see the same
bytes in the same order. ``epoch_plan`` is a pure function of its inputs.

Data-parallel runs draw ONE plan for the global batch (per-replica batch x
world size) and ``shard_plan`` gives replica r slice r of every global batch:
both frameworks apply the same shard, so replica r sees the same images,
crops and flips in torch and in TensorFlow.

``augment_reference`` is the numpy definition of the augmentation that the
torch and tf pipelines are tested against.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_STREAM_ORDER, _STREAM_CROP, _STREAM_FLIP = 1, 2, 3  # independent streams per (seed, epoch)


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch does. Offsets and flips are indexed by position in ``order``."""

    epoch: int  # 0-based epoch index
    order: np.ndarray  # int64 (n,): permutation of training indices
    crop_offsets: np.ndarray  # int32 (n, 2): (dy, dx) top-left corner in the padded image, in [0, 2*pad]
    flips: np.ndarray  # bool (n,): mirror horizontally after the crop
    batch_size: int  # images per full batch
    drop_last: bool  # whether the final partial batch is dropped
    crop_padding: int  # zero padding (pixels) on each side before cropping
    random_crop: bool = True  # offsets drawn at random (False: every crop centred)
    horizontal_flip: bool = True  # flip bits drawn at random (False: none set)
    num_examples: int | None = None  # training-set size the plan indexes into; None = len(order) (unsharded)

    @property
    def dataset_size(self) -> int:
        """Images in the training set this plan draws from (a shard covers only part of them)."""
        return len(self.order) if self.num_examples is None else self.num_examples

    @property
    def num_batches(self) -> int:
        n = len(self.order)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batch_bounds(self) -> list[tuple[int, int]]:
        """(start, stop) positions in ``order`` of every batch, in order."""
        n = len(self.order)
        return [(b * self.batch_size, min((b + 1) * self.batch_size, n)) for b in range(self.num_batches)]

    def batch_sizes(self) -> list[int]:
        return [stop - start for start, stop in self.batch_bounds()]


def epoch_plan(seed: int, epoch: int, num_examples: int, batch_size: int, *,
               drop_last: bool = True, augment: bool = True, crop_padding: int = 4,
               horizontal_flip: bool = True) -> EpochPlan:
    """The plan for ``epoch`` (0-based). Without augmentation offsets are centred and flips off;
    ``horizontal_flip=False`` keeps the random crops and sets no flip (digits: a mirrored 2 is no 2).

    Crops and flips come from independent streams, so turning flips off leaves the order and the
    crop offsets of every (seed, epoch) unchanged.
    """
    if num_examples <= 0 or batch_size <= 0:
        raise ValueError("num_examples and batch_size must be positive")
    if drop_last and num_examples < batch_size:
        from common.errors import ConfigError

        raise ConfigError(f"batch size {batch_size} is larger than the {num_examples} training "
                          "images and the last partial batch is dropped: lower --batch-size")
    order = np.random.default_rng([seed, epoch, _STREAM_ORDER]).permutation(num_examples).astype(np.int64)
    if augment:
        offsets = np.random.default_rng([seed, epoch, _STREAM_CROP]).integers(
            0, 2 * crop_padding + 1, size=(num_examples, 2)).astype(np.int32)
    else:
        offsets = np.full((num_examples, 2), crop_padding, np.int32)
    flipping = augment and horizontal_flip
    if flipping:
        flips = np.random.default_rng([seed, epoch, _STREAM_FLIP]).random(num_examples) < 0.5
    else:
        flips = np.zeros(num_examples, bool)
    return EpochPlan(epoch, order, offsets, flips, batch_size, drop_last, crop_padding, augment, flipping)


def check_plan(plan: EpochPlan, crop_padding: int, random_crop: bool, horizontal_flip: bool) -> None:
    """ValueError unless ``plan`` applies exactly the augmentation a pipeline was built for.

    Both pipelines call this before an epoch, so the augmentation each one reports
    to the fairness audit is the one it applies.
    """
    built = (crop_padding, random_crop, horizontal_flip)
    asked = (plan.crop_padding, plan.random_crop, plan.horizontal_flip)
    if asked != built:
        raise ValueError(f"plan (crop padding, random crop, flip) = {asked}; the pipeline was built for {built}")


def augmentation_text(crop_padding: int, random_crop: bool, horizontal_flip: bool) -> str:
    """The audit's description of an augmentation, e.g. 'random crop (pad 3) + horizontal flip'."""
    parts = [f"random crop (pad {crop_padding})"] if random_crop else []
    parts += ["horizontal flip"] if horizontal_flip else []
    return " + ".join(parts) or "none"


def shard_plan(plan: EpochPlan, rank: int, world_size: int) -> EpochPlan:
    """Replica ``rank``'s part of a plan drawn for the GLOBAL batch: slice ``rank`` of every global batch.

    Global batch g holds positions [g*B, (g+1)*B) of ``plan.order`` with B = b x world_size;
    replica r trains on [g*B + r*b, g*B + (r+1)*b), so the union over replicas of step g is
    exactly global batch g. ``world_size == 1`` returns ``plan`` itself.
    """
    if world_size == 1:
        return plan
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    if plan.batch_size % world_size or not plan.drop_last:
        raise ValueError(f"a global batch of {plan.batch_size} does not split into {world_size} equal "
                         "per-replica batches (and drop_last is required)")
    per_replica = plan.batch_size // world_size
    starts = np.arange(plan.num_batches)[:, None] * plan.batch_size + rank * per_replica
    positions = (starts + np.arange(per_replica)[None, :]).ravel()  # (batch, position in batch), row-major
    return EpochPlan(plan.epoch, plan.order[positions], plan.crop_offsets[positions], plan.flips[positions],
                     per_replica, True, plan.crop_padding, random_crop=plan.random_crop,
                     horizontal_flip=plan.horizontal_flip, num_examples=plan.dataset_size)


def augment_reference(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, pad: int) -> np.ndarray:
    """Zero-pad each uint8 NHWC image by ``pad``, crop at ``offsets``, mirror where ``flips``."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = offsets[:, 0, None] + np.arange(h)  # (n, h)
    cols = offsets[:, 1, None] + np.arange(w)  # (n, w)
    cols = np.where(flips[:, None], cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def normalize_reference(images_uint8: np.ndarray, mean, std) -> np.ndarray:
    """uint8 NHWC -> float32 (x/255 - mean)/std, the normalisation both pipelines apply."""
    x = images_uint8.astype(np.float32) / np.float32(255.0)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def plan_batch_reference(images: np.ndarray, plan: EpochPlan, batch_index: int) -> np.ndarray:
    """The uint8 NHWC batch ``batch_index`` of ``plan`` (numpy reference)."""
    start, stop = plan.batch_bounds()[batch_index]
    idx = plan.order[start:stop]
    return augment_reference(images[idx], plan.crop_offsets[start:stop], plan.flips[start:stop],
                             plan.crop_padding)
