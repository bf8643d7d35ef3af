"""Tiny generated datasets in the real formats, for the data-layer tests (no network, no ../shared)."""
from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PER_BATCH = 4  # images per CIFAR batch file: 5 train batches -> 20 train images
TEST_COUNT = 6


def cifar_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Random NHWC images with labels, split into five train batches and one test batch."""
    rng = np.random.default_rng(seed)
    n_train = 5 * PER_BATCH
    return {
        "train_images": rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.int64),
        "test_images": rng.integers(0, 256, (TEST_COUNT, 32, 32, 3), dtype=np.uint8),
        "test_labels": (np.arange(TEST_COUNT) * 3 % 10).astype(np.int64),
    }


def _planar(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # NHWC -> (N, 3072) R,G,B planes


def _batches(arrays: dict[str, np.ndarray]):
    """(name stem, images, labels) per batch file, in the official order."""
    for index in range(5):
        part = slice(index * PER_BATCH, (index + 1) * PER_BATCH)
        yield f"data_batch_{index + 1}", arrays["train_images"][part], arrays["train_labels"][part]
    yield "test_batch", arrays["test_images"], arrays["test_labels"]


def write_cifar_python(folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    """An extracted ``cifar-10-batches-py`` folder (pickles with bytes keys, like the official py2 ones)."""
    out = folder / "cifar-10-batches-py"
    out.mkdir(parents=True)
    for stem, images, labels in _batches(arrays):
        batch = {b"batch_label": stem.encode(), b"labels": [int(x) for x in labels],
                 b"data": _planar(images), b"filenames": [f"{stem}_{i}.png".encode() for i in range(len(labels))]}
        (out / stem).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"num_cases_per_batch": PER_BATCH, b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}
    (out / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return out


def write_cifar_binary(folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    """An extracted ``cifar-10-batches-bin`` folder (1 label byte + 3072 pixel bytes per record)."""
    out = folder / "cifar-10-batches-bin"
    out.mkdir(parents=True)
    for stem, images, labels in _batches(arrays):
        records = np.concatenate([labels.astype(np.uint8)[:, None], _planar(images)], axis=1)
        (out / f"{stem}.bin").write_bytes(records.tobytes())
    (out / "batches.meta.txt").write_text("\n".join(CLASSES) + "\n\n")
    return out


def write_archive(extracted: Path, archive: Path) -> Path:
    """``archive`` (.tar.gz) holding ``extracted`` under its own folder name."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(extracted, arcname=extracted.name)
    return archive


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Invert one byte in the middle of ``path`` (same size, different content)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0xFF
    path.write_bytes(bytes(data))


def write_image_folder(root: Path, classes=("cat", "ant", "bee"), per_class=(3, 2), size=(8, 6),
                       fmt: str = "PNG", seed: int = 0) -> dict[str, np.ndarray]:
    """``root/train/<class>/NN.<ext>`` and ``root/test/...``; returns the source arrays per split.

    Returned arrays are in the loader's order (sorted class names, sorted files),
    so for PNG they equal what the loader must produce. ``size`` is (width, height).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    ext = {"PNG": "png", "JPEG": "jpg"}[fmt]
    out = {}
    for split, count in zip(("train", "test"), per_class):
        images, labels = [], []
        for label, name in enumerate(sorted(classes)):
            (root / split / name).mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{index:02d}.{ext}", format=fmt)
                images.append(pixels)
                labels.append(label)
        out[f"{split}_images"] = np.stack(images)
        out[f"{split}_labels"] = np.asarray(labels, dtype=np.int64)
    return out


def run_cli(args: list[str], cache: Path, prelude: str = "", timeout: int = 120) -> subprocess.CompletedProcess:
    """Run ``python -m compare ARGS`` with DUALBENCH_CACHE=cache; ``prelude`` runs first (e.g. no network)."""
    code = f"{prelude}\nimport runpy, sys\nsys.argv = ['dualbench', *{args!r}]\nrunpy.run_module('compare', run_name='__main__')"
    # without KERAS_BACKEND: the test process's own choice (conftest imports tf_impl), not a user's; the CLI
    # refuses a user's KERAS_BACKEND that contradicts a selected backend (keras-torch)
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env.update(DUALBENCH_CACHE=str(cache), PYTHONPATH=str(PROJECT_ROOT))
    return subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


NO_NETWORK = """
import socket
def _refuse(*args, **kwargs):
    raise OSError("network disabled by the test")
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
"""


IDX_STEMS = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` (uint8) in the idx format: 0, 0, type 0x08, ndim, big-endian uint32 dims, values."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.tobytes()


def idx_arrays(n_train: int = 20, n_test: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """Random 28x28 grey images (N, 28, 28) and labels cycling over 0..9."""
    rng = np.random.default_rng(seed)
    return {"train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
            "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
            "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
            "test_labels": (np.arange(n_test) * 3 % 10).astype(np.uint8)}


def write_idx_files(folder: Path, arrays: dict[str, np.ndarray], compress: bool = True,
                    gzip_level: int = 9) -> dict[str, Path]:
    """The four idx files (``.gz`` with ``compress``; the compression level changes the .gz bytes, not the content)."""
    import gzip

    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, stem in IDX_STEMS.items():
        data = idx_bytes(arrays[name])
        path = folder / (f"{stem}.gz" if compress else stem)
        path.write_bytes(gzip.compress(data, compresslevel=gzip_level, mtime=0) if compress else data)
        written[name] = path
    return written
