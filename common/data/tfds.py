"""The ``tfds:NAME`` SPEC: tensorflow-datasets, exported in a subprocess.

This process must never import tensorflow, so the TensorFlow worker's
``tfds-export`` task (tf_impl/worker.py, started through common.registry like
every backend process) runs in a child Python that writes plain ``.npy``
files, which are read back here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from common.data.cache import ARRAY_NAMES, Arrays, path_signature
from common.errors import DataError

_ERROR_PREFIX = "tfds_export: error: "
_PROJECT_ROOT = Path(__file__).resolve().parents[2]  # holds common/ and tf_impl/


def tfds_data_dir() -> Path:
    """The folder tfds reads prepared datasets from ($TFDS_DATA_DIR, else ~/tensorflow_datasets)."""
    return Path(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


def tfds_signature(name: str) -> str:
    """Signature of tfds dataset ``name``: its prepared files under the tfds data dir, if any."""
    prepared = tfds_data_dir() / name
    files = path_signature(prepared) if prepared.exists() else "not prepared"
    return f"tfds:{name} data_dir={tfds_data_dir()} files={files}"


def export_command(name: str, out_dir: Path) -> list[str]:
    """The child command line; tests replace this to run the export under ``tfds.testing.mock_data``."""
    from common.registry import worker_command

    return [sys.executable, *worker_command("tensorflow"), "tfds-export", name, str(out_dir)]


def read_tfds(name: str, scratch_parent: Path, progress: bool = False) -> Arrays:
    """Run the export subprocess for ``name`` and load what it wrote."""
    scratch_parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["CUDA_VISIBLE_DEVICES"] = ""  # exporting needs no GPU; don't let TF reserve its memory
    env["TFDS_DATA_DIR"] = str(tfds_data_dir())
    if progress:
        print(f"exporting tfds:{name} with tensorflow-datasets (subprocess)...", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix=".tmp-tfds-", dir=scratch_parent) as scratch:
        out_dir = Path(scratch)
        proc = subprocess.run(export_command(name, out_dir), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, errors="replace")
        if proc.returncode != 0:
            raise DataError(_failure_message(name, proc))
        try:
            loaded = [np.load(out_dir / f"{part}.npy", allow_pickle=False) for part in ARRAY_NAMES]
            class_names = tuple(json.loads((out_dir / "class_names.json").read_text()))
        except (OSError, ValueError) as exc:
            raise DataError(f"tfds:{name}: the export subprocess wrote no usable arrays ({exc}); "
                            f"run `{_manual_command(name)}` to see why") from None
    return Arrays(*loaded, class_names)


def _failure_message(name: str, proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    ours = [line[len(_ERROR_PREFIX):] for line in lines if line.startswith(_ERROR_PREFIX)]
    if ours:
        return f"tfds:{name}: {ours[-1]}"
    last = lines[-1].strip() if lines else f"exit code {proc.returncode}"
    return (f"tfds:{name}: the export subprocess failed ({last}); run `{_manual_command(name)}` "
            "to see the full output")


def _manual_command(name: str) -> str:
    return f"python -m tf_impl.worker tfds-export {name} OUT_DIR"
