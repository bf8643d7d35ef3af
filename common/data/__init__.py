"""Dataset SPEC -> uint8 NHWC arrays + int64 labels + SHA-256 fingerprint, cached.

Both backends train on exactly the bytes this module returns; the fingerprint
in every run manifest proves it. SPECs (see ``DATASET_SPECS``):

* ``cifar10``: the cached official dataset, else the official download (MD5-checked);
* ``cifar10:PATH``: the official archive (python or binary version) or its
  extracted folder, or a folder containing one of those;
* ``folder:PATH``: image folders ``PATH/train/<class>/*``, ``PATH/test/<class>/*``;
* ``fashion_mnist`` / ``mnist``: the cached dataset, else the four idx files where a
  distribution installs them (``common.data.idx``); ``fashion_mnist:PATH`` / ``mnist:PATH``:
  the four idx files (gzipped or not) in PATH, verified on their content;
* ``tfds:NAME``: a tensorflow-datasets dataset, exported in a subprocess;
* ``synthetic`` or ``synthetic:N_TRAIN,N_TEST``: deterministic generated images.

Every SPEC is decoded once and cached under ``default_cache_dir()``
(``common.data.cache``); path sources are re-decoded when any file under them
changes (name, size or mtime). Subsets are taken after loading.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from common.data import cache as data_cache
from common.data.cache import Arrays
from common.errors import DataError

DATASET_SPECS: list[tuple[str, str]] = [
    ("cifar10", "CIFAR-10 from the local cache, else the official download (MD5-verified)"),
    ("cifar10:PATH", "official CIFAR-10 archive (python or binary .tar.gz) or its extracted folder"),
    ("folder:PATH", "image folders PATH/train/<class>/* and PATH/test/<class>/* (sorted class names)"),
    ("fashion_mnist", "Fashion-MNIST from the local cache, else /usr/share/datasets/fashion-mnist "
                      "(apt-get install dataset-fashion-mnist); content-verified"),
    ("fashion_mnist:PATH", "the four Fashion-MNIST idx files in PATH, gzipped or not (upstream MD5 where the "
                           ".gz files are upstream's, content checks always)"),
    ("mnist", "MNIST from the local cache, else /usr/share/datasets/mnist; content-verified"),
    ("mnist:PATH", "the four MNIST idx files in PATH, gzipped or not (as fashion_mnist:PATH)"),
    ("tfds:NAME", "a tensorflow-datasets classification dataset, e.g. tfds:cifar10, tfds:fashion_mnist"),
    ("synthetic[:N_TRAIN,N_TEST]", "generated 32x32 RGB images, 10 classes (default 2000 train / 500 test)"),
]
IDX_SPECS = ("fashion_mnist", "mnist")  # SPEC prefixes read by common.data.idx
DECODER_VERSION = 1  # bump when decoding changes, so that old cache entries are not served


@dataclass(frozen=True, eq=False)
class Dataset:
    """A decoded dataset as both backends receive it."""

    spec: str  # the SPEC string it came from
    train_images: np.ndarray  # uint8 (N, H, W, C)
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray  # uint8 (M, H, W, C)
    test_labels: np.ndarray  # int64 (M,)
    class_names: tuple[str, ...]  # label i is class_names[i]
    fingerprint: str  # SHA-256 hex over these arrays and class names (after subsetting)
    from_cache: bool  # True when the full dataset was read from the cache, not decoded
    verification: str = ""  # which check the source passed when it was decoded ("" for sources with none)

    @property
    def num_classes(self) -> int:
        """Number of classes (length of ``class_names``)."""
        return len(self.class_names)

    @property
    def in_shape(self) -> tuple[int, int, int]:
        """Image shape (H, W, C)."""
        return tuple(int(d) for d in self.train_images.shape[1:])

    def __repr__(self) -> str:
        return (f"Dataset(spec={self.spec!r}, train={len(self.train_labels)}, test={len(self.test_labels)}, "
                f"in_shape={self.in_shape}, classes={self.num_classes}, fingerprint={self.fingerprint[:12]}..., "
                f"from_cache={self.from_cache})")


@dataclass(frozen=True)
class _Source:
    """How to identify (for the cache) and decode one SPEC."""

    kind: str  # cache folder prefix: cifar10, folder, tfds, synthetic, fashion_mnist, mnist
    name: str  # readable, file-name-safe part of the cache folder name
    signature: Callable[[], str]  # changes whenever the decoded arrays could change
    decode: Callable[[Path, bool], Arrays | tuple[Arrays, str]]  # (cache root, progress) -> arrays[, check]


def default_cache_dir() -> Path:
    """$DUALBENCH_CACHE, else $XDG_CACHE_HOME/dualbench, else ~/.cache/dualbench."""
    explicit = os.environ.get("DUALBENCH_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "dualbench"


def compute_fingerprint(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                        test_labels: np.ndarray, class_names: tuple[str, ...]) -> str:
    """SHA-256 hex over dtype, shape and bytes of the four arrays, then the class names (JSON)."""
    return data_cache.fingerprint(Arrays(train_images, train_labels, test_images, test_labels,
                                         tuple(class_names)))


def load_dataset(spec: str, *, train_subset: int | None = None, test_subset: int | None = None,
                 subset_seed: int = 0, cache_dir: str | os.PathLike | None = None,
                 progress: bool = True) -> Dataset:
    """Decode (or read from the cache) dataset ``spec``; optionally take stratified subsets.

    ``train_subset`` / ``test_subset``: images to keep per split, chosen by
    ``stratified_subset(labels, size, subset_seed)``; ``None`` keeps the split.
    ``cache_dir``: the cache root (default ``default_cache_dir()``).
    ``progress``: progress bars / status lines on stderr while decoding.
    Raises ``DataError`` (one line naming the fix) for anything a user can cause.
    """
    source = _parse_spec(spec)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    arrays, digest, from_cache, verification = _load_full(spec, source, root, progress)
    if train_subset is not None or test_subset is not None:
        arrays = Arrays(*_subset(arrays.train_images, arrays.train_labels, train_subset, subset_seed,
                                 "train", spec),
                        *_subset(arrays.test_images, arrays.test_labels, test_subset, subset_seed,
                                 "test", spec),
                        arrays.class_names)
        digest = data_cache.fingerprint(arrays)
    return Dataset(spec, *arrays[:4], tuple(arrays.class_names), digest, from_cache, verification)


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted int64 indices of a deterministic class-stratified subset of ``size`` samples.

    Per-class counts are proportional to the class frequencies (largest
    remainder; ties go to the lower label). When ``size`` >= the number of
    classes present, every class gets at least one sample (taken from the
    largest allocation). Within a class the samples are a seeded random choice.
    """
    labels = np.asarray(labels).astype(np.int64, copy=False)
    if labels.ndim != 1 or (labels.size and labels.min() < 0):
        raise DataError("labels must be a 1-D array of non-negative class indices")
    size = int(size)
    if not 0 < size <= len(labels):
        raise DataError(f"a subset of {size} samples is impossible from {len(labels)}: "
                        f"choose a size between 1 and {len(labels)}")
    counts = np.bincount(labels)
    quotas = _largest_remainder(counts, size)
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == label))[:quota]
              for label, quota in enumerate(quotas) if quota]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _largest_remainder(counts: np.ndarray, size: int) -> np.ndarray:
    exact = counts * size / counts.sum()
    quotas = np.floor(exact).astype(np.int64)
    remainder_order = sorted(range(len(counts)), key=lambda c: (-(exact[c] - quotas[c]), c))
    for label in remainder_order[: size - int(quotas.sum())]:
        quotas[label] += 1
    present = np.flatnonzero(counts)
    if size >= len(present):
        for label in present[quotas[present] == 0]:
            quotas[int(np.argmax(quotas))] -= 1  # the largest allocation can spare one
            quotas[label] = 1
    return quotas


