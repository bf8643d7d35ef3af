"""The official CIFAR-10 distribution: python-pickle and binary versions, archive or extracted.

Files whose size equals the official size are verified against the published
MD5 checksums (``OFFICIAL_CHECKSUMS``); any other file is treated as a
user-made file in the official format and read as is. A flipped byte leaves the
size unchanged, so corruption of an official file is always caught.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from common.data.cache import Arrays
from common.errors import DataError

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
PYTHON_ARCHIVE = "cifar-10-python.tar.gz"
BINARY_ARCHIVE = "cifar-10-binary.tar.gz"
PYTHON_DIR = "cifar-10-batches-py"
BINARY_DIR = "cifar-10-batches-bin"

# file name -> (size in bytes, MD5 hex) as published (archives: the CIFAR-10
# page; extracted python files: torchvision's list). Tests monkeypatch this
# table with the size and MD5 of their tiny fixtures to exercise verification.
OFFICIAL_CHECKSUMS: dict[str, tuple[int, str]] = {
    PYTHON_ARCHIVE: (170498071, "c58f30108f718f92721af3b95e74349a"),
    BINARY_ARCHIVE: (170052171, "c32a1d4ab5d03f1284b67883e8d87530"),
    "data_batch_1": (31035704, "c99cafc152244af753f735de768cd75f"),
    "data_batch_2": (31035320, "d4bba439e000b95fd0a9bffe97cbabec"),
    "data_batch_3": (31035999, "54ebc095f3ab1f0389bbae665268c751"),
    "data_batch_4": (31035696, "634d18415352ddfa80567beed471001a"),
    "data_batch_5": (31035623, "482c414d41f54cd18b22e5b47cb7c3cb"),
    "test_batch": (31035526, "40351d587109b95175f43aff81a1287e"),
    "batches.meta": (158, "5ff9c542aee3614f3951f8cda6e48888"),
}

PYTHON_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                "test_batch", "batches.meta")
BINARY_FILES = ("data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin",
                "data_batch_5.bin", "test_batch.bin", "batches.meta.txt")
_PIXELS = 32 * 32 * 3  # bytes per image, channel-planar (R plane, G plane, B plane)
_HINT = ("pass --data cifar10:PATH (official archive or extracted folder) "
         "or --data folder:PATH (train/<class>/*, test/<class>/*)")


def locate(path: Path) -> Path:
    """The archive or extracted folder to read for ``cifar10:PATH``.

    PATH may be an archive, an extracted ``cifar-10-batches-py``/``-bin``
    folder, or a folder that contains one of those (extracted folders win).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"CIFAR-10 data not found at {path}: {_HINT}")
    if path.is_file() or _layout_of_dir(path):
        return path
    for name in (PYTHON_DIR, BINARY_DIR, PYTHON_ARCHIVE, BINARY_ARCHIVE):
        if (path / name).exists():
            return path / name
    raise DataError(f"no CIFAR-10 data in {path}: expected {PYTHON_ARCHIVE}, {BINARY_ARCHIVE}, "
                    f"or an extracted {PYTHON_DIR}/ or {BINARY_DIR}/ folder; {_HINT}")


def read_cifar(path: Path) -> Arrays:
    """Decode an archive or extracted folder (as returned by ``locate``) into NHWC arrays."""
    if path.is_file():
        verify_if_official(path, archive=True)
        files = _read_archive(path)
    else:
        files = _read_folder(path)
    if "batches.meta" in files:
        return _decode_python(files)
    return _decode_binary(files)


def verify_if_official(path: Path, *, archive: bool = False, name: str | None = None) -> bool:
    """Check the MD5 of ``path`` when its size is an official size; True when verified.

    An archive is matched by size against both official archives (it may have
    been renamed); other files by their name.
    """
    size = path.stat().st_size
    candidates = ([PYTHON_ARCHIVE, BINARY_ARCHIVE] if archive else [name or path.name])
    for official in candidates:
        expected = OFFICIAL_CHECKSUMS.get(official)
        if expected is None or expected[0] != size:
            continue
        actual = file_md5(path)
        if actual != expected[1]:
            raise DataError(f"checksum mismatch for {path}: MD5 {actual}, the official {official} has "
                            f"{expected[1]}; the file is corrupt or modified: download it again from "
                            f"{OFFICIAL_URL} or {_HINT}")
        return True
    return False


