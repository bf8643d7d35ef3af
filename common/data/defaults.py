"""Augmentation and normalisation defaults chosen per dataset.

The recipe fields ``common.config.DATA_DEFAULT_FIELDS`` (crop padding, horizontal
flip, per-channel mean and std) suit one dataset and not another: CIFAR-10's
3-channel statistics cannot normalise a 1-channel digit, a 4-pixel pad is an
eighth of a 32-pixel side but a seventh of 28, and a mirrored 2, 3, 4, 5, 7 or 9
is not the same digit. ``dataset_defaults`` picks them for the dataset at hand;
``apply_defaults`` fills the fields a user did not set on the command line (a
flag always wins, ``--no-augment`` too) and records which fields it filled and
from where in the recipe itself (``defaults_source``, ``defaulted_fields``), so
every run stores them and the report shows them.

Choices:

* crop padding = an eighth of the shorter side, floored: 4 px at 32 px (the
  CIFAR standard), 3 px at 28 px (the same fraction of the image);
* horizontal flips on, except for digits (MNIST). Fashion-MNIST keeps them:
  every one of its ten classes is mirror-symmetric as a class (a mirrored sneaker
  is a sneaker), so a flip never changes the label;
* mean/std of the training split: the published figures for known datasets
  (``KNOWN``), else computed from the training split itself (``channel_stats``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.config import CIFAR_MEAN, CIFAR_STD, DATA_DEFAULT_FIELDS, Recipe
from common.errors import ConfigError, DataError

# family -> (mean, std, horizontal flip, where the numbers come from)
KNOWN: dict[str, tuple[tuple[float, ...], tuple[float, ...], bool, str]] = {
    "cifar10": (CIFAR_MEAN, CIFAR_STD, True,
                "CIFAR-10 training-set mean/std per channel (the values in common.config)"),
    # Computed over the 60,000 training images of the upstream files as x/255, population std:
    # mean 0.28604, std 0.35302 (common.data.defaults.channel_stats on the idx files).
    "fashion_mnist": ((0.2860,), (0.3530,), True,
                      "Fashion-MNIST training-set mean/std (60,000 images, x/255, population std)"),
    # The values of PyTorch's MNIST example, computed the same way over MNIST's 60,000 training images.
    "mnist": ((0.1307,), (0.3081,), False,
              "MNIST training-set mean/std (60,000 images, x/255, population std); no flips: digits are "
              "not mirror-symmetric"),
}
_FAMILY_OF_SPEC = {"cifar10": "cifar10", "tfds:cifar10": "cifar10", "fashion_mnist": "fashion_mnist",
                   "tfds:fashion_mnist": "fashion_mnist", "mnist": "mnist", "tfds:mnist": "mnist"}
STAT_DECIMALS = 4  # computed mean/std are rounded so that the recipe (and its JSON) reads cleanly


@dataclass(frozen=True)
class DataDefaults:
    """The dataset's values for common.config.DATA_DEFAULT_FIELDS, and where they come from."""

    source: str  # e.g. "mnist" or "computed from the training split of folder:..."
    crop_padding: int  # pixels
    horizontal_flip: bool
    mean: tuple[float, ...]  # per channel, in [0, 1]
    std: tuple[float, ...]  # per channel, in [0, 1]
    why: str  # one line for the report


def family(spec: str) -> str | None:
    """The known dataset a SPEC holds (cifar10, fashion_mnist, mnist), or None."""
    spec = str(spec)
    prefix = spec.partition(":")[0]
    if spec in _FAMILY_OF_SPEC:
        return _FAMILY_OF_SPEC[spec]
    return prefix if prefix in ("cifar10", "fashion_mnist", "mnist") else None


def crop_padding_for(in_shape: tuple[int, int, int]) -> int:
    """An eighth of the shorter side, floored (at least 1): 4 at 32 px, 3 at 28 px."""
    return max(1, min(int(in_shape[0]), int(in_shape[1])) // 8)


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of uint8 NHWC ``images`` as x/255 (float64 sums, in chunks)."""
    channels = images.shape[-1]
    total = np.zeros(channels)
    squares = np.zeros(channels)
    for start in range(0, len(images), chunk):
        block = images[start:start + chunk].reshape(-1, channels).astype(np.float64) / 255.0
        total += block.sum(axis=0)
        squares += np.square(block).sum(axis=0)
    count = images.size // channels
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))
    return (tuple(round(float(m), STAT_DECIMALS) for m in mean),
            tuple(round(max(float(s), 10.0 ** -STAT_DECIMALS), STAT_DECIMALS) for s in std))


def dataset_defaults(spec: str, dataset: Any) -> DataDefaults:
    """The defaults for ``dataset`` (a full common.data.Dataset, before subsetting) loaded from ``spec``."""
    padding = crop_padding_for(dataset.in_shape)
    channels = dataset.in_shape[2]
    known = family(spec)
    if known is not None:
        mean, std, flip, why = KNOWN[known]
        if len(mean) != channels:
            raise DataError(f"{spec} decoded to {channels}-channel images but {known} has {len(mean)}: "
                            "the source is not that dataset")
        return DataDefaults(known, padding, flip, mean, std, why)
    mean, std = channel_stats(dataset.train_images)
    return DataDefaults(f"computed from the training split of {spec}", padding, True, mean, std,
                        f"mean/std computed over the {len(dataset.train_labels)} training images (x/255, population "
                        "std); horizontal flips on, as for natural images (--hflip off for digits or text)")


def apply_defaults(recipe: Recipe, defaults: DataDefaults, explicit: dict[str, Any]) -> Recipe:
    """``recipe`` with every DATA_DEFAULT_FIELDS field taken from ``explicit`` (the command line's
    {field: value}) where given, else from ``defaults``.

    The fields filled from the defaults and their source are recorded in the returned recipe.
    A mean/std for another number of channels than the images' is a ConfigError naming the flag.
    """
    filled = tuple(name for name in DATA_DEFAULT_FIELDS if name not in explicit)
    values = {name: explicit[name] if name in explicit else getattr(defaults, name) for name in DATA_DEFAULT_FIELDS}
    channels = len(defaults.mean)
    for name in ("mean", "std"):
        if len(values[name]) != channels:
            raise ConfigError(f"--{name} gives {len(values[name])} value(s) but the images have {channels} "
                              "channel(s): give one value per channel")
    return dataclasses.replace(recipe, **values, defaults_source=defaults.source if filled else "",
                               defaulted_fields=filled)


def check_channels(recipe: Recipe, in_shape: tuple[int, int, int]) -> None:
    """ConfigError unless the recipe normalises exactly the images' channels (worker-side guard)."""
    channels = int(in_shape[2])
    if len(recipe.mean) != channels or len(recipe.std) != channels:
        raise ConfigError(f"the recipe normalises {len(recipe.mean)} channel(s) but the images have {channels}: "
                          "set --mean/--std per channel (dualbench run fills them per dataset)")


def defaults_note(recipe: dict[str, Any]) -> str:
    """One line for the report: which recipe fields took the dataset's defaults, and why those values."""
    fields = list(recipe.get("defaulted_fields") or [])
    if not fields:
        return "none: augmentation and normalisation were set by flags (or by the Recipe's own CIFAR-10 values)"
    source = recipe.get("defaults_source", "")
    why = KNOWN[source][3] if source in KNOWN else ("mean/std computed over the training split (x/255, "
                                                   "population std); horizontal flips on, as for natural images")
    return f"{', '.join(fields)} from {source}: {why}; crop padding is an eighth of the image side"
