"""The TensorFlow worker process: ``python -m tf_impl.worker TASK ARGS`` (tasks: common.worker.TASKS).

Every process dualbench starts for the TensorFlow side (a training run, its
audit, a bench measurement, a parity phase) starts here. One task exists on
this side only: ``tfds-export`` decodes a tensorflow-datasets dataset for the
``tfds:NAME`` SPEC (common.data.tfds starts it), because tensorflow-datasets
is TensorFlow's library and the parent process never imports TensorFlow.

``tfds-export NAME OUT_DIR`` (tfds data_dir: $TFDS_DATA_DIR) writes ``train_images.npy``,
``train_labels.npy``, ``test_images.npy``, ``test_labels.npy`` (uint8 NHWC
images, int64 labels) and ``class_names.json``. On failure the last stderr
line is ``tfds_export: error: <one line naming the fix>`` and the exit code is 2.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from common.worker import main

_ERROR_PREFIX = "tfds_export: error: "  # common.data.tfds reads the message after it
_SPLITS = ("train", "test")
_BATCH = 2048  # examples per tf.data batch while converting (bounded memory, few Python iterations)


class _ExportError(Exception):
    """A problem with the requested tfds dataset; the message names the fix."""


def _export_arrays(name: str, data_dir: str | None = None):
    """(train_x, train_y, test_x, test_y, class_names) of tfds dataset ``name``.

    Images are uint8 NHWC, labels int64, class names from the dataset's
    ``label`` ClassLabel feature. Works under ``tfds.testing.mock_data``.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise _ExportError("tensorflow-datasets is not installed: pip install tensorflow-datasets") from None
    try:
        splits, info = tfds.load(name, split=list(_SPLITS), as_supervised=True, with_info=True,
                                 data_dir=data_dir)
    except ModuleNotFoundError as exc:  # tfds imports some dependencies only when it needs them
        raise _ExportError(f"tensorflow-datasets needs the missing module {exc.name!r} to load {name!r}: "
                           f"pip install {exc.name}") from None
    except Exception as exc:  # tfds raises many types (DatasetNotFoundError, download errors...)
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
        raise _ExportError(f"tensorflow-datasets could not load {name!r} ({reason}); check the name "
                           "(tfds.list_builders()), prepare it beforehand where there is network "
                           "(TFDS_DATA_DIR), or use --data cifar10:PATH / --data folder:PATH") from None
    arrays = [_to_numpy(tfds, split) for split in splits]
    label = info.features["label"] if "label" in info.features else None
    if label is None or not hasattr(label, "names"):
        raise _ExportError(f"tfds dataset {name!r} has no ClassLabel 'label' feature: not a classification dataset")
    return (*arrays[0], *arrays[1], tuple(str(n) for n in label.names))


def _to_numpy(tfds, split) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for batch_images, batch_labels in tfds.as_numpy(split.batch(_BATCH)):
        images.append(np.asarray(batch_images, dtype=np.uint8))
        labels.append(np.asarray(batch_labels, dtype=np.int64))
    if not images:
        raise _ExportError("a split of the tfds dataset is empty")
    x = np.concatenate(images)
    if x.ndim == 3:  # (N, H, W): give single-channel images their channel axis
        x = x[..., None]
    return np.ascontiguousarray(x), np.concatenate(labels)


def _write_arrays(out_dir: Path, arrays) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ("train_images", "train_labels", "test_images", "test_labels")
    for name, array in zip(names, arrays[:4]):
        np.save(out_dir / f"{name}.npy", array)
    (out_dir / "class_names.json").write_text(json.dumps(list(arrays[4])))


def _tfds_export_task(_backend_name: str, args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # a data export: keep TF quiet
    out_dir = Path(args.out_dir)
    try:
        _write_arrays(out_dir, _export_arrays(args.name, os.environ.get("TFDS_DATA_DIR")))
    except _ExportError as exc:
        print(f"{_ERROR_PREFIX}{exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{_ERROR_PREFIX}cannot write {out_dir} ({exc})", file=sys.stderr)
        return 2
    return 0


_TASKS = {"tfds-export": (_tfds_export_task, "decode a tensorflow-datasets dataset into .npy files (tfds:NAME)",
                          [("name", "tfds dataset name, e.g. cifar10"),
                           ("out_dir", "folder that receives the .npy files")])}

if __name__ == "__main__":
    sys.exit(main("tensorflow", extra_tasks=_TASKS))
