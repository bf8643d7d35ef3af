"""Canonical weight layout and the numpy conversions to and from torch's layout.

Canonical (= Keras) layout: conv HWIO, depthwise (kh, kw, C, 1), dense (in, out),
BN gamma/beta/moving_mean/moving_variance. A dense layer right after a flatten
has its input rows in NHWC flatten order (h, w, c); torch flattens NCHW as
(c, h, w), so its kernel rows are permuted.

Every copy checks shapes first (``check_weights``): a silent broadcast or a
transposed square kernel is the classic way two "identical" models differ.
"""
from __future__ import annotations

import hashlib
import io
import os

import numpy as np

from common.architectures import ArchSpec, LayerSpec
from common.results import write_bytes_atomic


class WeightLayoutError(ValueError):
    """Canonical weights do not match the architecture spec."""


def check_weights(spec: ArchSpec, weights: dict[str, np.ndarray]) -> None:
    """Raise unless ``weights`` has exactly the spec's names, each with the spec's shape."""
    expected = spec.weight_shapes()
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise WeightLayoutError(f"{spec.model}: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in expected.items():
        got = tuple(np.shape(weights[name]))
        if got != shape:
            raise WeightLayoutError(f"{spec.model}: {name} has shape {got}, expected {shape}")


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """``arrays`` as the bytes of an .npz file (uncompressed; loads back bit for bit)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def save_weights(path: str | os.PathLike, weights: dict[str, np.ndarray]) -> str:
    """Write canonical weights to ``path`` (.npz) atomically; returns the file's SHA-256 (hex)."""
    data = npz_bytes({name: np.asarray(value, np.float32) for name, value in weights.items()})
    write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_weights(path: str | os.PathLike, sha256: str | None = None) -> dict[str, np.ndarray]:
    """Canonical weights saved by ``save_weights``; WeightLayoutError if ``sha256`` is given and differs."""
    if sha256 is not None and file_sha256(path) != sha256:
        raise WeightLayoutError(f"{path}: SHA-256 differs from the one recorded when it was written "
                                "(the file was changed or corrupted)")
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


def to_torch(layer: LayerSpec, param: str, value: np.ndarray) -> np.ndarray:
    """Canonical array -> torch layout for ``layer``'s ``param``."""
    assert tuple(value.shape) == layer.params[param], (layer.name, param, value.shape)
    if param != "kernel":
        return np.ascontiguousarray(value)
    if layer.kind == "conv":  # HWIO -> OIHW
        return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    if layer.kind == "dwconv":  # (kh, kw, C, 1) -> (C, 1, kh, kw)
        return np.ascontiguousarray(value.transpose(2, 3, 0, 1))
    if layer.kind == "dense":
        if layer.after_flatten is not None:  # rows (h, w, c) -> (c, h, w)
            h, w, c = layer.after_flatten
            value = value.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
        return np.ascontiguousarray(value.T)  # (in, out) -> (out, in)
    raise WeightLayoutError(f"no torch layout for kind {layer.kind!r}")


def from_torch(layer: LayerSpec, param: str, value: np.ndarray) -> np.ndarray:
    """Torch layout -> canonical array (inverse of ``to_torch``)."""
    if param != "kernel":
        out = np.ascontiguousarray(value)
    elif layer.kind == "conv":  # OIHW -> HWIO
        out = np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    elif layer.kind == "dwconv":  # (C, 1, kh, kw) -> (kh, kw, C, 1)
        out = np.ascontiguousarray(value.transpose(2, 3, 0, 1))
    elif layer.kind == "dense":
        out = value.T
        if layer.after_flatten is not None:  # rows (c, h, w) -> (h, w, c)
            h, w, c = layer.after_flatten
            out = out.reshape(c, h, w, -1).transpose(1, 2, 0, 3).reshape(h * w * c, -1)
        out = np.ascontiguousarray(out)
    else:
        raise WeightLayoutError(f"no torch layout for kind {layer.kind!r}")
    if np.shares_memory(out, value):  # never hand out a view of a live framework tensor
        out = out.copy()
    if tuple(out.shape) != layer.params[param]:
        raise WeightLayoutError(f"{layer.name}.{param}: torch shape {value.shape} "
                                f"maps to {out.shape}, expected {layer.params[param]}")
    return out
