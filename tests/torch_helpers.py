"""Small shared pieces of the torch backend tests (generated data only)."""
from __future__ import annotations

import numpy as np

from common.config import RunSpec


def tiny_dataset(n_train: int = 40, n_test: int = 13, shape=(32, 32, 3), num_classes: int = 10, seed: int = 0):
    """A common.data.Dataset of random uint8 images (labels cycle through the classes)."""
    from common.data import Dataset

    rng = np.random.default_rng(seed)
    return Dataset(spec="test", train_images=rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
                   train_labels=(np.arange(n_train) % num_classes).astype(np.int64),
                   test_images=rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
                   test_labels=(np.arange(n_test) * 3 % num_classes).astype(np.int64),
                   class_names=tuple(f"c{i}" for i in range(num_classes)), fingerprint="x", from_cache=False)


def cpu_spec(model: str = "resnet20", **overrides) -> RunSpec:
    """A CPU RunSpec for tests (eager, NCHW, 2 threads unless overridden)."""
    fields = {"model": model, "backend": "torch", "device": "cpu", "mode": "eager", "channels_last": False,
              "threads": 2}
    fields.update(overrides)
    return RunSpec(**fields)


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to the largest magnitude of b (at least 1e-3)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-3)) if a.size else 0.0