def _subset(images: np.ndarray, labels: np.ndarray, size: int | None, seed: int, split: str,
            spec: str) -> tuple[np.ndarray, np.ndarray]:
    if size is None:
        return images, labels
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise DataError(f"the {split} subset size must be a positive integer, got {size!r}")
    if size > len(labels):
        raise DataError(f"a {split} subset of {size} images was requested but {spec} has only "
                        f"{len(labels)} {split} images: use --{split}-subset {len(labels)} or less")
    index = stratified_subset(labels, size, seed)
    return np.ascontiguousarray(images[index]), labels[index]


def _load_full(spec: str, source: _Source, root: Path, progress: bool) -> tuple[Arrays, str, bool, str]:
    """(arrays, fingerprint, from cache, verification text) of the full dataset."""
    try:  # decoders turn expected problems into DataError; this catches the rest (permissions...)
        signature = f"decoder v{DECODER_VERSION}; {source.signature()}"
        entry = data_cache.entry_dir(root, source.kind, source.name, signature)
        cached = data_cache.read_entry(entry, signature)
        if cached is not None:
            return cached[0], cached[1], True, data_cache.read_meta(entry).get("verification", "")
        started = time.perf_counter()
        decoded = source.decode(root, progress)
        decoded, verification = decoded if isinstance(decoded, tuple) and len(decoded) == 2 else (decoded, "")
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        raise DataError(f"{spec}: cannot read{where} ({exc.strerror or exc}): check that it exists and "
                        "is readable, or set DUALBENCH_CACHE to a writable folder") from None
    arrays = _validated(spec, decoded)
    digest = data_cache.fingerprint(arrays)
    data_cache.write_entry(entry, arrays, {
        "spec": spec, "source": source.kind, "signature": signature, "fingerprint": digest,
        "decode_seconds": round(time.perf_counter() - started, 3), "verification": verification,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    return arrays, digest, False, verification


def _validated(spec: str, arrays: Arrays) -> Arrays:
    """Normalise dtypes and check that what a decoder produced is a usable dataset."""
    arrays = Arrays(np.ascontiguousarray(arrays.train_images, dtype=np.uint8),
                    np.ascontiguousarray(arrays.train_labels, dtype=np.int64),
                    np.ascontiguousarray(arrays.test_images, dtype=np.uint8),
                    np.ascontiguousarray(arrays.test_labels, dtype=np.int64),
                    tuple(str(name) for name in arrays.class_names))
    for split in ("train", "test"):
        images, labels = getattr(arrays, f"{split}_images"), getattr(arrays, f"{split}_labels")
        if images.ndim != 4 or len(images) != len(labels) or len(labels) == 0:
            raise DataError(f"{spec}: the {split} split decoded to {images.shape} images and "
                            f"{labels.shape} labels; expected N > 0 images (N, H, W, C) and N labels")
        if labels.min() < 0 or labels.max() >= len(arrays.class_names):
            raise DataError(f"{spec}: {split} labels span {labels.min()}..{labels.max()} but there are "
                            f"{len(arrays.class_names)} class names; the source is inconsistent")
    if arrays.train_images.shape[1:] != arrays.test_images.shape[1:]:
        raise DataError(f"{spec}: train images are {arrays.train_images.shape[1:]} but test images are "
                        f"{arrays.test_images.shape[1:]}; both splits need one image shape")
    return arrays


def _parse_spec(spec: str) -> _Source:
    """The _Source for ``spec``; DataError listing the valid forms when it is not one."""
    prefix, _, rest = str(spec).partition(":")
    if spec == "cifar10":
        return _official_cifar10()
    if prefix in ("cifar10", "folder") and rest:
        return _path_source(prefix, Path(rest).expanduser())
    if prefix in IDX_SPECS:
        return _idx_source(prefix, rest)
    if prefix == "tfds" and rest:
        from common.data import tfds as data_tfds

        return _Source("tfds", data_cache.slug(rest), lambda: data_tfds.tfds_signature(rest),
                       lambda root, progress: data_tfds.read_tfds(rest, root / "datasets", progress))
    if prefix == "synthetic":
        n_train, n_test = _synthetic_sizes(spec, rest)
        from common.data.synthetic import make_synthetic

        return _Source("synthetic", f"{n_train}_{n_test}", lambda: f"synthetic v1 {n_train} {n_test}",
                       lambda root, progress: make_synthetic(n_train, n_test))
    forms = ", ".join(pattern for pattern, _ in DATASET_SPECS)
    raise DataError(f"unknown dataset SPEC {spec!r}; valid forms: {forms} (`dualbench list` describes them)")


def _idx_source(prefix: str, rest: str) -> _Source:
    """``fashion_mnist[:PATH]`` / ``mnist[:PATH]``: without PATH, the cache, else a system install."""
    from common.data import idx as data_idx

    dataset = data_idx.IDX_DATASETS[prefix]
    if rest:
        folder = Path(rest).expanduser()
        files = data_idx.locate(dataset, folder)  # DataError now, before any cache lookup
        resolved = folder.resolve()
        name = f"{data_cache.slug(resolved.name, 32)}_{data_cache.text_digest(str(resolved))[:8]}"
        return _Source(prefix, name, lambda: data_cache.path_signature(resolved),
                       lambda root, progress: data_idx.read_idx_dataset(dataset, files))

    def decode(root: Path, progress: bool) -> tuple[Arrays, str]:
        installed = data_idx.find_installed(dataset)
        if installed is None:
            raise DataError(f"{dataset.title} is not in the cache nor in {', '.join(dataset.system_dirs)}, and "
                            f"dualbench downloads nothing: {dataset.how_to_get}")
        return data_idx.read_idx_dataset(dataset, data_idx.locate(dataset, installed))

    # The content check makes every accepted copy the published dataset, so one cache entry serves them all.
    return _Source(prefix, "standard", lambda: f"{prefix} idx, content-verified v1", decode)


def _path_source(prefix: str, path: Path) -> _Source:
    if prefix == "folder":
        from common.data.folder import read_folder

        if not path.is_dir():
            raise DataError(f"image folder {path} not found: pass --data folder:PATH with "
                            "PATH/train/<class>/* and PATH/test/<class>/*")
        located, decode = path, read_folder
    else:
        from common.data.cifar import locate, read_cifar

        located = locate(path)

        def decode(where: Path, progress: bool) -> Arrays:  # reading 180 MB: no progress bar needed
            return read_cifar(where)
    resolved = located.resolve()
    # the resolved-path digest keeps two folders with the same base name apart
    name = f"{data_cache.slug(resolved.name, 32)}_{data_cache.text_digest(str(resolved))[:8]}"
    return _Source(prefix, name, lambda: data_cache.path_signature(resolved),
                   lambda root, progress: decode(resolved, progress))


def _official_cifar10() -> _Source:
    from common.data import cifar as data_cifar

    def decode(root: Path, progress: bool) -> Arrays:
        archive = data_cifar.download_official(root / "downloads", progress)
        return data_cifar.read_cifar(archive)

    md5 = data_cifar.OFFICIAL_CHECKSUMS[data_cifar.PYTHON_ARCHIVE][1]
    return _Source("cifar10", "official", lambda: f"official {data_cifar.PYTHON_ARCHIVE} md5 {md5}", decode)


def _synthetic_sizes(spec: str, rest: str) -> tuple[int, int]:
    from common.data.synthetic import DEFAULT_TEST, DEFAULT_TRAIN

    if not rest:
        return DEFAULT_TRAIN, DEFAULT_TEST
    parts = rest.split(",")
    if len(parts) == 2 and all(p.strip().isdigit() and int(p) > 0 for p in parts):
        return int(parts[0]), int(parts[1])
    raise DataError(f"bad SPEC {spec!r}: use synthetic or synthetic:N_TRAIN,N_TEST with positive "
                    "integers, e.g. synthetic:2000,500")
