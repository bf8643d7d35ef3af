"""Image-folder datasets: ``PATH/train/<class>/*`` and ``PATH/test/<class>/*``.

Labels are the indices of the sorted class-folder names; files are read in
sorted order, so the arrays are deterministic. Every image is forced to RGB
(grayscale is replicated into three channels, alpha is dropped) and all images
must share the size of the first one.

Decoding runs in a pool of forked worker processes: for 32x32 JPEGs the
per-file Python overhead dominates, so threads would not help. Forked, not
spawned: spawn re-imports the caller's ``__main__`` in every worker (a backend
worker module would import its framework again; an unguarded script would run
again). Forking a process that already runs framework thread pools can
deadlock, so a process that has torch or tensorflow loaded decodes serially
instead; prepare the data in the parent (``dualbench data prepare``) first.
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from common.data.cache import Arrays
from common.errors import DataError

SPLITS = ("train", "test")
PARALLEL_MIN_FILES = 2048  # below this, starting worker processes costs more than it saves
MAX_WORKERS = 8
_LAYOUT = "PATH/train/<class>/* and PATH/test/<class>/*"


def read_folder(root: Path, progress: bool = False) -> Arrays:
    """Decode an image-folder dataset into uint8 NHWC arrays with int64 labels."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} not found: pass --data folder:PATH with {_LAYOUT}")
    listed = {split: _list_split(root, split) for split in SPLITS}
    train_classes, test_classes = listed["train"][0], listed["test"][0]
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise DataError(f"train and test class folders of {root} differ (only in train: "
                        f"{', '.join(only_train) or '-'}; only in test: {', '.join(only_test) or '-'}): "
                        "give both splits the same class folders")
    paths = listed["train"][1] + listed["test"][1]
    labels = np.concatenate([listed["train"][2], listed["test"][2]])
    images = decode_images(paths, progress)
    n_train = len(listed["train"][1])
    return Arrays(images[:n_train], labels[:n_train], images[n_train:], labels[n_train:],
                  tuple(train_classes))


def _list_split(root: Path, split: str) -> tuple[list[str], list[str], np.ndarray]:
    """(sorted class names, file paths, int64 labels) of one split."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"image folder {root} has no {split}/ folder: expected {_LAYOUT}")
    with os.scandir(split_dir) as entries:
        classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{split_dir} has no class folders: expected {_LAYOUT}")
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        with os.scandir(split_dir / name) as entries:
            files = sorted(e.path for e in entries if e.is_file() and not e.name.startswith("."))
        if not files:
            raise DataError(f"class folder {split_dir / name} is empty: add its images or remove the folder "
                            "(from both train/ and test/)")
        paths.extend(files)
        labels.extend([label] * len(files))
    return classes, paths, np.asarray(labels, dtype=np.int64)


def decode_images(paths: list[str], progress: bool = False) -> np.ndarray:
    """Decode ``paths`` into one uint8 (N, H, W, 3) array; the first image fixes (H, W)."""
    first = _decode_one(paths[0], None)
    size = (first.shape[1], first.shape[0])  # PIL order: (width, height)
    workers = min(MAX_WORKERS, _available_cpus())
    if len(paths) < PARALLEL_MIN_FILES or workers < 2 or not _fork_is_safe():
        return _check(decode_chunk(paths, size, paths[0]))
    out = np.empty((len(paths), *first.shape), dtype=np.uint8)
    chunk = max(64, min(1000, -(-len(paths) // (workers * 8))))
    starts = range(0, len(paths), chunk)
    bar = None
    try:
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
            futures = {start: pool.submit(decode_chunk, paths[start:start + chunk], size, paths[0])
                       for start in starts}
            bar = _progress_bar(len(paths)) if progress else None  # after the forks: tqdm starts a thread
            for start in starts:  # collect in order; decoding continues in the background
                block = _check(futures.pop(start).result())  # pop: free each chunk once copied
                out[start:start + len(block)] = block
                if bar is not None:
                    bar.update(len(block))
    finally:
        if bar is not None:
            bar.close()
    return out


def decode_chunk(paths: list[str], size: tuple[int, int], reference: str) -> tuple[np.ndarray | None, str | None]:
    """Decode one chunk in a worker: (images, None) or (None, error message naming the file).

    Errors travel back as text, not exceptions, so nothing depends on
    exception pickling across processes.
    """
    out = np.empty((len(paths), size[1], size[0], 3), dtype=np.uint8)
    for index, path in enumerate(paths):
        try:
            out[index] = _decode_one(path, (size, reference))
        except DataError as exc:
            return None, str(exc)
    return out, None


def _decode_one(path: str, expected: tuple[tuple[int, int], str] | None) -> np.ndarray:
    from PIL import Image  # lazily: `import common` must stay numpy + stdlib only

    try:
        with Image.open(path) as image:
            if expected is not None and image.size != expected[0]:
                (width, height), reference = expected
                raise DataError(f"image {path} is {image.size[0]}x{image.size[1]} but {reference} is "
                                f"{width}x{height}: all images must have the same size; resize or "
                                "remove it")
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except DataError:
        raise
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        reason = " ".join(str(exc).split())  # one line, whatever PIL put in the message
        raise DataError(f"cannot decode image {path} ({type(exc).__name__}: {reason}): "
                        "replace or remove the file") from None


def _check(result: tuple[np.ndarray | None, str | None]) -> np.ndarray:
    images, error = result
    if error is not None:
        raise DataError(error)
    return images


def _fork_is_safe() -> bool:
    """False where fork is unavailable or framework thread pools may hold locks across it."""
    frameworks = ("torch", "tensorflow", "jax")
    return hasattr(os, "fork") and not any(name in sys.modules for name in frameworks)


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _progress_bar(total: int):
    try:  # tqdm is optional here: common/ needs only numpy and the standard library
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="decoding images", unit="img")
