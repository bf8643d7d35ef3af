"""The two framework-free runtimes that serve exported artifacts: ONNX Runtime and the LiteRT interpreter.

ONNX Runtime runs both frameworks' ONNX files (the neutral third runtime);
the LiteRT interpreter (``ai-edge-litert``, without TensorFlow) runs
``.tflite`` files. Both are imported only inside the functions that load an
artifact, so ``import common`` stays numpy/stdlib only and a process that
serves an ONNX or LiteRT file never loads torch or TensorFlow. The native
formats are loaded by ``torch_impl.export`` / ``tf_impl.export``.

Every runtime gets the same thread budget: ``threads`` intra-op threads and
no extra inter-op pool (ONNX Runtime in sequential execution mode, LiteRT
``num_threads``), read back where the runtime allows it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np


@dataclass
class LoadedArtifact:
    """An artifact ready to run: images (float32, in the artifact's layout) -> float32 logits."""

    predict: Callable[[np.ndarray], np.ndarray]
    input_shape: list[int | None]  # as the artifact declares it; None for a dynamic dimension
    runtime_version: str  # e.g. "onnxruntime 1.32.0"
    settings: dict[str, Any] = field(default_factory=dict)  # thread settings read back from the runtime


def onnx_opset(path: str | Path) -> int | None:
    """The default-domain opset an ONNX file declares (None if it declares none)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _dims(shape: list[Any]) -> list[int | None]:
    """A runtime's shape with symbolic or negative dimensions as None."""
    return [d if isinstance(d, int) and d >= 0 else None for d in shape]


def load_onnx(path: str | Path, threads: int) -> LoadedArtifact:
    """An ONNX file in an ONNX Runtime CPU session with ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # ORT's default, explicit
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (source,), output = session.get_inputs(), session.get_outputs()[0].name

    def predict(images: np.ndarray) -> np.ndarray:
        return session.run([output], {source.name: images})[0]

    settings = {"intra_op_threads": options.intra_op_num_threads, "inter_op_threads": options.inter_op_num_threads,
                "execution_mode": "sequential", "providers": ",".join(session.get_providers())}
    return LoadedArtifact(predict, _dims(source.shape), f"onnxruntime {ort.__version__}", settings)


def load_litert(path: str | Path, threads: int) -> LoadedArtifact:
    """A .tflite file in the LiteRT interpreter with ``threads`` threads (its default XNNPACK CPU delegate).

    The batch dimension is resized to each call's batch (tensors are re-allocated
    only when the batch size changes).
    """
    from importlib import metadata

    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=threads)
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    current: list[int] = []

    def predict(images: np.ndarray) -> np.ndarray:
        if list(images.shape) != current:
            interpreter.resize_tensor_input(source["index"], list(images.shape))
            interpreter.allocate_tensors()
            current[:] = images.shape
        interpreter.set_tensor(source["index"], images)
        interpreter.invoke()
        return np.array(interpreter.get_tensor(target["index"]))  # a copy: the buffer is reused

    signature = [int(d) for d in source["shape_signature"]]
    return LoadedArtifact(predict, _dims(signature), f"ai-edge-litert {metadata.version('ai-edge-litert')}",
                          {"num_threads": threads})
