"""The ``synthetic`` dataset: deterministic, learnable, CIFAR-shaped images for smoke runs.

Each of 10 classes (``class0`` .. ``class9``) has a template: a distinct
colour (hue = class/10) plus a sinusoidal grating whose orientation depends on
the class. An image is its class template shifted by up to 4 pixels, with a
random brightness offset and Gaussian pixel noise. Colour alone separates the
classes, so a small CNN learns them within an epoch; the noise keeps it from
being trivial. Train and test come from independent random streams.
"""
from __future__ import annotations

import colorsys

import numpy as np

from common.data.cache import Arrays

NUM_CLASSES = 10
IMAGE_SIZE = 32  # pixels, height and width
DEFAULT_TRAIN = 2000  # images; small so that smoke runs are quick
DEFAULT_TEST = 500  # images
_SEED = 20240601  # fixed: the synthetic dataset is the same everywhere
_MAX_SHIFT = 4  # pixels of random translation (wrap-around) per image
_NOISE_STD = 24.0  # grey levels of Gaussian pixel noise
_BRIGHTNESS_STD = 30.0  # grey levels of per-image brightness offset (defeats a pure colour lookup)
_GRATING_AMPLITUDE = 40.0  # grey levels


def make_synthetic(n_train: int = DEFAULT_TRAIN, n_test: int = DEFAULT_TEST) -> Arrays:
    """The synthetic dataset with ``n_train`` / ``n_test`` images (balanced classes)."""
    templates = _templates()
    train_images, train_labels = _sample(templates, n_train, stream=1)
    test_images, test_labels = _sample(templates, n_test, stream=2)
    names = tuple(f"class{index}" for index in range(NUM_CLASSES))
    return Arrays(train_images, train_labels, test_images, test_labels, names)


def _templates() -> np.ndarray:
    """float32 (10, 32, 32, 3) class templates in grey levels."""
    coords = np.arange(IMAGE_SIZE, dtype=np.float32)
    y, x = np.meshgrid(coords, coords, indexing="ij")
    out = np.empty((NUM_CLASSES, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    for label in range(NUM_CLASSES):
        colour = np.array(colorsys.hsv_to_rgb(label / NUM_CLASSES, 0.7, 0.8), dtype=np.float32) * 255.0
        angle = np.pi * label / NUM_CLASSES
        cycles = 2 + label % 3  # grating periods across the image
        grating = np.sin(2 * np.pi * cycles * (x * np.cos(angle) + y * np.sin(angle)) / IMAGE_SIZE)
        out[label] = colour + _GRATING_AMPLITUDE * grating[..., None]
    return out


def _sample(templates: np.ndarray, count: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([_SEED, stream])
    labels = rng.permutation(np.arange(count) % NUM_CLASSES).astype(np.int64)
    shifts = rng.integers(-_MAX_SHIFT, _MAX_SHIFT + 1, size=(count, 2))
    brightness = rng.normal(0.0, _BRIGHTNESS_STD, size=(count, 1, 1, 1)).astype(np.float32)
    images = np.empty((count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for start in range(0, count, 1024):  # bounded float32 temporaries
        stop = min(count, start + 1024)
        block = np.stack([np.roll(templates[labels[i]], tuple(shifts[i]), axis=(0, 1))
                          for i in range(start, stop)])
        block += brightness[start:stop]
        block += rng.normal(0.0, _NOISE_STD, size=block.shape).astype(np.float32)
        images[start:stop] = np.clip(np.rint(block), 0, 255).astype(np.uint8)
    return images, labels
