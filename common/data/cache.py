"""The decoded-dataset cache behind ``common.data.load_dataset``.

Layout: ``<cache root>/datasets/<kind>-<slug>-<key>/`` holding
``train_images.npy``, ``train_labels.npy``, ``test_images.npy``,
``test_labels.npy`` and ``meta.json`` (counts, class names, fingerprint,
source signature). ``key`` is derived from the source signature, so a changed
source gets a new entry and never reuses a stale one; the entry it replaces is
pruned after the new one is in place.

Writes are all-or-nothing: an entry is assembled in a temporary folder next to
its final place and moved there with one ``os.replace``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from common.errors import DataError

CACHE_FORMAT = 1  # bump when the entry layout or meta.json schema changes
ARRAY_NAMES = ("train_images", "train_labels", "test_images", "test_labels")
_STALE_TMP_SECONDS = 6 * 3600  # leftovers of crashed writers older than this are removed


class Arrays(NamedTuple):
    """Decoded dataset arrays: uint8 NHWC images, int64 labels, class names."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]


def fingerprint(arrays: Arrays) -> str:
    """SHA-256 hex over dtype, shape and bytes of the four arrays, then the class names.

    dtype and shape are hashed too, so the same bytes read as a different layout
    (NCHW vs NHWC) give a different fingerprint.
    """
    digest = hashlib.sha256(b"dualbench-dataset-v1\n")
    for name in ARRAY_NAMES:
        array = np.ascontiguousarray(getattr(arrays, name))
        digest.update(f"{name} {array.dtype.str} {array.shape}\n".encode())
        digest.update(memoryview(array).cast("B") if array.size else b"")
    digest.update(json.dumps(list(arrays.class_names)).encode())
    return digest.hexdigest()


def path_signature(path: Path) -> str:
    """Signature of a file or a folder tree: resolved path + (name, size, mtime_ns) of everything in it.

    Uses ``os.scandir`` (one stat per entry), fast enough to run on every load
    of a 60,000-file folder. Folder names are included, so adding an empty class
    folder changes the signature too.
    """
    root = Path(path).resolve()
    digest = hashlib.sha256(f"root {root}\n".encode())
    if root.is_file():
        st = root.stat()
        digest.update(f"file {st.st_size} {st.st_mtime_ns}\n".encode())
        return digest.hexdigest()
    rows: list[str] = []
    stack = [(str(root), "")]
    while stack:
        folder, rel = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                name = f"{rel}{entry.name}"
                if entry.is_dir(follow_symlinks=True):
                    rows.append(f"d {name}")
                    stack.append((entry.path, name + "/"))
                else:
                    st = entry.stat(follow_symlinks=True)
                    rows.append(f"f {name} {st.st_size} {st.st_mtime_ns}")
    rows.sort()
    digest.update("\n".join(rows).encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe, readable fragment of ``text``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:limit] or "data"


def text_digest(text: str) -> str:
    """SHA-256 hex of ``text``."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def entry_dir(root: Path, kind: str, name: str, signature: str) -> Path:
    """Where the entry for this source and signature lives."""
    key = text_digest(signature)[:16]
    return Path(root) / "datasets" / f"{kind}-{name}-{key}"


def read_entry(entry: Path, signature: str) -> tuple[Arrays, str] | None:
    """Arrays and fingerprint of a valid cache entry, or None (missing, stale or damaged).

    The fingerprint is recomputed from the loaded bytes (about 0.1 s for the
    full CIFAR-10 arrays) and compared with the stored one, so a damaged cache
    file is detected and re-decoded instead of being trusted.
    """
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta.get("format") != CACHE_FORMAT or meta.get("signature") != signature:
            return None
        loaded = {name: np.load(entry / f"{name}.npy", allow_pickle=False) for name in ARRAY_NAMES}
        arrays = Arrays(**loaded, class_names=tuple(meta["class_names"]))
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None
    digest = fingerprint(arrays)
    if digest != meta.get("fingerprint"):
        print(f"dualbench: cache entry {entry} is damaged; decoding the source again", file=sys.stderr)
        return None
    return arrays, digest


def read_meta(entry: Path) -> dict[str, Any]:
    """The entry's meta.json ({} when missing or unreadable)."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def write_entry(entry: Path, arrays: Arrays, meta: dict[str, Any]) -> None:
    """Write ``arrays`` + ``meta.json`` as one entry atomically, then prune stale siblings.

    ``meta`` is extended with the format version, counts, shapes and class names.
    """
    parent = entry.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(parent)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
        try:
            for name in ARRAY_NAMES:
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(getattr(arrays, name)))
            full_meta = {"format": CACHE_FORMAT, **meta, **_describe(arrays)}
            (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2, sort_keys=True) + "\n")
            _move_into_place(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise DataError(f"cannot write the dataset cache in {parent} ({exc.strerror or exc}): "
                        "free some disk space or point DUALBENCH_CACHE at a writable folder") from None
    _prune_siblings(entry)


def _describe(arrays: Arrays) -> dict[str, Any]:
    return {
        "class_names": list(arrays.class_names),
        "counts": {"train": int(len(arrays.train_labels)), "test": int(len(arrays.test_labels))},
        "image_shape": list(arrays.train_images.shape[1:]),
    }


def _move_into_place(tmp: Path, entry: Path) -> None:
    # os.replace cannot overwrite a non-empty folder: move a damaged old entry
    # aside first. If another process finished the same entry meanwhile, its
    # copy is equally valid (same signature) and ours is dropped.
    if entry.exists():
        trash = Path(tempfile.mkdtemp(prefix=".tmp-old-", dir=entry.parent))
        try:
            os.replace(entry, trash / "entry")
        except OSError:
            pass
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(tmp, entry)
    except OSError:
        if not (entry / "meta.json").exists():
            raise


def _prune_siblings(entry: Path) -> None:
    # An entry for the same source with another key was decoded from an older
    # version of the source: it can never be served again.
    prefix = entry.name[: entry.name.rfind("-") + 1]
    for sibling in entry.parent.glob(f"{prefix}*"):
        if sibling != entry and sibling.is_dir() and len(sibling.name) == len(entry.name):
            shutil.rmtree(sibling, ignore_errors=True)


def _remove_stale_tmp(parent: Path) -> None:
    now = time.time()
    for leftover in parent.glob(".tmp-*"):
        try:
            if now - leftover.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass
