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

from common.runtimes import LoadedArtifact
from torch_impl.export import set_threads  # noqa: F401  (the same torch thread pools; the mirror's public name)


def export_artifact(model: Any, fmt: str, path: str | Path, in_shape: tuple[int, int, int]) -> dict[str, Any]:
    """No format yet: always ValueError (common.deploy.FORMATS lists none for keras-torch)."""
    raise ValueError(f"keras-torch exports no format yet (asked for {fmt!r}); export the torch or tensorflow run")


def load_artifact(fmt: str, path: str | Path) -> LoadedArtifact:
    """No format yet: always ValueError."""
    raise ValueError(f"keras-torch loads no artifact format yet (asked for {fmt!r})")

