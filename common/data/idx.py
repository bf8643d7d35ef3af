"""MNIST and Fashion-MNIST: the four idx files, gzipped or not, verified on their content.

The idx format (LeCun's MNIST page): two zero bytes, a type byte (0x08 = uint8), the
number of dimensions, one big-endian uint32 per dimension, then the values in
C order. Images are ``idx3`` (N, 28, 28), labels ``idx1`` (N,).

Verification. Upstream publishes the MD5 of its four ``.gz`` files
(``IdxDataset.upstream_md5``). Linux distributions re-compress them
(``apt-get install dataset-fashion-mnist`` ships ``.gz`` files that decompress to
the same bytes but differ as archives), and users may keep them uncompressed, so
the check that always applies is on the decompressed content: idx magic numbers
(type and dimensions), the published image counts and shape, and the label range.
Where all four files are upstream's ``.gz`` bytes their MD5 is checked as well; a
``.gz`` whose MD5 is not upstream's is not an error (it is named in the check text).
``read_idx_dataset`` returns the text of the check it applied, which the cache,
the run manifest and the report keep.
"""
from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data.cache import Arrays
from common.data.cifar import file_md5
from common.errors import DataError

# split array -> file stem as published (".gz" appended for the compressed form)
FILE_STEMS = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
              "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
_UBYTE = 0x08  # idx type code of unsigned bytes, the only one these datasets use
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class IdxDataset:
    """One published idx dataset: what its files must contain and where systems install it."""

    name: str  # the SPEC prefix, e.g. "fashion_mnist"
    title: str  # readable name for messages
    class_names: tuple[str, ...]
    counts: tuple[int, int]  # (train images, test images) as published
    image_shape: tuple[int, int]  # (H, W) pixels
    upstream_md5: dict[str, str]  # ".gz" file name -> MD5 published upstream
    system_dirs: tuple[str, ...]  # folders where a distribution package installs the files
    how_to_get: str  # one line: how to obtain the files (no network download here)


# MD5s: as published by Zalando Research (fashion-mnist README) and used by torchvision's FashionMNIST.
FASHION_MNIST = IdxDataset(
    name="fashion_mnist", title="Fashion-MNIST",
    class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                 "Bag", "Ankle boot"),
    counts=(60000, 10000), image_shape=(28, 28),
    upstream_md5={"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                  "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                  "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                  "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
    system_dirs=("/usr/share/datasets/fashion-mnist",),
    how_to_get="install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or download the four "
               "files from https://github.com/zalandoresearch/fashion-mnist, then pass --data fashion_mnist:PATH",
)
# MD5s: LeCun's MNIST files as listed by torchvision's MNIST (its mirrors serve the same bytes).
MNIST = IdxDataset(
    name="mnist", title="MNIST",
    class_names=tuple(str(digit) for digit in range(10)),
    counts=(60000, 10000), image_shape=(28, 28),
    upstream_md5={"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                  "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
                  "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
                  "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
    system_dirs=("/usr/share/datasets/mnist",),
    how_to_get="download the four idx files (train-images-idx3-ubyte.gz ... t10k-labels-idx1-ubyte.gz, e.g. "
               "from https://ossci-datasets.s3.amazonaws.com/mnist/) where there is network, then pass "
               "--data mnist:PATH",
)
IDX_DATASETS = {d.name: d for d in (FASHION_MNIST, MNIST)}


def locate(dataset: IdxDataset, folder: Path) -> dict[str, Path]:
    """{array: file} of the four files in ``folder`` (``.gz`` preferred over the raw file).

    Also accepts torchvision's layout (``folder/<Title>/raw/``, ``folder/raw/``).
    DataError naming what is missing and how to get it otherwise.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"{dataset.title} folder {folder} not found: {dataset.how_to_get}")
    candidates = [folder, folder / "raw", folder / dataset.title.replace("-", "") / "raw"]
    for where in candidates:
        found = {array: _one_file(where, stem) for array, stem in FILE_STEMS.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    found = {array: _one_file(folder, stem) for array, stem in FILE_STEMS.items()}
    missing = ", ".join(f"{FILE_STEMS[a]}[.gz]" for a, path in found.items() if path is None)
    raise DataError(f"{folder} lacks the {dataset.title} file(s) {missing}: {dataset.how_to_get}")


def find_installed(dataset: IdxDataset) -> Path | None:
    """The first of ``dataset.system_dirs`` that holds all four files, or None."""
    for folder in map(Path, dataset.system_dirs):
        if folder.is_dir() and all(_one_file(folder, stem) for stem in FILE_STEMS.values()):
            return folder
    return None


def _one_file(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx(path: Path) -> np.ndarray:
    """The uint8 array of one idx file (gzip-compressed or not); DataError when it is not valid idx."""
    raw = Path(path).read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:  # bad CRC, truncated stream...
            raise DataError(f"{path} is a damaged gzip file ({exc}): get the file again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE or raw[3] == 0:
        raise DataError(f"{path} is not an idx file of unsigned bytes (magic number {raw[:4].hex() or 'empty'}, "
                        f"expected 000008NN): it is damaged or not from this dataset")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(dims) != ndim or len(raw) != expected:
        raise DataError(f"{path} holds {len(raw)} bytes but its idx header {dims} needs {expected}: "
                        "the file is truncated or damaged; get it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_dataset(dataset: IdxDataset, files: dict[str, Path]) -> tuple[Arrays, str]:
    """Decode and verify the four files; returns the arrays (NHWC, one channel) and the check applied."""
    arrays = {array: read_idx(path) for array, path in files.items()}
    for split, count in zip(("train", "test"), dataset.counts):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape != (count, *dataset.image_shape):
            raise DataError(f"{files[f'{split}_images']} holds images of shape {images.shape}; {dataset.title} "
                            f"{split} has {(count, *dataset.image_shape)}: not the {dataset.title} file")
        if labels.shape != (count,):
            raise DataError(f"{files[f'{split}_labels']} holds {labels.shape} labels; {dataset.title} {split} "
                            f"has {count}: not the {dataset.title} file")
        if int(labels.max()) >= len(dataset.class_names):
            raise DataError(f"{files[f'{split}_labels']} has label {int(labels.max())}; {dataset.title} labels "
                            f"are 0..{len(dataset.class_names) - 1}: not the {dataset.title} file")
    decoded = Arrays(np.ascontiguousarray(arrays["train_images"][..., None]),
                     arrays["train_labels"].astype(np.int64),
                     np.ascontiguousarray(arrays["test_images"][..., None]),
                     arrays["test_labels"].astype(np.int64), dataset.class_names)
    return decoded, _check_text(dataset, files)


def _check_text(dataset: IdxDataset, files: dict[str, Path]) -> str:
    """Which verification applied: the content check always; upstream MD5s where they apply."""
    train, test = dataset.counts
    height, width = dataset.image_shape
    content = (f"content: idx magic numbers, {train}/{test} images of {height}x{width}, labels "
               f"0..{len(dataset.class_names) - 1}")
    compressed = [path for path in files.values() if path.name in dataset.upstream_md5]
    upstream = [path.name for path in compressed if file_md5(path) == dataset.upstream_md5[path.name]]
    if len(upstream) == len(files):
        return f"upstream MD5 of the four .gz files; {content}"
    others = sorted(path.name for path in files.values() if path.name not in upstream)
    which = "all four files" if len(others) == len(files) else ", ".join(others)
    reason = ("re-compressed or not upstream's .gz bytes, so upstream's MD5 cannot apply" if compressed
              else "uncompressed: upstream publishes MD5s of the .gz files only")
    return f"{content} ({which}: {reason})"

