"""Deployment artifacts of the TensorFlow side (mirror of torch_impl/export.py).

SavedModel, ONNX (Keras ``model.export``; ONNX goes through tf2onnx), the
native ``.keras`` file and LiteRT (``model.export(format="litert")``: Keras
writes a SavedModel of the inference call and converts it with TFLiteConverter). Every
artifact is the model's inference call (``training=False``: BN moving
statistics, dropout off), float32, taking normalised float32 images
``(batch, H, W, C)`` (NHWC) with a dynamic batch dimension and returning
logits ``(batch, classes)``. Formats, file names and tolerances are listed in
common.deploy.FORMATS. ONNX and LiteRT files are loaded by common.runtimes,
never here. The ``.keras`` file needs ``tf_impl.layers`` importable to load
(its custom layers are registered there); the other formats are standalone.
Keras is imported only where a format needs it, so a process serving a
SavedModel loads TensorFlow alone (its load time and memory are TensorFlow's).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from common.runtimes import LoadedArtifact, onnx_opset


def _signature(in_shape: tuple[int, int, int]) -> list[tf.TensorSpec]:
    return [tf.TensorSpec((None, *in_shape), tf.float32, name="images")]  # None: dynamic batch


def export_artifact(model: Any, fmt: str, path: str | Path, in_shape: tuple[int, int, int]) -> dict[str, Any]:
    """Write the Keras ``model`` as ``fmt`` ("saved_model" | "onnx" | "keras" | "litert") to ``path``; returns how."""
    import keras

    path = str(path)
    if model.dtype_policy.name != "float32":
        raise ValueError(f"exports are float32; the model was built under the {model.dtype_policy.name} policy")
    version = f"keras {keras.__version__}, tensorflow {tf.__version__}"
    if fmt == "saved_model":
        model.export(path, format="tf_saved_model", input_signature=_signature(in_shape), verbose=False)
        return {"exporter": f"model.export(format='tf_saved_model') ({version})", "fallback_reason": None,
                "opset": None}
    if fmt == "onnx":
        model.export(path, format="onnx", input_signature=_signature(in_shape), verbose=False)
        return {"exporter": f"model.export(format='onnx') via tf2onnx ({version})", "fallback_reason": None,
                "opset": onnx_opset(path)}
    if fmt == "keras":
        model.save(path)
        return {"exporter": f"model.save (.keras) ({version})", "fallback_reason": None, "opset": None}
    if fmt == "litert":
        model.export(path, format="litert", input_signature=_signature(in_shape), verbose=False)
        return {"exporter": f"model.export(format='litert') ({version})", "fallback_reason": None, "opset": None}
    raise ValueError(f"tensorflow exports saved_model, onnx, keras or litert, not {fmt!r}")


def _saved_model(path: str) -> LoadedArtifact:
    loaded = tf.saved_model.load(path)  # must stay referenced: it owns the variables `serve` reads
    spec = loaded.serve.input_signature[0]  # `serve`: the endpoint Keras's export writes

    def predict(images: np.ndarray) -> np.ndarray:
        return loaded.serve(tf.constant(images)).numpy()

    return LoadedArtifact(predict, [None, *spec.shape[1:]], f"tensorflow {tf.__version__}")


def _keras(path: str) -> LoadedArtifact:
    import keras

    from tf_impl import layers as _custom_layers  # noqa: F401  (registers BatchNorm, OptionAShortcut)

    model = keras.saving.load_model(path)

    def predict(images: np.ndarray) -> np.ndarray:
        return np.asarray(model.predict_on_batch(images))  # Keras's one-batch inference (compiled predict step)

    return LoadedArtifact(predict, [None, *model.input_shape[1:]], f"keras {keras.__version__}")


def load_artifact(fmt: str, path: str | Path) -> LoadedArtifact:
    """A native artifact in TensorFlow's own runtime: ``tf.saved_model.load`` or ``keras.saving.load_model``."""
    if fmt == "saved_model":
        return _saved_model(str(path))
    if fmt == "keras":
        return _keras(str(path))
    raise ValueError(f"tensorflow loads saved_model and keras artifacts itself, not {fmt!r}")


def set_threads(threads: int) -> dict[str, int]:
    """``threads`` intra-op threads and no extra inter-op pool, on the CPU; returns the values read back."""
    try:
        tf.config.set_visible_devices([], "GPU")  # serving is compared on the CPU for every runtime
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # the runtime already started in this process: the read-back shows what holds
        pass
    return {"intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads()}
