"""Deployment artifacts of the torch side (mirror of tf_impl/export.py): torch.export (.pt2) and ONNX.

Every artifact is the model in eval mode (BN moving statistics, dropout off),
float32, contiguous NCHW, taking normalised float32 images ``(batch, C, H, W)``
with a dynamic batch dimension and returning logits ``(batch, classes)``.
Which formats exist, their file names and tolerances are listed in
common.deploy.FORMATS; this module only produces and loads them. ONNX files
are loaded by ONNX Runtime (common.runtimes), never here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.runtimes import LoadedArtifact, onnx_opset

# The example batch used for tracing: 2, not 1, since torch.export specialises a dimension of size 1.
_EXAMPLE_BATCH = 2
_DYNAMIC_BATCH = ({0: torch.export.Dim("batch", min=1)},)  # dimension 0 of the one input


def _example(in_shape: tuple[int, int, int]) -> torch.Tensor:
    height, width, channels = in_shape
    return torch.zeros(_EXAMPLE_BATCH, channels, height, width, dtype=torch.float32)


def _program(model: nn.Module, in_shape: tuple[int, int, int]) -> torch.export.ExportedProgram:
    """torch.export of the eval-mode model with a dynamic batch dimension."""
    return torch.export.export(model, (_example(in_shape),), dynamic_shapes=_DYNAMIC_BATCH, strict=False)


def _prepared(model: nn.Module) -> nn.Module:
    """The model as it is exported: float32, contiguous NCHW parameters, eval mode."""
    model = model.float().to(memory_format=torch.contiguous_format)
    return model.eval()


def _onnx(model: nn.Module, in_shape: tuple[int, int, int], path: Path) -> dict[str, Any]:
    """torch.onnx.export with the torch.export-based exporter; the TorchScript one only as a recorded fallback."""
    names = {"input_names": ["images"], "output_names": ["logits"]}
    try:
        program = torch.onnx.export(model, (_example(in_shape),), dynamo=True, verbose=False,
                                    dynamic_shapes=_DYNAMIC_BATCH,
                                    **names)
        program.save(str(path))
        exporter, fallback = "torch.onnx.export(dynamo=True)", None
    except Exception as exc:  # noqa: BLE001 - any exporter failure falls back, with its reason recorded
        fallback = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        torch.onnx.export(model, (_example(in_shape),), str(path), dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, **names)
        exporter = "torch.onnx.export(dynamo=False) (TorchScript fallback)"
    return {"exporter": exporter, "fallback_reason": fallback, "opset": onnx_opset(path)}


def export_artifact(model: nn.Module, fmt: str, path: str | Path, in_shape: tuple[int, int, int]) -> dict[str, Any]:
    """Write ``model`` as format ``fmt`` ("torch_export" | "onnx") to ``path``; returns how it was made."""
    path, model = Path(path), _prepared(model)
    with torch.no_grad():
        if fmt == "torch_export":
            torch.export.save(_program(model, in_shape), str(path))
            return {"exporter": f"torch.export.export + torch.export.save (torch {torch.__version__})",
                    "fallback_reason": None, "opset": None}
        if fmt == "onnx":
            return _onnx(model, in_shape, path)
    raise ValueError(f"torch exports torch_export or onnx, not {fmt!r}")


def load_artifact(fmt: str, path: str | Path) -> LoadedArtifact:
    """A native artifact loaded by torch's own runtime: ``torch.export.load(path).module()``."""
    if fmt != "torch_export":
        raise ValueError(f"torch loads torch_export artifacts itself, not {fmt!r}")
    program = torch.export.load(str(path))
    module = program.module()
    declared = [None if not isinstance(d, int) else d for d in program.example_inputs[0][0].shape]
    declared[0] = None  # the batch dimension is dynamic (checked by serving every batch size)

    def predict(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(images)).numpy()

    return LoadedArtifact(predict=predict, input_shape=declared, runtime_version=f"torch {torch.__version__}")


def set_threads(threads: int) -> dict[str, int]:
    """``threads`` intra-op threads and no extra inter-op pool; returns the values read back."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first inter-op work
        pass
    return {"intra_op_threads": torch.get_num_threads(), "inter_op_threads": torch.get_num_interop_threads()}