def file_md5(path: Path) -> str:
    """MD5 hex of a file, read in 1 MiB blocks."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _layout_of_dir(path: Path) -> str | None:
    if (path / "batches.meta").exists() or (path / "data_batch_1").exists():
        return "python"
    if (path / "batches.meta.txt").exists() or (path / "data_batch_1.bin").exists():
        return "binary"
    return None


def _read_folder(folder: Path) -> dict[str, bytes]:
    layout = _layout_of_dir(folder)
    needed = PYTHON_FILES if layout == "python" else BINARY_FILES
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise DataError(f"CIFAR-10 folder {folder} is missing {', '.join(missing)}: extract the "
                        f"official archive again, or pass the .tar.gz itself as --data cifar10:PATH")
    files = {}
    for name in needed:
        verify_if_official(folder / name)
        files[name] = (folder / name).read_bytes()
    return files


def _read_archive(archive: Path) -> dict[str, bytes]:
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            needed = PYTHON_FILES if "batches.meta" in members else BINARY_FILES
            missing = [name for name in needed if name not in members]
            if missing:
                raise DataError(f"archive {archive} lacks {', '.join(missing)}: it is incomplete or not "
                                f"CIFAR-10; download it again from {OFFICIAL_URL} or {_HINT}")
            # Read in archive order: a .tar.gz only decompresses forwards.
            wanted = sorted((members[name] for name in needed), key=lambda m: m.offset)
            return {Path(m.name).name: tar.extractfile(m).read() for m in wanted}
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"cannot read {archive} as a tar archive ({exc}): it is damaged or not "
                        f"the CIFAR-10 archive; {_HINT}") from None


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches without running arbitrary code: only numpy arrays are allowed."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("copy_reg", "_reconstructor"),
                ("copyreg", "_reconstructor"), ("__builtin__", "object"), ("builtins", "object"),
                ("_codecs", "encode")}  # Python 3 writes bytes this way in protocol-2 pickles

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected pickled object {module}.{name}")
        module = {"numpy.core.multiarray": "numpy._core.multiarray", "copy_reg": "copyreg",
                  "__builtin__": "builtins"}.get(module, module)
        return super().find_class(module, name)


def _unpickle(name: str, data: bytes) -> dict[str, object]:
    try:
        raw = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # any unpickling failure means a damaged or foreign file
        raise DataError(f"cannot read CIFAR-10 file {name} ({type(exc).__name__}: {exc}): it is damaged "
                        f"or not from the python version of CIFAR-10; {_HINT}") from None
    if not isinstance(raw, dict):
        raise DataError(f"CIFAR-10 file {name} does not hold a dict: not a CIFAR-10 batch; {_HINT}")
    return {key.decode("latin1") if isinstance(key, bytes) else str(key): value for key, value in raw.items()}


def _decode_python(files: dict[str, bytes]) -> Arrays:
    meta = _unpickle("batches.meta", files["batches.meta"])
    names = meta.get("label_names")
    if not isinstance(names, list) or not names:
        raise DataError(f"CIFAR-10 file batches.meta has no label_names list; {_HINT}")
    class_names = tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)
    splits = []
    for batch_names in (PYTHON_FILES[:5], PYTHON_FILES[5:6]):
        images, labels = [], []
        for name in batch_names:
            batch = _unpickle(name, files[name])
            pixels = np.asarray(batch.get("data"), dtype=np.uint8) if "data" in batch else None
            batch_labels = np.asarray(batch.get("labels", []), dtype=np.int64)
            if pixels is None or pixels.ndim != 2 or pixels.shape[1] != _PIXELS or \
                    len(pixels) != len(batch_labels):
                raise DataError(f"CIFAR-10 file {name} is malformed: expected 'data' (N, 3072) uint8 and "
                                f"N 'labels'; {_HINT}")
            images.append(_planar_to_nhwc(pixels))
            labels.append(batch_labels)
        splits.append((np.concatenate(images), np.concatenate(labels)))
    return Arrays(*splits[0], *splits[1], class_names)


def _decode_binary(files: dict[str, bytes]) -> Arrays:
    lines = files["batches.meta.txt"].decode("utf-8", "replace").splitlines()
    class_names = tuple(line.strip() for line in lines if line.strip())
    splits = []
    for batch_names in (BINARY_FILES[:5], BINARY_FILES[5:6]):
        images, labels = [], []
        for name in batch_names:
            data = files[name]
            if len(data) % (_PIXELS + 1):
                raise DataError(f"CIFAR-10 file {name} has {len(data)} bytes, not a whole number of "
                                f"3073-byte records: it is truncated or damaged; {_HINT}")
            records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _PIXELS + 1)
            labels.append(records[:, 0].astype(np.int64))
            images.append(_planar_to_nhwc(records[:, 1:]))
        splits.append((np.concatenate(images), np.concatenate(labels)))
    return Arrays(*splits[0], *splits[1], class_names)


def _planar_to_nhwc(pixels: np.ndarray) -> np.ndarray:
    # CIFAR stores each image as 1024 red, then 1024 green, then 1024 blue bytes.
    return np.ascontiguousarray(pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def download_official(downloads: Path, progress: bool) -> Path:
    """The verified official python archive in ``downloads``, downloading it if needed."""
    target = downloads / PYTHON_ARCHIVE
    size, md5 = OFFICIAL_CHECKSUMS[PYTHON_ARCHIVE]
    if target.is_file() and target.stat().st_size == size and file_md5(target) == md5:
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    handle, part = tempfile.mkstemp(prefix=".part-", dir=downloads)
    try:
        with os.fdopen(handle, "wb") as out:
            actual = _fetch(OFFICIAL_URL, out, progress)
        if actual != md5:
            raise DataError(f"the download of {OFFICIAL_URL} has MD5 {actual}, expected {md5}: "
                            f"try again, or {_HINT}")
        os.replace(part, target)
    finally:
        if os.path.exists(part):
            os.remove(part)
    return target


def _fetch(url: str, out, progress: bool) -> str:
    """Stream ``url`` into ``out``; returns the MD5. Network failures become one DataError line."""
    import http.client
    import urllib.request

    digest = hashlib.md5()
    bar = None
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            bar = _progress_bar(total, f"downloading {PYTHON_ARCHIVE}") if progress else None
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                digest.update(block)
                if bar is not None:
                    bar.update(len(block))
    except (OSError, http.client.HTTPException, ValueError) as exc:
        reason = " ".join(str(getattr(exc, "reason", exc) or type(exc).__name__).split())
        raise DataError(f"cannot download CIFAR-10 from {url} ({reason}) and no cached copy exists: "
                        f"{_HINT}") from None
    finally:
        if bar is not None:
            bar.close()
    return digest.hexdigest()


def _progress_bar(total: int | None, desc: str):
    try:  # tqdm is optional here: common/ needs only numpy and the standard library
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)
