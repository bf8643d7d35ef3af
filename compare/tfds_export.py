"""Export a tensorflow-datasets dataset to plain numpy arrays (the ``tfds:NAME`` SPEC).

The only module of dualbench that imports ``tensorflow_datasets``. It runs as
a subprocess (``python -m compare.tfds_export NAME OUT_DIR [--data-dir D]``)
started by ``common.data``, because the parent process must never import
tensorflow (import-order segfaults, GPU memory held until exit).

OUT_DIR receives ``train_images.npy``, ``train_labels.npy``,
``test_images.npy``, ``test_labels.npy`` (uint8 NHWC images, int64 labels) and
``class_names.json``. On failure the last stderr line is
``tfds_export: error: <one line naming the fix>`` and the exit code is 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ERROR_PREFIX = "tfds_export: error: "
SPLITS = ("train", "test")
_BATCH = 2048  # examples per tf.data batch while converting (bounded memory, few Python iterations)


class ExportError(Exception):
    """A problem with the requested tfds dataset; the message names the fix."""


def export_arrays(name: str, data_dir: str | None = None):
    """(train_x, train_y, test_x, test_y, class_names) of tfds dataset ``name``.

    Images are uint8 NHWC, labels int64, class names from the dataset's
    ``label`` ClassLabel feature. Works under ``tfds.testing.mock_data``.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ExportError("tensorflow-datasets is not installed: pip install tensorflow-datasets") from None
    try:
        splits, info = tfds.load(name, split=list(SPLITS), as_supervised=True, with_info=True,
                                 data_dir=data_dir)
    except ModuleNotFoundError as exc:  # tfds imports some dependencies only when it needs them
        raise ExportError(f"tensorflow-datasets needs the missing module {exc.name!r} to load {name!r}: "
                          f"pip install {exc.name}") from None
    except Exception as exc:  # tfds raises many types (DatasetNotFoundError, download errors...)
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
        raise ExportError(f"tensorflow-datasets could not load {name!r} ({reason}); check the name "
                          "(tfds.list_builders()), prepare it beforehand where there is network "
                          "(TFDS_DATA_DIR), or use --data cifar10:PATH / --data folder:PATH") from None
    arrays = [_to_numpy(tfds, split) for split in splits]
    label = info.features["label"] if "label" in info.features else None
    if label is None or not hasattr(label, "names"):
        raise ExportError(f"tfds dataset {name!r} has no ClassLabel 'label' feature: not a classification dataset")
    return (*arrays[0], *arrays[1], tuple(str(n) for n in label.names))


def _to_numpy(tfds, split) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for batch_images, batch_labels in tfds.as_numpy(split.batch(_BATCH)):
        images.append(np.asarray(batch_images, dtype=np.uint8))
        labels.append(np.asarray(batch_labels, dtype=np.int64))
    if not images:
        raise ExportError("a split of the tfds dataset is empty")
    x = np.concatenate(images)
    if x.ndim == 3:  # (N, H, W): give single-channel images their channel axis
        x = x[..., None]
    return np.ascontiguousarray(x), np.concatenate(labels)


def write_arrays(out_dir: Path, arrays) -> None:
    """Write the five parts of ``export_arrays`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ("train_images", "train_labels", "test_images", "test_labels")
    for name, array in zip(names, arrays[:4]):
        np.save(out_dir / f"{name}.npy", array)
    (out_dir / "class_names.json").write_text(json.dumps(list(arrays[4])))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m compare.tfds_export", description=__doc__.split("\n")[0])
    parser.add_argument("name", help="tfds dataset name, e.g. cifar10")
    parser.add_argument("out_dir", type=Path, help="folder that receives the .npy files")
    parser.add_argument("--data-dir", default=None, help="tfds data_dir (default: tfds's own)")
    args = parser.parse_args(argv)
    # A data export needs no accelerator; keep TF off the GPU and quiet.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        write_arrays(args.out_dir, export_arrays(args.name, args.data_dir))
    except ExportError as exc:
        print(f"{ERROR_PREFIX}{exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{ERROR_PREFIX}cannot write {args.out_dir} ({exc})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
