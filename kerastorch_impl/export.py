"""Deployment artifacts of the Keras-on-PyTorch side (mirror of torch_impl/export.py): none yet.

common.deploy.FORMATS lists no keras-torch format, so `dualbench export` makes
no artifact for keras-torch runs (`--backends keras-torch` is refused with one
line). The candidates are Keras's own ``model.save`` (.keras, the file
tf_impl.export writes from the same keras_impl model) and ``model.export``
(ONNX through torch.onnx on this backend); each would need its verifier and
server rows before it is listed. ``set_threads`` is torch's, as for torch_impl.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from common.runtimes import LoadedArtifact


def export_artifact(model: Any, fmt: str, path: str | Path, in_shape: tuple[int, int, int]) -> dict[str, Any]:
    """No format yet: always ValueError (common.deploy.FORMATS lists none for keras-torch)."""
    raise ValueError(f"keras-torch exports no format yet (asked for {fmt!r}); export the torch or tensorflow run")


def load_artifact(fmt: str, path: str | Path) -> LoadedArtifact:
    """No format yet: always ValueError."""
    raise ValueError(f"keras-torch loads no artifact format yet (asked for {fmt!r})")


def set_threads(threads: int) -> dict[str, int]:
    """``threads`` intra-op threads and no extra inter-op pool; returns the values read back."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first inter-op work
        pass
    return {"intra_op_threads": torch.get_num_threads(), "inter_op_threads": torch.get_num_interop_threads()}
